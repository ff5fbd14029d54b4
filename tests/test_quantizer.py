"""StableQuantQuantizer on an exported tiny wav2vec2: annotation, names, skip, filters, specs in the graph."""

from __future__ import annotations

import pytest
import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import ComposableQuantizer
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from sq_pt2e.annotators import is_annotated
from sq_pt2e.errors import PlanError, QuantizationError
from sq_pt2e.export import export_speech_model
from sq_pt2e.graph import find_quantizable_layers
from sq_pt2e.models import build_model
from sq_pt2e.passes.verify_quantization import summarize_quantized_graph
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.quantizer import StableQuantQuantizer, act_qspec, weight_qspec
from sq_pt2e.testing import DQ_PER_CHANNEL, DQ_PER_TENSOR, Q_PER_TENSOR, assert_qdq_graph, example_waves

pytestmark = pytest.mark.usefixtures("single_thread")

FC1 = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense"
LAYER_COUNT = 22  # 7 CNN convs, projection, positional conv, 2 x 6 encoder linears, lm_head


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, ExportedProgram, torch.Tensor]:
    model = build_model("tiny-wav2vec2", seed=0)
    (wave,) = example_waves(1, 1)
    return model, export_speech_model(model, wave, dynamic_time=False), wave


def _convert(exported: ExportedProgram, quantizer: object, wave: torch.Tensor) -> GraphModule:
    prepared = prepare_pt2e(exported.module(), quantizer)  # type: ignore[arg-type]
    with torch.no_grad():
        prepared(wave)
    return convert_pt2e(prepared)


def _layer_node(gm: GraphModule, name: str) -> Node:
    (node,) = [layer.node for layer in find_quantizable_layers(gm) if layer.name == name]
    return node


def test_every_conv1d_and_linear_is_annotated_under_its_named_modules_path(tiny) -> None:
    model, exported, _ = tiny
    gm = exported.module()
    quantizer = StableQuantQuantizer()
    quantizer.annotate(gm)
    quantizer.validate(gm)
    layers = find_quantizable_layers(gm)
    assert len(layers) == LAYER_COUNT
    assert all(is_annotated(layer.node) for layer in layers)
    assert all(len(layer.node.meta[Q_ANNOTATION_KEY].input_qspec_map) == 2 for layer in layers)
    float_layers = sorted(
        name for name, module in model.named_modules() if isinstance(module, (torch.nn.Conv1d, torch.nn.Linear))
    )
    assert sorted(layer.name for layer in layers) == float_layers
    assert [s.name for s in quantizer.layer_status] == [layer.name for layer in layers]
    assert {s.status for s in quantizer.layer_status} == {"int8"}
    assert [s.op for s in quantizer.layer_status].count("grouped_conv1d") == 1


def test_default_plan_quantizes_every_layer_with_one_dq_per_weight(tiny) -> None:
    _, exported, wave = tiny
    converted = _convert(exported, StableQuantQuantizer(), wave)
    assert len(summarize_quantized_graph(converted).int8_layers) == LAYER_COUNT
    assert_qdq_graph(converted, {DQ_PER_CHANNEL: LAYER_COUNT, DQ_PER_TENSOR: LAYER_COUNT})
    # Feature encoder: activation q -> dq -> first conv, in that order.
    first = _layer_node(converted, "wav2vec2.feature_extractor.conv_layers.0.conv")
    assert first.args[0].target == DQ_PER_TENSOR and first.args[0].args[0].target == Q_PER_TENSOR
    assert_qdq_graph(converted, {}, order=[Q_PER_TENSOR, DQ_PER_TENSOR, torch.ops.aten.conv1d.default])


def test_skip_stays_float(tiny) -> None:
    _, exported, wave = tiny
    quantizer = StableQuantQuantizer(QuantPlan().with_skipped([FC1], "outliers in the FFN input"))
    converted = _convert(exported, quantizer, wave)
    summary = summarize_quantized_graph(converted)
    assert summary.float_layers == (FC1,)
    assert FC1 not in summary.int8_layers
    node = _layer_node(converted, FC1)
    assert node.args[0].target != DQ_PER_TENSOR
    assert node.args[1].op == "get_attr"  # the float weight, no dequantize
    assert_qdq_graph(converted, {DQ_PER_CHANNEL: LAYER_COUNT - 1})
    (status,) = quantizer.float_layers()
    assert (status.name, status.status, status.reason) == (FC1, "float", "outliers in the FFN input")


def test_module_filter_leaves_layers_unannotated_and_marks_them_not_ours(tiny) -> None:
    _, exported, _ = tiny
    gm = exported.module()
    quantizer = StableQuantQuantizer(module_filter=lambda name: name != "lm_head")
    quantizer.annotate(gm)
    quantizer.validate(gm)
    assert not is_annotated(_layer_node(gm, "lm_head"))
    assert sum(is_annotated(layer.node) for layer in find_quantizable_layers(gm)) == LAYER_COUNT - 1
    statuses = {s.name: s.status for s in quantizer.layer_status}
    assert statuses["lm_head"] == "not-ours"
    assert quantizer.float_layers() == ()


def test_module_filter_composes_with_torchao_composable_quantizer(tiny) -> None:
    _, exported, wave = tiny
    body = StableQuantQuantizer(module_filter=lambda name: name != "lm_head")
    head = StableQuantQuantizer(
        QuantPlan(default=LayerPlan("*", weight_bits=4)), module_filter=lambda name: name == "lm_head"
    )
    converted = _convert(exported, ComposableQuantizer([body, head]), wave)
    assert len(summarize_quantized_graph(converted).int8_layers) == LAYER_COUNT
    ranges = {
        layer.name: tuple(layer.node.args[1].args[4:6]) for layer in find_quantizable_layers(converted)
    }
    assert ranges.pop("lm_head") == (-7, 7)
    assert set(ranges.values()) == {(-127, 127)}


def test_validate_fails_when_another_quantizer_claimed_a_planned_layer_first(tiny) -> None:
    _, exported, _ = tiny
    gm = exported.module()
    StableQuantQuantizer(QuantPlan().with_skipped(["lm_head"], "float head")).annotate(gm)
    second = StableQuantQuantizer()
    second.annotate(gm)
    message = r"layer 'lm_head' \(linear\) should be quantized but its annotation has 0 input specs"
    with pytest.raises(QuantizationError, match=message):
        second.validate(gm)


def test_validate_fails_on_an_unannotated_graph(tiny) -> None:
    _, exported, _ = tiny
    with pytest.raises(QuantizationError, match="in the plan but was not annotated"):
        StableQuantQuantizer().validate(exported.module())


def test_weight_bits_4_narrow_every_weight_dequantize_to_minus_7_7(tiny) -> None:
    _, exported, wave = tiny
    converted = _convert(exported, StableQuantQuantizer(QuantPlan(default=LayerPlan("*", weight_bits=4))), wave)
    weight_dqs = [n for n in converted.graph.nodes if n.target == DQ_PER_CHANNEL]
    assert len(weight_dqs) == LAYER_COUNT
    assert {(n.args[4], n.args[5], n.args[6]) for n in weight_dqs} == {(-7, 7, torch.int8)}
    act_dqs = [n for n in converted.graph.nodes if n.target == DQ_PER_TENSOR]
    assert {(n.args[3], n.args[4], n.args[5]) for n in act_dqs} == {(0, 254, torch.uint8)}


def test_act_bits_4_use_uint8_0_14_with_zero_point_7_on_x86(tiny) -> None:
    _, exported, wave = tiny
    plan = QuantPlan(layers=(LayerPlan("lm_head", act_bits=4),))
    converted = _convert(exported, StableQuantQuantizer(plan), wave)
    x_dq = _layer_node(converted, "lm_head").args[0]
    assert x_dq.target == DQ_PER_TENSOR
    assert tuple(x_dq.args[2:6]) == (7, 0, 14, torch.uint8)


def test_fixed_act_range_appears_as_the_activation_scale(tiny) -> None:
    _, exported, wave = tiny
    plan = QuantPlan(layers=(LayerPlan("lm_head", act_range=2.54),))
    converted = _convert(exported, StableQuantQuantizer(plan), wave)
    x_dq = _layer_node(converted, "lm_head").args[0]
    scale, zero_point = x_dq.args[1], x_dq.args[2]
    assert scale == pytest.approx(2.54 / 127, rel=1e-6)
    assert zero_point == 127
    other = _layer_node(converted, FC1).args[0]
    assert other.args[1] != pytest.approx(2.54 / 127, rel=1e-3)


def test_xnnpack_target_uses_int8_activations_with_zero_point_0_and_quantized_outputs(tiny) -> None:
    _, exported, wave = tiny
    converted = _convert(exported, StableQuantQuantizer(target="xnnpack"), wave)
    node = _layer_node(converted, "lm_head")
    x_dq = node.args[0]
    assert (x_dq.args[2], x_dq.args[3], x_dq.args[4], x_dq.args[5]) == (0, -127, 127, torch.int8)
    (user,) = node.users
    assert user.target == Q_PER_TENSOR
    assert (user.args[3], user.args[4], user.args[5]) == (-128, 127, torch.int8)


def test_unknown_layer_in_plan_raises_plan_error_with_a_hint(tiny) -> None:
    _, exported, _ = tiny
    plan = QuantPlan(layers=(LayerPlan("wav2vec2.encoder.layers.0.feed_forward.intermediate_dens", weight_bits=4),))
    with pytest.raises(PlanError, match=f"did you mean '{FC1}'"):
        prepare_pt2e(exported.module(), StableQuantQuantizer(plan))


def test_convert_without_calibration_raises_naming_a_layer(tiny) -> None:
    _, exported, _ = tiny
    prepared = prepare_pt2e(exported.module(), StableQuantQuantizer())
    with pytest.raises(QuantizationError, match=r"no calibration data reached the observer for layer 'wav2vec2\.\S+"):
        convert_pt2e(prepared)


def test_unknown_target_is_rejected() -> None:
    with pytest.raises(QuantizationError, match="target='arm'"):
        StableQuantQuantizer(target="arm")  # type: ignore[arg-type]


def test_equal_decisions_share_one_spec_object() -> None:
    assert act_qspec(8, "max", None, None) is act_qspec(8, "max", None, None)
    assert weight_qspec(6, "mse") is weight_qspec(6, "mse")
    assert weight_qspec(6, "mse") is not weight_qspec(6, "max")
    assert act_qspec(8, "max", None, None, "xnnpack").dtype == torch.int8
    assert (act_qspec(7, "max", None, None).quant_min, act_qspec(7, "max", None, None).quant_max) == (0, 126)


def test_activation_observers_are_told_the_layers_they_feed(tiny) -> None:
    from sq_pt2e.observers import AbsHistogramObserver

    _, exported, _ = tiny
    prepared = prepare_pt2e(exported.module(), StableQuantQuantizer())
    names = [m.layer for m in prepared.modules() if isinstance(m, AbsHistogramObserver)]
    # q/k/v projections read the same tensor through one shared observer.
    assert len(names) == LAYER_COUNT - 4
    assert "wav2vec2.encoder.layers.0.attention.k_proj, wav2vec2.encoder.layers.0.attention.q_proj, " \
        "wav2vec2.encoder.layers.0.attention.v_proj" in names
    assert names[0] == "wav2vec2.feature_extractor.conv_layers.0.conv"
    assert names[-1] == "lm_head"


def test_nan_in_calibration_audio_raises_at_convert_naming_the_first_layer(tiny) -> None:
    _, exported, wave = tiny
    prepared = prepare_pt2e(exported.module(), StableQuantQuantizer())
    bad = wave.clone()
    bad[0, 100] = float("nan")
    with torch.no_grad():
        prepared(bad)
    with pytest.raises(
        QuantizationError,
        match=r"calibration saw 1 NaN/Inf activation values for layer 'wav2vec2.feature_extractor.conv_layers.0.conv'",
    ):
        convert_pt2e(prepared)


def test_search_returns_a_quantizer_whose_plan_fixes_every_range_and_converts(tiny) -> None:
    from sq_pt2e.stablequant import SearchConfig

    model, exported, wave = tiny
    calibration = example_waves(3, 2)
    quantizer = StableQuantQuantizer.search(model, calibration, [wave], config=SearchConfig(criterion="kl"),
                                            model_name="tiny-wav2vec2")
    assert quantizer.search_report is not None and quantizer.search_report.evaluations > 0
    assert quantizer.plan.model == "tiny-wav2vec2"
    quantized = [layer for layer in quantizer.plan.layers if not layer.skip]
    assert len(quantizer.plan.layers) == LAYER_COUNT and all(layer.act_range for layer in quantized)
    assert len(quantized) == LAYER_COUNT - 1  # the waveform's conv stays float (SearchConfig.keep_float)
    converted = _convert(exported, quantizer, wave)
    split = len(quantizer.plan.outlier_layers())  # each split layer runs a second int8 layer for its outliers
    assert len(summarize_quantized_graph(converted).int8_layers) == LAYER_COUNT - 1 + split
