"""The all-True attention mask of a fixed-length export is removed; dynamic ones are kept."""

from __future__ import annotations

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
    exported = export_speech_model(model, wave)
    assert _sdpa_masks(exported.graph_module) == [None, None]
    assert not any(n.target == torch.ops.aten.arange.default for n in exported.graph_module.graph.nodes)
    torch.testing.assert_close(exported.module()(wave), expected, rtol=0, atol=1e-6)


def test_input_dependent_mask_is_kept() -> None:
    exported = export_speech_model(build_model("tiny-hubert", seed=0), torch.randn(1, 16000), dynamic_time=True)
    assert all(mask is not None for mask in _sdpa_masks(exported.graph_module))
    assert RemoveTrivialAttentionMaskPass()(exported.graph_module).modified is False
