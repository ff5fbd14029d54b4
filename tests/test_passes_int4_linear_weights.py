"""4-bit Linear weights are marked for XNNPACK's packed int4 storage: exact, and the .pte shrinks."""

from __future__ import annotations

import operator

import pytest
import torch

from sq_pt2e.backends.executorch_xnnpack import PteRunner, check_pte, lower_to_xnnpack
from sq_pt2e.passes.int4_linear_weights import PACKED_INT4_RANGE, pack_int4_linear_weights, packed_int4_linear_weights
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.recipes import default_plan
from sq_pt2e.testing import tiny_quantized_model

_DQ_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_LINEAR = torch.ops.aten.linear.default


def _weight_dequantizes(graph: torch.fx.GraphModule) -> dict[str, tuple[object, ...]]:
    """Weight dequantize node -> (layer op, quant_min, quant_max)."""
    return {n.name: (next(iter(n.users)).target, *n.args[4:6]) for n in graph.graph.nodes if n.target == _DQ_CHANNEL}


@pytest.fixture(scope="module")
def w4() -> object:
    return tiny_quantized_model("tiny-wav2vec2", default_plan(weight_bits=4), target="xnnpack", samples=8000)


def test_4bit_linear_weights_are_marked_and_results_are_identical(w4, single_thread) -> None:
    graph = w4.quantized.converted
    linears = [n.name for n in graph.graph.nodes if n.target == _LINEAR]
    before = _weight_dequantizes(graph)
    with torch.no_grad():
        reference = graph(w4.example)
    marked = pack_int4_linear_weights(graph)
    try:
        assert marked == linears and len(marked) == 14  # projection, 2 x 6 Linears, lm_head
        after = _weight_dequantizes(graph)
        for name, (op, low, high) in after.items():
            expected = PACKED_INT4_RANGE if op == _LINEAR else (-7, 7)  # convs keep their grid
            assert (low, high) == expected and before[name][1:] == (-7, 7), name
        with torch.no_grad():
            assert torch.equal(graph(w4.example), reference)
        assert pack_int4_linear_weights(graph) == marked  # idempotent
    finally:  # the module fixture is shared: restore the recorded ranges
        for node in graph.graph.nodes:
            if node.target == _DQ_CHANNEL:
                node.update_arg(4, -7)
        graph.recompile()


def test_8bit_weights_and_weights_outside_the_int4_range_stay_as_they_are(w4) -> None:
    w8 = tiny_quantized_model("tiny-wav2vec2", QuantPlan(), target="xnnpack", samples=8000).quantized.converted
    assert pack_int4_linear_weights(w8) == [] and packed_int4_linear_weights(w8) == []
    mixed_plan = QuantPlan(layers=(LayerPlan("lm_head", op="linear", weight_bits=3),))
    mixed = tiny_quantized_model("tiny-wav2vec2", mixed_plan, target="xnnpack", samples=8000).quantized.converted
    last_linear = [n.name for n in mixed.graph.nodes if n.target == _LINEAR][-1]
    assert pack_int4_linear_weights(mixed) == [last_linear]  # a 3-bit grid fits in -8..7 too
    # a constant that does not fit -8..7, or a nonzero zero point (edited by hand), is left alone
    graph = w4.quantized.converted
    weights = [n for n in graph.graph.nodes if n.target == _DQ_CHANNEL and next(iter(n.users)).target == _LINEAR]
    values = operator.attrgetter(weights[0].args[0].target)(graph)
    zero_points = operator.attrgetter(weights[1].args[2].target)(graph)
    saved = values.clone(), zero_points.clone()
    values[0, 0], zero_points[0] = 9, 1
    try:
        marked = pack_int4_linear_weights(graph)
        assert len(marked) == 12 and not {next(iter(w.users)).name for w in weights[:2]} & set(marked)
    finally:
        values.copy_(saved[0])
        zero_points.copy_(saved[1])
        for node in graph.graph.nodes:
            if node.target == _DQ_CHANNEL:
                node.update_arg(4, -7)
        graph.recompile()


def test_4bit_pte_stores_linear_weights_packed_with_identical_results(w4, single_thread, monkeypatch) -> None:
    from sq_pt2e.passes import int4_linear_weights

    graph, example = w4.quantized.converted, w4.example
    packed, report = lower_to_xnnpack(graph, example)
    assert report.int4_linear_layers == 14 and "14 Linears with 4-bit packed weights" in report.summary()
    assert not packed_int4_linear_weights(graph)  # lowering works on a copy
    monkeypatch.setattr(int4_linear_weights, "pack_int4_linear_weights", lambda _graph: [])
    unpacked, unpacked_report = lower_to_xnnpack(graph, example)
    assert unpacked_report.int4_linear_layers == 0
    linear_weights = sum(p.numel() for p in w4.float_model.parameters() if p.dim() == 2)  # the Linears' weights
    assert unpacked_report.pte_bytes - report.pte_bytes > 0.45 * linear_weights  # half a byte saved per weight
    outputs = [PteRunner(data, example.shape[-1], threads=1)(example) for data in (packed, unpacked)]
    assert torch.equal(outputs[0], outputs[1])
    with torch.no_grad():
        check_pte(PteRunner(packed, example.shape[-1], threads=1), graph(example), example, report)
