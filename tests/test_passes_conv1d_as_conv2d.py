"""QuantizedConv1dAsConv2dPass: dq -> conv1d becomes dq -> conv2d (height 1), numerics unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from sq_pt2e.graph import find_quantizable_layers
from sq_pt2e.passes.conv1d_as_conv2d import QuantizedConv1dAsConv2dPass
from sq_pt2e.plan import QuantPlan
from sq_pt2e.testing import DQ_PER_CHANNEL, DQ_PER_TENSOR, TinyQuantized, assert_qdq_graph, tiny_quantized_model

pytestmark = pytest.mark.usefixtures("single_thread")

CONV2 = "wav2vec2.feature_extractor.conv_layers.2.conv"
CONV1D = torch.ops.aten.conv1d.default
CONV2D = torch.ops.aten.conv2d.default
_DQ = (DQ_PER_TENSOR, DQ_PER_CHANNEL)


@pytest.fixture(scope="module")
def tiny() -> TinyQuantized:
    torch.set_num_threads(1)
    return tiny_quantized_model("tiny-wav2vec2", QuantPlan().with_skipped([CONV2], "float conv for the test"))


def _rewritten(tiny: TinyQuantized) -> tuple[torch.fx.GraphModule, bool]:
    graph = copy.deepcopy(tiny.quantized.converted)
    result = QuantizedConv1dAsConv2dPass()(graph)
    assert result is not None
    return result.graph_module, result.modified


def test_rewritten_graph_gives_exactly_the_original_output(tiny: TinyQuantized) -> None:
    gm, modified = _rewritten(tiny)
    assert modified
    with torch.no_grad():
        torch.testing.assert_close(gm(tiny.example), tiny.int8_logits(), rtol=0, atol=0)


def test_no_conv1d_is_left_on_dequantized_inputs_and_float_convs_are_untouched(tiny: TinyQuantized) -> None:
    gm, _ = _rewritten(tiny)
    # 8 conv1d before: 7 CNN convs (one float) and the grouped positional conv.
    assert_qdq_graph(tiny.quantized.converted, {CONV1D: 8, CONV2D: 0})
    assert_qdq_graph(
        gm,
        {CONV1D: 1, CONV2D: 7, torch.ops.aten.squeeze.dim: 7},
        order=[DQ_PER_TENSOR, DQ_PER_CHANNEL, CONV2D, torch.ops.aten.squeeze.dim],
    )
    for node in gm.graph.nodes:
        if node.target == CONV1D:
            assert node.args[0].target not in _DQ and node.args[1].target not in _DQ
        if node.target == CONV2D:
            x_dq, w_dq = node.args[0], node.args[1]
            assert (x_dq.target, w_dq.target) == _DQ
            assert x_dq.args[0].target == torch.ops.aten.unsqueeze.default
            assert getattr(gm, w_dq.args[0].target).dim() == 4


def test_rewritten_nodes_keep_their_layer_names(tiny: TinyQuantized) -> None:
    gm, _ = _rewritten(tiny)
    conv2d_names = [n.meta["nn_module_stack"] for n in gm.graph.nodes if n.target == CONV2D]
    assert len(conv2d_names) == 7
    last = [list(stack.values())[-1][0] for stack in conv2d_names]
    assert "wav2vec2.encoder.pos_conv_embed.conv" in last
    assert CONV2 not in last
    assert [layer.name for layer in find_quantizable_layers(gm)] == [CONV2] + [
        name for name in tiny.quantized.summary.int8_layers if "conv" not in name.split(".")[-1]
    ]


def test_second_run_and_float_graphs_are_left_unchanged(tiny: TinyQuantized) -> None:
    gm, _ = _rewritten(tiny)
    code = gm.code
    again = QuantizedConv1dAsConv2dPass()(gm)
    assert again is not None and not again.modified
    assert gm.code == code
    float_gm = torch.export.export(torch.nn.Conv1d(1, 2, 3), (torch.randn(1, 1, 8),)).module()
    result = QuantizedConv1dAsConv2dPass()(float_gm)
    assert result is not None and not result.modified
    assert_qdq_graph(result.graph_module, {CONV1D: 1, CONV2D: 0})
