"""What each quantizable layer costs: its floating-point operations per second of audio."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sq_pt2e.audio import SAMPLE_RATE
from sq_pt2e.models.build import to_ctc_logits

__all__ = ["layer_flops"]


def layer_flops(model: nn.Module, names: Sequence[str], *, samples: int = SAMPLE_RATE) -> dict[str, int]:
    """FLOPs of each named layer (``model.named_modules()`` names) on ``samples`` of silence.

    Counted by torch's ``FlopCounterMode`` on one forward; a layer's count does not depend on
    the audio, only on its length. Raises ``KeyError`` naming a layer the model does not run.
    """
    wrapper = to_ctc_logits(model).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        wrapper(torch.zeros(1, samples))
    root = type(wrapper).__name__
    counts = {name.removeprefix(f"{root}."): sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    missing = [n for n in names if n not in counts]
    if missing:
        raise KeyError(f"no operations counted for layer(s) {missing[:3]}: are they in the model's forward?")
    return {n: int(counts[n]) for n in names}
