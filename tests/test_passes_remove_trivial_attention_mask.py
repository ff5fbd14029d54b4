"""Attention masks: a fixed-length export loses the all-True one (the pass), a dynamic one never
builds it (the export patch); masks that depend on the input are kept."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.export import export_speech_model
from sq_pt2e.models import build_model
from sq_pt2e.passes.remove_trivial_attention_mask import RemoveTrivialAttentionMaskPass

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _sdpa_masks(gm: torch.fx.GraphModule) -> list[object]:
    return [n.args[3] if len(n.args) > 3 else None for n in gm.graph.nodes if n.target == _SDPA]


def test_fixed_length_export_has_no_attention_mask_and_same_output() -> None:
    model = build_model("tiny-hubert", seed=0)
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(wave).logits
    exported = export_speech_model(model, wave, unpadded=False)  # the mask is built: the pass removes it
    assert _sdpa_masks(exported.graph_module) == [None, None]
    assert not any(n.target == torch.ops.aten.arange.default for n in exported.graph_module.graph.nodes)
    torch.testing.assert_close(exported.module()(wave), expected, rtol=0, atol=1e-6)


def test_input_dependent_mask_is_kept() -> None:
    exported = export_speech_model(build_model("tiny-hubert", seed=0), torch.randn(1, 16000), dynamic_time=True,
                                   unpadded=False)
    assert all(mask is not None for mask in _sdpa_masks(exported.graph_module))
    assert RemoveTrivialAttentionMaskPass()(exported.graph_module).modified is False


def test_dynamic_length_export_has_no_mask_and_matches_eager() -> None:
    """transformers builds an all-True mask under export; a dynamic length cannot fold it away."""
    model = build_model("tiny-wav2vec2", seed=0)
    exported = export_speech_model(model, torch.randn(1, 16000), dynamic_time=True)
    assert _sdpa_masks(exported.graph_module) == [None, None]
    assert not any(n.target in (torch.ops.aten.arange.default, torch.ops.aten.arange.start)
                   for n in exported.graph_module.graph.nodes)
    for samples in (8000, 24000):
        wave = torch.randn(1, samples, generator=torch.Generator().manual_seed(samples))
        with torch.no_grad():
            expected = model(wave).logits
        torch.testing.assert_close(exported.module()(wave), expected, rtol=0, atol=1e-5)


def test_the_mask_patch_is_undone() -> None:
    import transformers.masking_utils as masking_utils

    from sq_pt2e.export import no_mask_for_unpadded_input

    original = masking_utils._ignore_bidirectional_mask_sdpa
    with pytest.raises(RuntimeError), no_mask_for_unpadded_input():
        raise RuntimeError("export failed")
    assert masking_utils._ignore_bidirectional_mask_sdpa is original
