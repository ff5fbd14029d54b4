"""Capture a speech model with ``torch.export``: waveform in, CTC logits out."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import transformers.masking_utils as masking_utils
from torch import nn
from torch.export import Dim, ExportedProgram

from sq_pt2e.framing import LengthRange
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.passes.fold_weight_norm import fold_weight_norm
from sq_pt2e.passes.remove_trivial_attention_mask import RemoveTrivialAttentionMaskPass

__all__ = ["MIN_SAMPLES", "export_speech_model", "no_mask_for_unpadded_input"]

# The CNN feature encoder's receptive field: shorter input produces no frame.
MIN_SAMPLES = 400


def export_speech_model(
    model: nn.Module,
    example: torch.Tensor,
    *,
    dynamic_time: bool = False,
    lengths: LengthRange | None = None,
    unpadded: bool = True,
) -> ExportedProgram:
    """Export ``model`` (a ``*ForCTC`` model or a waveform->logits module) for PT2E.

    Folds weight norm first (the positional convolution) and wraps Hugging Face CTC
    models in :class:`~sq_pt2e.models.CTCLogits`, so layer names match the model's
    ``named_modules()``. The model is modified in place (weight norm folded).

    The waveform is one unpadded utterance, so attention needs no mask. transformers
    builds one anyway under ``torch.export`` (an all-True ``arange``/``ge`` tensor):
    with ``unpadded`` (default) it is not built (:func:`no_mask_for_unpadded_input`);
    a fixed-length graph that still has one loses it to
    :class:`~sq_pt2e.passes.remove_trivial_attention_mask.RemoveTrivialAttentionMaskPass`.

    Args:
        model: the float model, in eval mode.
        example: a ``(batch, samples)`` float32 waveform.
        dynamic_time: export the time axis as dynamic (any length >= ``MIN_SAMPLES``); the default
            is the fixed length of ``example``, the safe route for int8 under inductor and ExecuTorch.
        lengths: export the lengths of this range instead (frame-aligned, bounded; what a
            dynamic-length ExecuTorch program needs: ``LengthRange.up_to(max_samples, cnn_geometry(model))``).
        unpadded: export attention without a mask (False: keep transformers' mask ops, as a
            graph for padded batches would have them).

    Returns:
        The ``ExportedProgram``; ``.module()`` is what ``prepare_pt2e`` takes.
    """
    if example.ndim != 2:
        msg = f"example waveform must have shape (batch, samples), got {tuple(example.shape)}"
        raise ValueError(msg)
    wrapper = to_ctc_logits(model).eval()
    fold_weight_norm(wrapper)
    if dynamic_time and lengths is not None:
        raise ValueError("export_speech_model: pass dynamic_time or lengths, not both")
    dynamic_shapes = None
    if dynamic_time or lengths is not None:
        (name,) = _forward_argument_names(wrapper)
        dynamic_shapes = {name: {1: Dim.DYNAMIC if lengths is None else lengths.export_dim()}}
    masks = no_mask_for_unpadded_input() if unpadded else contextlib.nullcontext()
    with torch.no_grad(), masks:
        exported = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes)
    RemoveTrivialAttentionMaskPass()(exported.graph_module)
    return exported


@contextlib.contextmanager
def no_mask_for_unpadded_input() -> Iterator[None]:
    """While exporting, let transformers skip the attention mask when no padding mask is given.

    Eager transformers already skips it (``padding_mask is None`` means nothing is masked);
    under ``torch.export`` it refuses to look at the mask and builds an all-True one from the
    sequence length, which constant folding removes at a fixed length but not at a dynamic one.
    """
    original = masking_utils._ignore_bidirectional_mask_sdpa

    def ignore_mask(padding_mask: torch.Tensor | None, kv_length: int, local_attention_size: int | None = None) -> bool:
        if padding_mask is None and local_attention_size is None:
            return True
        return original(padding_mask, kv_length, local_attention_size)

    masking_utils._ignore_bidirectional_mask_sdpa = ignore_mask
    try:
        yield
    finally:
        masking_utils._ignore_bidirectional_mask_sdpa = original


def _forward_argument_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters
    return [name for name, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:1]
