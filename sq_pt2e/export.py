"""Capture a speech model with ``torch.export``: waveform in, CTC logits out."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.passes.fold_weight_norm import fold_weight_norm
from sq_pt2e.passes.remove_trivial_attention_mask import RemoveTrivialAttentionMaskPass

__all__ = ["MIN_SAMPLES", "export_speech_model"]

# The CNN feature encoder's receptive field: shorter input produces no frame.
MIN_SAMPLES = 400


def export_speech_model(
    model: nn.Module, example: torch.Tensor, *, dynamic_time: bool = False
) -> ExportedProgram:
    """Export ``model`` (a ``*ForCTC`` model or a waveform->logits module) for PT2E.

    Folds weight norm first (the positional convolution) and wraps Hugging Face CTC
    models in :class:`~sq_pt2e.models.CTCLogits`, so layer names match the model's
    ``named_modules()``. The model is modified in place (weight norm folded). With a
    fixed length, the all-True attention mask transformers builds is removed
    (:class:`~sq_pt2e.passes.remove_trivial_attention_mask.RemoveTrivialAttentionMaskPass`).

    Args:
        model: the float model, in eval mode.
        example: a ``(batch, samples)`` float32 waveform.
        dynamic_time: export the time axis as dynamic (any length >= ``MIN_SAMPLES``); the default
            is the fixed length of ``example``, the safe route for int8 under inductor and ExecuTorch.

    Returns:
        The ``ExportedProgram``; ``.module()`` is what ``prepare_pt2e`` takes.
    """
    if example.ndim != 2:
        msg = f"example waveform must have shape (batch, samples), got {tuple(example.shape)}"
        raise ValueError(msg)
    wrapper = to_ctc_logits(model).eval()
    fold_weight_norm(wrapper)
    dynamic_shapes = None
    if dynamic_time:
        (name,) = _forward_argument_names(wrapper)
        dynamic_shapes = {name: {1: Dim.DYNAMIC}}
    with torch.no_grad():
        exported = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes)
    RemoveTrivialAttentionMaskPass()(exported.graph_module)
    return exported


def _forward_argument_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters
    return [name for name, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:1]
