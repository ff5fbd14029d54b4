"""Build wav2vec2 / HuBERT CTC models and wrap them for ``torch.export``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCTC, PreTrainedModel

from sq_pt2e.errors import ModelError
from sq_pt2e.models.configs import make_config

__all__ = ["REFERENCE_MODEL_NAMES", "build_model", "CTCLogits", "load_model", "to_ctc_logits"]


def build_model(name: str, *, seed: int = 0, attn_implementation: str = "sdpa", **overrides: object) -> PreTrainedModel:
    """Build a randomly initialised CTC model of a named architecture, in eval mode.

    Args:
        name: architecture name from ``sq_pt2e.models.ARCHITECTURES``.
        seed: seed of the random initialisation (same seed, same weights).
        attn_implementation: ``"sdpa"`` (fused attention) or ``"eager"`` (explicit matmuls).
        **overrides: config fields to change.

    Example:
        >>> model = build_model("tiny-wav2vec2")
    """
    config = make_config(name, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCTC.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


class CTCLogits(nn.Module):
    """Waveform -> CTC logits, with the same module names as the ``*ForCTC`` model.

    Holds the backbone under the model's own ``base_model_prefix`` (``wav2vec2`` or
    ``hubert``) and its ``lm_head``, so layer names in the exported graph
    (``wav2vec2.encoder.layers.3.attention.k_proj``) equal ``model.named_modules()``.
    Input: ``(batch, samples)`` float32 at 16 kHz, normalised; output:
    ``(batch, frames, vocab)`` logits.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.backbone_name = model.base_model_prefix
        self.add_module(self.backbone_name, getattr(model, self.backbone_name))
        self.lm_head = model.lm_head

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        hidden = getattr(self, self.backbone_name)(input_values)[0]
        return self.lm_head(hidden)


def to_ctc_logits(model: nn.Module) -> nn.Module:
    """Return ``model`` wrapped in :class:`CTCLogits` if it is a Hugging Face CTC model."""
    if isinstance(model, PreTrainedModel) and hasattr(model, "lm_head"):
        return CTCLogits(model).eval()
    return model


REFERENCE_MODEL_NAMES = ("ref-wav2vec2", "ref-hubert")


def load_model(spec: str, *, seed: int = 0) -> PreTrainedModel:
    """A shipped reference model (``ref-wav2vec2``, ``ref-hubert``), an architecture name
    (random weights, ``seed``) or a checkpoint folder/file, in eval mode."""
    from sq_pt2e.models.checkpoint import load_checkpoint
    from sq_pt2e.models.configs import ARCHITECTURES

    if spec in ARCHITECTURES:
        return build_model(spec, seed=seed)
    if spec in REFERENCE_MODEL_NAMES and not Path(spec).exists():
        from sq_pt2e.assets import reference_model

        folder = reference_model(spec)
        if folder is None:
            raise ModelError(f"the reference model {spec!r} is not shipped with this installation")
        return load_checkpoint(folder).eval()
    if not Path(spec).exists():
        raise ModelError(f"unknown model {spec!r}: not an architecture ({', '.join(ARCHITECTURES)}), a reference "
                         f"model ({', '.join(REFERENCE_MODEL_NAMES)}) or an existing checkpoint path")
    return load_checkpoint(spec).eval()
