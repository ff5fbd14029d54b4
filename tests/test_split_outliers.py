"""Outlier split: a layer's clipped inputs computed by a second int8 layer, in the plan, the
simulation, the PT2E graph, inductor's int8 kernels and the search."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sq_pt2e.errors import PlanError
from sq_pt2e.models import build_model
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.passes.split_outliers import OUTLIER_OF, OUTLIER_SUFFIX
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.simulate import collect_statistics, fake_quantized, plan_layer_quants, quantizable_modules
from sq_pt2e.layer_cost import layer_flops
from sq_pt2e.stablequant import JOINT, Evaluator, SearchConfig, SearchReport, search_plan
from sq_pt2e.testing import channel_outlier_model, compiled_plan_report, example_waves

CONV = "wav2vec2.feature_extractor.conv_layers.{}.conv"
DENSE = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense"


def _split_plan(model: torch.nn.Module, calibration: list[torch.Tensor], *, split: bool = True) -> QuantPlan:
    """CNN convs 1-2 (one-sided inputs, affine grids) and one Linear (two-sided, symmetric) at a fifth of
    their max range; with ``split`` what lies beyond goes to a second int8 layer, else it is clipped."""
    statistics = collect_statistics(model, calibration)
    layers = []
    for name in (CONV.format(1), CONV.format(2), DENSE):
        hist = statistics[name]
        act_range = 0.2 * hist.max_abs
        affine = hist.min_value > -0.5 * act_range
        layers.append(LayerPlan(name, act_range=act_range, act_scheme="affine" if affine else "symmetric",
                                act_floor=max(hist.min_value, -act_range) if affine else None,
                                outlier_range=hist.max_abs - act_range if split else None))
    return QuantPlan(layers=tuple(layers))


def test_outlier_range_needs_a_fixed_grid_and_round_trips() -> None:
    with pytest.raises(PlanError, match="needs a fixed grid"):
        LayerPlan("a", outlier_range=1.0)
    with pytest.raises(PlanError, match="needs a fixed grid"):
        LayerPlan("a", act_range=1.0, act_scheme="affine", outlier_range=1.0)
    with pytest.raises(PlanError, match="outlier_range=-1.0"):
        LayerPlan("a", act_range=1.0, outlier_range=-1.0)
    layer = LayerPlan("a", act_range=1.0, act_scheme="affine", act_floor=-0.1, outlier_range=3.5)
    plan = QuantPlan(layers=(layer,))
    assert QuantPlan.from_dict(plan.to_dict()) == plan
    assert plan.outlier_layers() == {"a": layer}
    assert QuantPlan(layers=(dataclasses.replace(layer, skip=True, reason="r"),)).outlier_layers() == {}


def test_split_graph_equals_simulation_and_beats_clipping() -> None:
    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    calibration, (wave,) = example_waves(0, 3, 16000), example_waves(1, 1, 16000)
    plan = _split_plan(model, calibration)
    quantized = quantize_model(model, wave, calibration, plan=plan, fit_to_cpu=False)
    converted = quantized.converted
    statistics = collect_statistics(model, calibration)
    with fake_quantized(model, plan_layer_quants(model, plan, statistics)) as simulated, torch.no_grad():
        expected = simulated(wave)
    torch.testing.assert_close(converted(wave), expected, rtol=0, atol=1e-5)

    outlier_layers = [n for n in converted.graph.nodes if OUTLIER_OF in n.meta]
    assert sorted(n.meta[OUTLIER_OF] for n in outlier_layers) == sorted(layer.name for layer in plan.layers)
    for node in outlier_layers:  # each reads its own int8 input and int8 weights
        assert "dequantize_per_tensor" in str(node.args[0].target)
        assert "dequantize_per_channel" in str(node.args[1].target)
    assert not any(s.name.endswith(OUTLIER_SUFFIX) for s in quantized.layer_status)

    with torch.no_grad():
        reference = to_ctc_logits(model).eval()(wave)
    unsplit = _split_plan(model, calibration, split=False)
    with fake_quantized(model, plan_layer_quants(model, unsplit, statistics)) as clipped, torch.no_grad():
        clipped_error = (clipped(wave) - reference).abs().mean()
    assert (expected - reference).abs().mean() < 0.3 * clipped_error


def test_split_layers_compile_to_int8_kernels_that_match_eager(single_thread) -> None:
    model, report = compiled_plan_report(_split_plan)
    assert report.int8_layers_in_graph == report.int8_kernel_count == len(quantizable_modules(model)) + 3
    assert report.cosine >= 0.999


def _split_tried(report: SearchReport) -> set[str]:
    """The groups an outlier split was tried for, alone or together with others."""
    return {group for label in report.split_trials for group in label.split(JOINT)}


def test_search_splits_the_layer_whose_outliers_matter() -> None:
    torch.set_num_threads(1)
    model = channel_outlier_model()
    calibration = example_waves(3, 4, 8000)
    statistics = collect_statistics(model, calibration)
    evaluator = Evaluator(model, example_waves(4, 3, 8000))
    config = SearchConfig(smooth_alpha=0.0, refit_ops=(), passes=1, split_scope="sensitive")
    plan, report = search_plan(model, statistics, evaluator, config)
    assert CONV.format(2) in report.split_groups
    layer = next(layer for layer in plan.layers if layer.name == CONV.format(2))
    assert layer.outlier_range is not None and layer.clip_percentile == report.split_groups[CONV.format(2)]
    assert "outlier split" in layer.reason and any(k.startswith("split_p") for k, _ in layer.evidence)
    again, _ = search_plan(model, statistics, Evaluator(model, example_waves(4, 3, 8000)), config)
    assert again.to_json() == plan.to_json()
    _, unsplit = search_plan(model, statistics, evaluator, dataclasses.replace(config, split_percentiles=()))
    assert report.final_score.kl < 0.9 * unsplit.final_score.kl
    flops = layer_flops(model, [CONV.format(i) for i in range(1, 3)] + [DENSE])
    assert 0 < report.split_flops_share < 1 and flops[CONV.format(2)] > 0
    # a FLOPs budget below what the split adds: not even tried, and the plan is the unsplit one
    lines: list[str] = []
    capped, capped_report = search_plan(model, statistics, evaluator, dataclasses.replace(
        config, split_max_flops=0.5 * report.split_flops_share), progress=lines.append)
    assert not capped_report.split_groups and not capped_report.split_trials
    assert capped_report.split_flops_share == 0.0 and any("not tried" in line for line in lines)
    assert capped.to_json() == search_plan(model, statistics, evaluator,
                                           dataclasses.replace(config, split_percentiles=()))[0].to_json()
    # split_scope: every group of CNN convs is tried, not only the sensitive ones
    _, every = search_plan(model, statistics, evaluator, dataclasses.replace(config, split_scope="all"))
    convs = {g for g in every.sensitivity if ".conv_layers." in g}
    assert _split_tried(report) == convs & set(report.sensitive_groups) != convs
    assert _split_tried(every) == convs and every.split_groups
    with pytest.raises(ValueError, match="split_scope"):
        SearchConfig(split_scope="convs")
    with pytest.raises(ValueError, match="split_percentiles"):
        SearchConfig(split_percentiles=(100.0,))
    with pytest.raises(ValueError, match="split_max_flops"):
        SearchConfig(split_max_flops=-0.1)


def test_split_plan_runs_as_a_dynamic_length_pte_that_matches_eager_int8(single_thread) -> None:
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, lower_to_xnnpack
    from sq_pt2e.framing import LengthRange, cnn_geometry

    model = build_model("tiny-wav2vec2", seed=0)
    lengths = LengthRange.up_to(32000, cnn_geometry(model))
    example, *calibration = (torch.randn(1, lengths.hop * frames + lengths.context,
                                         generator=torch.Generator().manual_seed(frames)) for frames in (40, 30, 60))
    quantized = quantize_model(model, example, calibration, plan=_split_plan(model, calibration), target="xnnpack",
                               lengths=lengths)
    assert sum(OUTLIER_OF in n.meta for n in quantized.converted.graph.nodes) == 3
    data, _ = lower_to_xnnpack(quantized.converted, example, lengths=lengths)
    wave = torch.randn(1, lengths.hop * 77 + lengths.context, generator=torch.Generator().manual_seed(5))
    output, expected = PteRunner(data, lengths.max_samples, threads=1, lengths=lengths)(wave), quantized.converted(wave)
    assert torch.nn.functional.cosine_similarity(output.flatten(), expected.flatten(), dim=0) > 0.999
