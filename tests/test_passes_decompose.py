"""XNNPACK-friendly rewrites keep the numbers and leave no norm / SDPA op behind."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.export import export_speech_model
from sq_pt2e.models import build_model
from sq_pt2e.passes.decompose_attention import DecomposeAttentionPass
from sq_pt2e.passes.decompose_norms import DecomposeNormsPass

aten = torch.ops.aten


@pytest.mark.parametrize("arch", ["tiny-wav2vec2", "tiny-hubert"])
def test_decomposed_graph_computes_the_same_logits(arch: str) -> None:
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    graph = export_speech_model(build_model(arch, seed=0), wave).module()
    expected = graph(wave)
    assert DecomposeNormsPass()(graph).modified and DecomposeAttentionPass()(graph).modified
    targets = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert not targets & {aten.layer_norm.default, aten.group_norm.default, aten.scaled_dot_product_attention.default}
    assert aten.mean.dim in targets and aten.bmm.default in targets
    torch.testing.assert_close(graph(wave), expected, rtol=0, atol=1e-5)


def test_norms_of_a_dynamic_length_export_stay_dynamic() -> None:
    """Symbolic sizes must not be written into the new nodes: the graph runs at other lengths."""
    wave = torch.randn(1, 16000)
    graph = export_speech_model(build_model("tiny-wav2vec2", seed=0), wave, dynamic_time=True).module()
    other = torch.randn(1, 24000)
    expected = graph(other)
    assert DecomposeNormsPass()(graph).modified
    assert not any(n.target == aten.group_norm.default for n in graph.graph.nodes)
    torch.testing.assert_close(graph(other), expected, rtol=0, atol=1e-5)


def test_masked_attention_is_left_alone() -> None:
    wave = torch.randn(1, 16000)
    graph = export_speech_model(build_model("tiny-hubert", seed=0), wave, dynamic_time=True, unpadded=False).module()
    DecomposeAttentionPass()(graph)
    assert any(n.target == aten.scaled_dot_product_attention.default for n in graph.graph.nodes)


def test_norms_after_int8_layers_are_decomposed_too() -> None:
    """convert_pt2e's dequantize nodes carry no shape metadata; the pass must not need it."""
    from sq_pt2e.pipeline import quantize_model
    from sq_pt2e.recipes import default_plan

    torch.set_num_threads(1)
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(1))
    converted = quantize_model(build_model("tiny-wav2vec2", seed=0), wave, [wave], plan=default_plan(),
                               target="xnnpack").converted
    expected = converted(wave)
    DecomposeNormsPass()(converted)
    targets = {n.target for n in converted.graph.nodes if n.op == "call_function"}
    assert not targets & {aten.layer_norm.default, aten.group_norm.default}
    # float rounding of the decomposed norm can move a value across a rounding point of the next
    # quantize (one grid step), so compare the outputs as a whole
    cosine = torch.nn.functional.cosine_similarity(converted(wave).flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9999
