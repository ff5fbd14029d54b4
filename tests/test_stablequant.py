"""The StableQuant search: planted outliers are found and clipped, plans are deterministic
and re-apply through PT2E exactly as simulated."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sq_pt2e.layer_cost import layer_flops
from sq_pt2e.models import build_model
from sq_pt2e.observers import AbsHistogram, act_floor, range_mse, range_percentile
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.plan import QuantPlan
from sq_pt2e.simulate import LayerQuant, fake_quantized, plan_layer_quants
from sq_pt2e.stablequant import (
    Evaluator,
    Score,
    SearchConfig,
    clip_histogram,
    collect_statistics,
    layer_groups,
    promoted_share_unit,
    promotion_costs,
    search_plan,
)
from sq_pt2e.simulate import quantizable_modules

PLANTED = "wav2vec2.feature_extractor.conv_layers.1.conv"
# the paper's clipping step alone (smoothing, reconstruction and outlier splits have their own tests)
CLIP_ONLY = SearchConfig(criterion="kl", smooth_alpha=0.0, refit_ops=(), split_percentiles=())


def _waves(seed: int, count: int, samples: int = 16000) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, samples, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def planted_model() -> torch.nn.Module:
    """tiny-wav2vec2 whose conv_layers.1 input has rare huge spikes in one channel that
    the next conv ignores: max calibration wastes the grid on them, clipping is free."""
    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    layers = model.wav2vec2.feature_extractor.conv_layers
    with torch.no_grad():
        layers[0].layer_norm.weight[5] = 50.0  # GroupNorm per channel: 50 * N(0,1) - 100 > 0 on ~2% of frames
        layers[0].layer_norm.bias[5] = -100.0
        layers[1].conv.weight[:, 5, :] = 0.0
    return model


@pytest.fixture(scope="module")
def planted_search(planted_model: torch.nn.Module):
    statistics = collect_statistics(planted_model, _waves(1, 4))
    evaluator = Evaluator(planted_model, _waves(2, 3))
    plan, report = search_plan(planted_model, statistics, evaluator, CLIP_ONLY, model_name="t")
    return statistics, plan, report


def test_planted_outlier_layer_is_the_only_sensitive_group(planted_search) -> None:
    _, _, report = planted_search
    assert report.sensitive_groups == [PLANTED]


def test_planted_outlier_is_clipped_below_max_and_improves_kl(planted_search) -> None:
    statistics, plan, report = planted_search
    chosen = report.chosen_percentiles[PLANTED]
    assert chosen < 100.0
    layer = plan.resolve(PLANTED, "conv1d")
    assert layer.calibration == "percentile" and layer.clip_percentile == chosen
    assert layer.act_range < statistics[PLANTED].max_abs / 5
    p100 = report.percentile_trials[PLANTED][0]
    assert p100["percentile"] == 100.0
    assert report.final_score.kl < p100["kl"] / 5


def test_plan_is_never_worse_on_dev_than_mse_ranges_everywhere(planted_model, planted_search) -> None:
    statistics, _, report = planted_search
    all_mse = {}
    for m in quantizable_modules(planted_model):
        act_range = range_mse(statistics[m.name], 127, affine=True)
        all_mse[m.name] = LayerQuant(act_range, 8, 8, act_floor=act_floor(statistics[m.name], act_range))
    assert report.final_score.kl <= Evaluator(planted_model, _waves(2, 3))(all_mse).kl


def test_paper_reading_starts_from_max_ranges_and_always_clips(planted_model) -> None:
    statistics = collect_statistics(planted_model, _waves(1, 4))
    config = SearchConfig(criterion="kl", act_scheme="symmetric", start="max", smooth_alpha=0.0, refit_ops=(),
                          split_percentiles=())
    plan, report = search_plan(planted_model, statistics, Evaluator(planted_model, _waves(2, 3)), config)
    assert not report.kept_mse and set(report.chosen_percentiles) == set(report.sensitive_groups)
    assert all(layer.act_scheme == "symmetric" and layer.act_floor is None for layer in plan.layers)


def test_bad_search_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="act_scheme='asym'"):
        SearchConfig(act_scheme="asym")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start='min'"):
        SearchConfig(start="min")  # type: ignore[arg-type]


def test_non_sensitive_layers_get_mse_ranges(planted_search) -> None:
    _, plan, _ = planted_search
    others = [layer for layer in plan.layers if layer.name != PLANTED and not layer.skip]
    assert others and all(layer.calibration == "mse" and layer.act_range is not None for layer in others)
    assert [layer.name for layer in plan.layers if layer.skip] == ["wav2vec2.feature_extractor.conv_layers.0.conv"]


def test_search_is_deterministic_byte_for_byte(planted_model: torch.nn.Module, planted_search) -> None:
    _, plan, _ = planted_search
    statistics = collect_statistics(planted_model, _waves(1, 4))
    again, _ = search_plan(planted_model, statistics, Evaluator(planted_model, _waves(2, 3)), CLIP_ONLY,
                           model_name="t")
    assert again.to_json() == plan.to_json()


def test_plan_json_round_trip_keeps_search_evidence(planted_search, tmp_path) -> None:
    _, plan, _ = planted_search
    path = plan.save(tmp_path / "plan.json")
    loaded = QuantPlan.load(path)
    assert loaded == plan
    assert dict(loaded.resolve(PLANTED, "conv1d").evidence)["sensitivity_kl"] > 0


def test_searched_plan_through_pt2e_equals_simulation(planted_model: torch.nn.Module, planted_search) -> None:
    _, plan, _ = planted_search
    wave = _waves(3, 1)[0]
    converted = quantize_model(planted_model, wave, _waves(1, 1), plan=plan, fit_to_cpu=False).converted
    quants = plan_layer_quants(planted_model, plan, {})  # every range and floor is fixed in the plan
    assert any(q.act_floor is not None for q in quants.values())  # affine grids are part of what is compared
    with fake_quantized(planted_model, quants) as simulated, torch.no_grad():
        expected = simulated(wave)
    torch.testing.assert_close(converted(wave), expected, rtol=0, atol=1e-5)


def test_block_granularity_groups_transformer_layers_and_keeps_cnn_layers_apart() -> None:
    modules = [m for m in quantizable_modules(build_model("tiny-hubert")) if m.op != "grouped_conv1d"]
    groups = layer_groups(modules, "block")
    assert len(groups["hubert.encoder.layers.0"]) == 6
    assert groups["hubert.feature_extractor.conv_layers.3.conv"] == ["hubert.feature_extractor.conv_layers.3.conv"]
    assert len(layer_groups(modules, "layer")) == len(modules)


def test_clip_histogram_moves_mass_into_the_clip_bin() -> None:
    import numpy as np

    hist = AbsHistogram(np.array([4.0, 3.0, 2.0, 1.0]), upper=4.0, max_abs=3.5)
    clipped = clip_histogram(hist, 1.5)
    assert clipped.counts.tolist() == [4.0, 6.0, 0.0, 0.0]
    assert clipped.total == hist.total and clipped.max_abs == 1.5
    assert range_percentile(clipped, 100.0) == 1.5


def test_search_config_rejects_bad_percentiles() -> None:
    with pytest.raises(ValueError, match="percentiles"):
        SearchConfig(percentiles=(100.0, 101.0))
    with pytest.raises(ValueError, match="percentiles"):
        SearchConfig(percentiles=())


def test_evaluator_rejects_mismatched_references() -> None:
    with pytest.raises(ValueError, match="references"):
        Evaluator(build_model("tiny-hubert"), _waves(0, 2), references=["A"])


class _CoupledObjective:
    """A fake evaluator whose KL couples two CNN layers: conv 1's best range follows conv 2's.

    ``kl = 0.001 + 10 (x1 - x2)**2 + 100 (x2 - 0.3)**2`` with ``x = range / max``; every
    other layer is flat. The greedy first pass fits conv 1 to conv 2's starting (MSE)
    range, then moves conv 2, so only a second pass can bring conv 1 along.
    """

    first = "wav2vec2.feature_extractor.conv_layers.1.conv"
    second = "wav2vec2.feature_extractor.conv_layers.2.conv"

    def __init__(self, statistics: dict[str, AbsHistogram]) -> None:
        self.statistics = statistics
        self.float_score = Score(None, 0.0)
        self.evaluations = 0

    def __call__(self, layers) -> Score:
        self.evaluations += 1
        x = {n: layers[n].act_range / self.statistics[n].max_abs for n in (self.first, self.second) if n in layers}
        kl = 0.001
        if len(x) == 2:
            kl += 10 * (x[self.first] - x[self.second]) ** 2
        if self.second in x:
            kl += 100 * (x[self.second] - 0.3) ** 2
        return Score(None, kl)


@pytest.fixture(scope="module")
def coupled_searches(planted_model: torch.nn.Module):
    statistics = collect_statistics(planted_model, _waves(1, 4))
    percentiles = (100.0, 99.9, 99.5, 99.0, 98.0, 95.0, 90.0, 80.0)
    results = {}
    for passes in (1, 4):
        config = SearchConfig(criterion="kl", kl_share=0.0, smooth_alpha=0.0, refit_ops=(), split_percentiles=(),
                              percentiles=percentiles, passes=passes)
        results[passes] = search_plan(planted_model, statistics, _CoupledObjective(statistics), config)
    return results


def test_later_passes_never_worsen_the_dev_score_and_record_what_they_changed(coupled_searches) -> None:
    (_, one), (plan, more) = coupled_searches[1], coupled_searches[4]
    assert one.refinements == []
    assert more.final_score.kl < one.final_score.kl
    assert more.refinements and {r["group"] for r in more.refinements} >= {_CoupledObjective.first}
    assert all(r["pass"] > 1 and r["from"] != r["to"] for r in more.refinements)
    chosen = more.chosen_percentiles.get(_CoupledObjective.first)
    assert plan.resolve(_CoupledObjective.first, "conv1d").clip_percentile == chosen


def test_a_pass_that_changes_nothing_ends_the_search(coupled_searches) -> None:
    _, more = coupled_searches[4]
    passes_run = max(r["pass"] for r in more.refinements) + 1  # the pass after the last change changes nothing
    assert passes_run < 4
    per_pass = len(more.sensitive_groups) * (1 + 8)  # the MSE range and 8 percentiles per group
    sensitivity = 1 + len(more.sensitivity)  # all-max, then each group alone
    assert more.evaluations == sensitivity + passes_run * per_pass + 1  # + the final score


def test_passes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="passes=0"):
        SearchConfig(passes=0)


def test_weight_ranges_are_mse_at_four_bits_and_max_above_unless_set() -> None:
    assert SearchConfig(weight_bits=4).resolved_weight_calibration == "mse"
    assert SearchConfig(weight_bits=6).resolved_weight_calibration == "max"
    assert SearchConfig(weight_bits=8).resolved_weight_calibration == "max"
    assert SearchConfig(weight_bits=8, weight_calibration="mse").resolved_weight_calibration == "mse"
    assert SearchConfig(weight_bits=4, weight_calibration="max").resolved_weight_calibration == "max"
    with pytest.raises(ValueError, match="weight_calibration='minmax'"):
        SearchConfig(weight_calibration="minmax")  # type: ignore[arg-type]


def test_a_four_bit_plan_records_mse_weight_ranges(planted_model: torch.nn.Module) -> None:
    statistics = collect_statistics(planted_model, _waves(1, 2))
    config = SearchConfig(criterion="kl", smooth_alpha=0.0, refit_ops=(), split_percentiles=(), weight_bits=4, passes=1)
    plan, _ = search_plan(planted_model, statistics, Evaluator(planted_model, _waves(2, 2)), config)
    quantized = [layer for layer in plan.layers if not layer.skip]
    assert quantized and all(layer.weight_calibration == "mse" and layer.weight_bits == 4 for layer in quantized)


class _WeightBitsObjective:
    """A fake evaluator: each layer adds ``cost[layer]`` to the KL while its weights have fewer than 8 bits."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.cost, self.float_score, self.evaluations = cost, Score(None, 0.0), 0

    def __call__(self, layers) -> Score:
        self.evaluations += 1
        return Score(None, 0.001 + sum(c for n, c in self.cost.items() if n in layers and layers[n].weight_bits < 8))


SMALL_GROUP = "wav2vec2.feature_extractor.conv_layers.2.conv"
LARGE_GROUP = "wav2vec2.encoder.layers.0"


def _mixed_search(model: torch.nn.Module, share: float, target: str = "x86_inductor"):
    statistics = collect_statistics(model, _waves(1, 2))
    modules = quantizable_modules(model)
    block = [m.name for m in modules if m.name.startswith(LARGE_GROUP + ".")]
    cost = {SMALL_GROUP: 1.0, **{n: 0.5 / len(block) for n in block}}  # the block gains 0.5 in all
    config = SearchConfig(criterion="kl", kl_share=1.0, smooth_alpha=0.0, refit_ops=(), weight_bits=4,
                          promote_weight_bits=8, promote_share=share, target=target)
    calibration = _waves(1, 2) if target == "xnnpack" else None  # for the .pte's output grids
    return search_plan(model, statistics, _WeightBitsObjective(cost), config, calibration=calibration)


def test_mixed_precision_promotes_the_best_gain_per_weight_within_the_share(planted_model: torch.nn.Module) -> None:
    _, report = _mixed_search(planted_model, 1.0)
    assert report.promoted_groups == [SMALL_GROUP, LARGE_GROUP]  # gain per weight order; zero-gain groups stay
    sizes = {g: trial["weights"] for g, trial in report.promotion_trials.items()}
    total = sum(sizes.values())
    assert report.promoted_share == pytest.approx((sizes[SMALL_GROUP] + sizes[LARGE_GROUP]) / total)
    assert report.final_score.kl == pytest.approx(0.001)
    tight = (sizes[SMALL_GROUP] + sizes[LARGE_GROUP] - 1) / total  # both do not fit: the small one goes first
    plan, report = _mixed_search(planted_model, tight)
    assert report.promoted_groups == [SMALL_GROUP] and report.final_score.kl == pytest.approx(0.501)
    promoted = plan.resolve(SMALL_GROUP, "conv1d")
    assert (promoted.weight_bits, promoted.weight_calibration) == (8, "max") and "mixed precision" in promoted.reason
    other = next(layer for layer in plan.layers if layer.name.startswith(LARGE_GROUP + "."))
    assert (other.weight_bits, other.weight_calibration) == (4, "mse")


def test_promotions_for_the_pte_count_only_the_weights_it_packs(planted_model: torch.nn.Module) -> None:
    """The .pte stores conv weights in int8 bytes at any width: promoting the conv group is free there."""
    modules = quantizable_modules(planted_model)
    config = SearchConfig(weight_bits=4, promote_weight_bits=8, target="xnnpack")
    costs = promotion_costs(modules, config)
    assert all(costs[m.name] == (m.module.weight.numel() if m.op == "linear" else 0) for m in modules)
    assert set(promotion_costs(modules, dataclasses.replace(config, weight_bits=6)).values()) == {0}  # 6 bits: int8
    x86 = promotion_costs(modules, dataclasses.replace(config, target="x86_inductor"))
    assert all(x86[m.name] == m.module.weight.numel() for m in modules)
    assert promoted_share_unit("xnnpack") == "the weights the .pte packs"
    _, x86_report = _mixed_search(planted_model, 0.0)
    assert x86_report.promoted_groups == []
    _, pte_report = _mixed_search(planted_model, 0.0, target="xnnpack")
    assert pte_report.promoted_groups == [SMALL_GROUP] and pte_report.promoted_share == 0.0
    assert pte_report.promotion_trials[SMALL_GROUP]["weights"] == 0.0


def test_a_mixed_plan_through_pt2e_equals_simulation(planted_model: torch.nn.Module) -> None:
    plan, report = _mixed_search(planted_model, 1.0)
    assert {layer.weight_bits for layer in plan.layers if not layer.skip} == {4, 8}
    wave = _waves(3, 1)[0]
    converted = quantize_model(planted_model, wave, _waves(1, 1), plan=plan, fit_to_cpu=False).converted
    with fake_quantized(planted_model, plan_layer_quants(planted_model, plan, {})) as simulated, torch.no_grad():
        expected = simulated(wave)
    torch.testing.assert_close(converted(wave), expected, rtol=0, atol=1e-5)


class _QuantizedLayerObjective:
    """A fake evaluator: each layer adds ``cost[layer]`` to the KL while it is quantized (in the candidate)."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.cost, self.float_score, self.evaluations = cost, Score(None, 0.0), 0

    def __call__(self, layers) -> Score:
        self.evaluations += 1
        return Score(None, 0.001 + sum(c for n, c in self.cost.items() if n in layers))


def _fallback_search(model: torch.nn.Module, share: float):
    statistics = collect_statistics(model, _waves(1, 2))
    block = [m.name for m in quantizable_modules(model) if m.name.startswith(LARGE_GROUP + ".")]
    cost = {SMALL_GROUP: 1.0, **{n: 0.5 / len(block) for n in block}}
    config = SearchConfig(criterion="kl", kl_share=1.0, smooth_alpha=0.0, refit_ops=(), float_share=share)
    return search_plan(model, statistics, _QuantizedLayerObjective(cost), config)


def test_float_fallback_keeps_the_best_gain_per_flop_in_float_within_the_share(planted_model: torch.nn.Module) -> None:
    _, report = _fallback_search(planted_model, 1.0)
    flops = {g: trial["flops"] for g, trial in report.float_trials.items()}
    gain = {SMALL_GROUP: 1.0, LARGE_GROUP: 0.5}
    assert report.float_groups == sorted(gain, key=lambda g: -gain[g] / flops[g])  # zero-gain groups stay int8
    assert report.kept_float_share == pytest.approx(sum(flops[g] for g in gain) / sum(flops.values()))
    assert report.final_score.kl == pytest.approx(0.001)
    first, second = report.float_groups
    plan, report = _fallback_search(planted_model, (flops[first] + flops[second] - 1) / sum(flops.values()))
    assert report.float_groups == [first] and report.final_score.kl == pytest.approx(0.001 + gain[second])
    floated = [layer for layer in plan.layers if layer.name == first or layer.name.startswith(first + ".")]
    assert floated and all(layer.skip and "float fallback" in layer.reason for layer in floated)
    assert not any(layer.skip for layer in plan.layers if layer.name.startswith(second))


class _OffsettingObjective:
    """Two groups whose int8 errors offset each other: either quantized alone costs 1.0, both 0.3."""

    def __init__(self, first: list[str], second: list[str]) -> None:
        self.first, self.second, self.float_score, self.evaluations = first, second, Score(None, 0.0), 0

    def __call__(self, layers) -> Score:
        self.evaluations += 1
        first, second = any(n in layers for n in self.first), any(n in layers for n in self.second)
        return Score(None, 0.001 + (0.3 if first and second else 1.0 if first or second else 0.0))


def test_float_fallback_floats_offsetting_sensitive_groups_together(planted_model: torch.nn.Module) -> None:
    statistics = collect_statistics(planted_model, _waves(1, 2))
    block = [m.name for m in quantizable_modules(planted_model) if m.name.startswith(LARGE_GROUP + ".")]
    config = SearchConfig(criterion="kl", kl_share=0.2, smooth_alpha=0.0, refit_ops=(), split_percentiles=(),
                          float_share=1.0)
    plan, report = search_plan(planted_model, statistics, _OffsettingObjective([SMALL_GROUP], block), config)
    joint = f"{SMALL_GROUP} + {LARGE_GROUP}"
    assert set(report.kept_mse) == {SMALL_GROUP, LARGE_GROUP}  # no clip percentile helps either
    assert report.float_trials[SMALL_GROUP]["kl"] > 0.3  # floating one alone makes it worse
    assert report.float_groups == [joint] and report.final_score.kl == pytest.approx(0.001)
    floated = [layer for layer in plan.layers if layer.skip and "float fallback" in layer.reason]
    assert {layer.name for layer in floated} == {SMALL_GROUP, *block}
    assert all(joint in layer.reason for layer in floated)


def test_a_float_fallback_plan_through_pt2e_leaves_those_layers_float(planted_model: torch.nn.Module) -> None:
    plan, report = _fallback_search(planted_model, 1.0)
    wave = _waves(3, 1)[0]
    quantized = quantize_model(planted_model, wave, _waves(1, 1), plan=plan, fit_to_cpu=False)
    status = {s.name: s.status for s in quantized.layer_status}
    assert status[SMALL_GROUP] != "int8" and status[f"{LARGE_GROUP}.attention.q_proj"] != "int8"
    assert status["wav2vec2.feature_extractor.conv_layers.1.conv"] == "int8"
    with fake_quantized(planted_model, plan_layer_quants(planted_model, plan, {})) as simulated, torch.no_grad():
        expected = simulated(wave)
    torch.testing.assert_close(quantized.converted(wave), expected, rtol=0, atol=1e-5)


def test_layer_flops_counts_a_linear_per_frame() -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    name = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense"
    layer = model.get_submodule(name)
    frames = model(torch.zeros(1, 16000)).logits.shape[1]
    assert layer_flops(model, [name]) == {name: 2 * frames * layer.in_features * layer.out_features}
    with pytest.raises(KeyError, match="no_such_layer"):
        layer_flops(model, ["no_such_layer"])


def test_mixed_precision_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="promote_weight_bits=4"):
        SearchConfig(weight_bits=4, promote_weight_bits=4)
    with pytest.raises(ValueError, match="promote_weight_bits=9"):
        SearchConfig(weight_bits=4, promote_weight_bits=9)
    with pytest.raises(ValueError, match="promote_share=1.5"):
        SearchConfig(weight_bits=4, promote_weight_bits=8, promote_share=1.5)
    with pytest.raises(ValueError, match="float_share=-0.1"):
        SearchConfig(float_share=-0.1)
