"""Per-channel input smoothing: exact in float, identical in simulation and PT2E, and it helps outliers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sq_pt2e.errors import PlanError, QuantizationError
from sq_pt2e.export import export_speech_model
from sq_pt2e.models import build_model
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.simulate import LayerQuant, collect_statistics, fake_quantized, plan_layer_quants, quantizable_modules
from sq_pt2e.smoothing import apply_input_scales, channel_maxima, smoothing_scales
from sq_pt2e.stablequant import (
    Evaluator,
    SearchConfig,
    search_plan,
    search_statistics,
    searched_modules,
    smoothed_layers,
)
from sq_pt2e.testing import channel_outlier_model, compiled_plan_report, example_waves

CONV = "wav2vec2.feature_extractor.conv_layers.{}.conv"


def _smoothed_plan(model: torch.nn.Module, calibration: list[torch.Tensor], **layer: object) -> QuantPlan:
    """W8A8 affine MSE plan with SmoothQuant factors (alpha 0.5) on the CNN convs 1-4."""
    names = [CONV.format(k) for k in range(1, 5)]
    maxima = channel_maxima(model, calibration, names)
    weights = {m.name: m.module.weight for m in quantizable_modules(model)}
    layers = tuple(LayerPlan(n, op="conv1d", calibration="mse", act_scheme="affine",
                             input_scale=smoothing_scales(maxima[n], weights[n], 0.5), **layer) for n in names)
    return QuantPlan(default=LayerPlan("*", calibration="mse", act_scheme="affine"), layers=layers)


def test_scaled_graph_computes_the_same_float_function() -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    (wave,) = example_waves(1, 1, 4000)
    gm = export_speech_model(model, wave).module()
    with torch.no_grad():
        before = gm(wave)
    scales = {CONV.format(2): tuple(float(v) for v in torch.linspace(0.05, 20.0, 32))}
    apply_input_scales(gm, scales)
    muls = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor and "inverse_input_scale" in str(n.args)]
    assert len(muls) == 1
    assert CONV.format(2) + ".weight" not in gm.state_dict()  # the unscaled weight is gone, not carried along
    with torch.no_grad():
        torch.testing.assert_close(gm(wave), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-wav2vec2"])
def test_smoothed_simulation_equals_eager_convert_pt2e(arch: str) -> None:
    torch.set_num_threads(1)
    model = build_model(arch, seed=0)
    calibration, (wave,) = example_waves(0, 3, 16000), example_waves(1, 1, 16000)
    plan = _smoothed_plan(model, calibration)
    converted = quantize_model(model, wave, calibration, plan=plan, fit_to_cpu=False).converted
    quants = plan_layer_quants(model, plan, collect_statistics(model, calibration, input_scales=plan.input_scales()))
    assert sum(q.input_scale is not None for q in quants.values()) == 4
    with fake_quantized(model, quants) as simulated, torch.no_grad():
        expected = simulated(wave)
    torch.testing.assert_close(converted(wave), expected, rtol=0, atol=1e-5)


def test_smoothed_plan_compiles_to_int8_kernels_that_match_eager(single_thread) -> None:
    _, report = compiled_plan_report(_smoothed_plan)
    assert report.int8_kernel_count == report.int8_layers_in_graph == 22
    assert report.cosine >= 0.999


def test_smoothing_shrinks_the_error_an_outlier_channel_causes() -> None:
    torch.set_num_threads(1)
    model = channel_outlier_model()
    calibration, dev = example_waves(0, 3, 16000), example_waves(5, 3, 16000)
    evaluator = Evaluator(model, dev)
    name = CONV.format(2)
    plain_stats = collect_statistics(model, calibration)
    scale = smoothing_scales(channel_maxima(model, calibration, [name])[name],
                             dict(model.named_modules())[name].weight, 0.5)
    smooth_stats = collect_statistics(model, calibration, input_scales={name: scale})
    from sq_pt2e.observers import range_max

    plain = evaluator({name: LayerQuant(range_max(plain_stats[name]), 8, 8)})
    smoothed = evaluator({name: LayerQuant(range_max(smooth_stats[name]), 8, 8, input_scale=scale)})
    assert range_max(smooth_stats[name]) < 0.5 * range_max(plain_stats[name])
    assert smoothed.kl < 0.5 * plain.kl


def test_search_with_smoothing_puts_the_factors_in_the_plan_and_is_deterministic() -> None:
    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    calibration, dev = example_waves(0, 2, 8000), example_waves(5, 2, 8000)
    config = SearchConfig(criterion="kl", smooth_alpha=0.5, refit_ops=())
    plans = []
    for _ in range(2):
        statistics, scales = search_statistics(model, calibration, config)
        plan, _ = search_plan(model, statistics, Evaluator(model, dev), config, input_scales=scales)
        plans.append(plan)
    assert plans[0] == plans[1]
    smoothed = sorted(plans[0].input_scales())
    assert smoothed == sorted(smoothed_layers(model, config)) == [CONV.format(k) for k in range(1, 7)]
    assert QuantPlan.from_dict(json.loads(plans[0].to_json())) == plans[0]
    assert smoothed_layers(model, SearchConfig(smooth_alpha=0.0)) == []
    first = plans[0].resolve(CONV.format(0), "conv1d")  # the waveform's conv stays float (keep_float)
    assert first.skip and "keep_float" in first.reason
    assert [la.name for la in plans[0].layers][:2] == [CONV.format(0), CONV.format(1)]  # graph order


def test_keep_float_patterns_are_checked_and_can_be_emptied() -> None:
    with pytest.raises(ValueError, match="not a regular expression"):
        SearchConfig(keep_float=("conv_layers.(0",))
    model = build_model("tiny-wav2vec2", seed=0)
    names = [m.name for m in searched_modules(model, SearchConfig(keep_float=()))]
    assert CONV.format(0) in names
    assert CONV.format(0) not in [m.name for m in searched_modules(model, SearchConfig())]


def test_bad_input_scales_are_refused_with_the_layer_named() -> None:
    with pytest.raises(PlanError, match="not finite numbers > 0"):
        LayerPlan(CONV.format(1), input_scale=(1.0, -2.0))
    with pytest.raises(PlanError, match="not a default"):
        LayerPlan("*", input_scale=(1.0,))
    with pytest.raises(PlanError, match="one per input"):
        LayerPlan(CONV.format(1), input_scale="1,2")
    model = build_model("tiny-wav2vec2", seed=0)
    (wave,) = example_waves(1, 1, 4000)
    plan = QuantPlan(layers=(LayerPlan(CONV.format(1), op="conv1d", input_scale=(1.0, 2.0)),))
    with pytest.raises(PlanError, match=r"conv_layers\.1\.conv.*2 entries for 32 input channels"):
        quantize_model(model, wave, [wave], plan=plan)
    gm = export_speech_model(model, wave).module()
    with pytest.raises(QuantizationError, match="not in the graph"):
        apply_input_scales(gm, {"wav2vec2.nope": (1.0,)})


def test_skipped_layer_ignores_its_input_scale() -> None:
    layer = LayerPlan(CONV.format(1), op="conv1d", input_scale=(2.0,) * 32)
    plan = QuantPlan(layers=(layer, dataclasses.replace(layer, name=CONV.format(2), skip=True, reason="float")))
    assert list(plan.input_scales()) == [CONV.format(1)]


def test_smoothed_plan_lowers_to_executorch_and_matches_eager_int8() -> None:
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, check_pte, lower_to_xnnpack

    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    calibration, (wave,) = example_waves(2, 2, 4000), example_waves(1, 1, 4000)
    converted = quantize_model(model, wave, calibration, plan=_smoothed_plan(model, calibration),
                               target="xnnpack").converted
    data, report = lower_to_xnnpack(converted, wave)
    checked = check_pte(PteRunner(data, wave.shape[-1], threads=1), converted(wave), wave, report)
    assert checked.cosine >= 0.99


def test_search_shaped_plan_smooths_the_cnn_inputs_like_the_search() -> None:
    from sq_pt2e.recipes import search_shaped_plan

    model = build_model("tiny-wav2vec2", seed=0)
    plan = search_shaped_plan(model, example_waves(3, 1, 4000), "tiny-wav2vec2")
    assert sorted(plan.input_scales()) == [CONV.format(k) for k in range(1, 7)]
    assert plan.default.act_scheme == "affine" and plan.model == "tiny-wav2vec2"
    assert [la.name for la in plan.layers if la.skip] == [CONV.format(0)]


def test_search_refuses_a_smoothing_config_without_the_scales_it_calibrated_with() -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    calibration, dev = example_waves(0, 1, 4000), example_waves(5, 1, 4000)
    with pytest.raises(ValueError, match="no input_scales were given: calibrate with search_statistics"):
        search_plan(model, collect_statistics(model, calibration), Evaluator(model, dev), SearchConfig())


class _PrefersScales:
    """A fake evaluator: KL 0.1 for candidates whose CNN conv 1 carries ``preferred`` factors, else 0.2."""

    def __init__(self, preferred: tuple[float, ...] | None) -> None:
        from sq_pt2e.stablequant import Score

        self.score = Score
        self.preferred = preferred
        self.float_score = Score(None, 0.0)

    def __call__(self, layers: dict[str, LayerQuant]) -> object:
        conv = layers.get(CONV.format(1))
        return self.score(None, 0.1 if conv is not None and conv.input_scale == self.preferred else 0.2)


@pytest.mark.parametrize(("preferred", "chosen"), [(0.75, 0.75), (None, 0.5)])
def test_search_chooses_the_smoothing_strength_whose_plan_scores_best(preferred: float | None,
                                                                      chosen: float) -> None:
    from sq_pt2e.stablequant import run_search

    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    calibration = example_waves(0, 2, 8000)
    config = SearchConfig(criterion="kl", smooth_alphas=(0.5, 0.75, 1.0), refit_ops=(), percentiles=(100.0,))
    scales = {a: search_statistics(model, calibration, dataclasses.replace(config, smooth_alpha=a))[1]
              for a in config.smooth_alphas}
    target = scales[preferred][CONV.format(1)] if preferred is not None else None
    plan, report, calibrated = run_search(model, calibration, _PrefersScales(target), config)
    assert calibrated.smooth_alpha == chosen  # ties go to the earlier alpha
    assert calibrated.input_scales == scales[chosen]
    assert plan.resolve(CONV.format(1), "conv1d").input_scale == scales[chosen][CONV.format(1)]
    assert list(report.smoothing_trials) == ["0.5", "0.75", "1"]
    assert report.evaluations == sum(t["evaluations"] for t in report.smoothing_trials.values())


def test_search_with_one_smoothing_strength_runs_once() -> None:
    from sq_pt2e.stablequant import run_search

    model = build_model("tiny-wav2vec2", seed=0)
    calibration = example_waves(0, 2, 8000)
    config = SearchConfig(criterion="kl", smooth_alphas=(0.5,), refit_ops=(), percentiles=(100.0,))
    _, report, calibrated = run_search(model, calibration, _PrefersScales(None), config)
    assert calibrated.smooth_alpha == 0.5 and report.smoothing_trials == {}
    assert calibrated.input_scales == search_statistics(model, calibration, SearchConfig(smooth_alpha=0.5))[1]


def test_search_collects_its_histograms_with_the_given_collector() -> None:
    """The distributed search passes its own collector: it must see every alpha's smoothing factors."""
    from sq_pt2e.simulate import collect_statistics
    from sq_pt2e.stablequant import run_search

    model = build_model("tiny-wav2vec2", seed=0)
    calibration = example_waves(0, 2, 8000)
    config = SearchConfig(criterion="kl", smooth_alphas=(0.5, 1.0), refit_ops=(), percentiles=(100.0,))
    seen = []

    def collect(m, waves, scales):
        seen.append(scales)
        return collect_statistics(m, waves, input_scales=scales)

    _, _, calibrated = run_search(model, calibration, _PrefersScales(None), config, collect=collect)
    assert seen == [search_statistics(model, calibration, dataclasses.replace(config, smooth_alpha=a))[1]
                    for a in (0.5, 1.0)]
    assert calibrated.input_scales == seen[0]
