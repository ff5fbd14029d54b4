"""verify_quantization: int8 vs float layers of a converted graph; require_int8_layers raises."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.errors import Int8NotUsedError, SqPt2eError
from sq_pt2e.passes.verify_quantization import require_int8_layers, summarize_quantized_graph
from sq_pt2e.plan import QuantPlan
from sq_pt2e.testing import DQ_PER_CHANNEL, DQ_PER_TENSOR, Q_PER_TENSOR, TinyQuantized, count_ops, tiny_quantized_model

pytestmark = pytest.mark.usefixtures("single_thread")

FC1 = "wav2vec2.encoder.layers.1.feed_forward.intermediate_dense"
CONV2 = "wav2vec2.feature_extractor.conv_layers.2.conv"


@pytest.fixture(scope="module")
def tiny() -> TinyQuantized:
    torch.set_num_threads(1)
    return tiny_quantized_model("tiny-wav2vec2", QuantPlan().with_skipped([FC1, CONV2], "kept float for the test"))


def test_summary_lists_int8_and_float_layers_in_graph_order(tiny: TinyQuantized) -> None:
    summary = summarize_quantized_graph(tiny.quantized.converted)
    assert summary.float_layers == (CONV2, FC1)
    assert len(summary.int8_layers) == 20
    assert summary.int8_layers[0] == "wav2vec2.feature_extractor.conv_layers.0.conv"
    assert summary.int8_layers[-1] == "lm_head"
    assert not set(summary.int8_layers) & set(summary.float_layers)
    assert summary == tiny.quantized.summary


def test_summary_counts_q_and_dq_ops_by_name(tiny: TinyQuantized) -> None:
    gm = tiny.quantized.converted
    counts = summarize_quantized_graph(gm).op_counts
    assert counts == {
        "quantized_decomposed.dequantize_per_channel.default": count_ops(gm, DQ_PER_CHANNEL),
        "quantized_decomposed.dequantize_per_tensor.default": count_ops(gm, DQ_PER_TENSOR),
        "quantized_decomposed.quantize_per_tensor.default": count_ops(gm, Q_PER_TENSOR),
    }
    assert counts["quantized_decomposed.dequantize_per_channel.default"] == 20
    assert list(counts) == sorted(counts)


def test_a_float_model_graph_has_only_float_layers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    gm = torch.export.export(model, (torch.randn(1, 3),)).module()
    summary = summarize_quantized_graph(gm)
    assert summary.int8_layers == ()
    assert summary.float_layers == ("0", "2")
    assert summary.op_counts == {}


def test_require_int8_layers_returns_the_summary_when_all_expected_layers_are_int8(tiny: TinyQuantized) -> None:
    gm = tiny.quantized.converted
    int8 = summarize_quantized_graph(gm).int8_layers
    assert require_int8_layers(gm, int8).int8_layers == int8
    assert require_int8_layers(gm, []).float_layers == (CONV2, FC1)


def test_require_int8_layers_raises_naming_the_layers_that_run_in_float(tiny: TinyQuantized) -> None:
    gm = tiny.quantized.converted
    expected = [*summarize_quantized_graph(gm).int8_layers, FC1, CONV2]
    # Sorted by name, not graph order.
    message = rf"2 layer\(s\) planned as int8 run in float after convert_pt2e: \['{FC1}', '{CONV2}'\]"
    with pytest.raises(Int8NotUsedError, match=message):
        require_int8_layers(gm, expected)


def test_int8_not_used_error_is_a_runtime_error_and_an_sq_pt2e_error() -> None:
    assert issubclass(Int8NotUsedError, RuntimeError)
    assert issubclass(Int8NotUsedError, SqPt2eError)
