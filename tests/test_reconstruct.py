"""Weight reconstruction: the least-squares refit, its place in the search, the plan file and the graph."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sq_pt2e.baselines import Bits, uniform_plan
from sq_pt2e.errors import PlanError, QuantizationError
from sq_pt2e.models import build_model
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.observers import max_weight_scales, weight_scales
from sq_pt2e.plan import LayerPlan, QuantPlan, refit_file
from sq_pt2e.reconstruct import _columns, _StageRecords, reconstruct_layers, round_to_grid
from sq_pt2e.smoothing import scaled_weight
from sq_pt2e.simulate import collect_statistics, fake_quantized, plan_layer_quants, quantizable_modules
from sq_pt2e.stablequant import Evaluator, Score, SearchConfig, search_plan, search_statistics
from sq_pt2e.testing import example_waves

CONV = "wav2vec2.feature_extractor.conv_layers.{}.conv"
# A coarse grid, so the int8 input error is large enough to correct.
COARSE = Bits(8, 4)


def _refit_setup(arch: str = "tiny-wav2vec2") -> tuple[torch.nn.Module, dict, list[torch.Tensor]]:
    torch.set_num_threads(1)
    model = build_model(arch, seed=0)
    calibration = example_waves(0, 3, 8000)
    quants = plan_layer_quants(model, uniform_plan("max", COARSE), collect_statistics(model, calibration))
    return model, quants, calibration


def _layer_error(model: torch.nn.Module, quants: dict, name: str, waves: list[torch.Tensor]) -> float:
    """Squared error of layer ``name``'s output in the simulated model against the float model's."""
    module = {m.name: m.module for m in quantizable_modules(model)}[name]
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
    try:
        with torch.no_grad():
            for wave in waves:
                model(wave)
            with fake_quantized(model, quants) as simulated:
                for wave in waves:
                    simulated(wave)
    finally:
        handle.remove()
    half = len(outputs) // 2
    return sum(float(((a - b) ** 2).sum()) for a, b in zip(outputs[:half], outputs[half:], strict=True))


def test_refit_lowers_the_layer_output_error_it_minimises() -> None:
    model, quants, calibration = _refit_setup()
    name = CONV.format(1)
    before = _layer_error(model, quants, name, calibration)
    refits = reconstruct_layers(model, quants, [name], calibration, ridge=1e-9)
    after = _layer_error(model, {**quants, name: quants[name].with_refit(refits[name])}, name, calibration)
    assert after < 0.9 * before, (before, after)


def test_refit_with_an_exact_input_gives_back_the_float_weights() -> None:
    # With no quantization upstream and the layer's own input grid fine enough to be nearly
    # exact, the least-squares solution is the float weight itself (and a zero bias).
    model, quants, calibration = _refit_setup()
    name = CONV.format(1)
    exact = {name: dataclasses.replace(quants[name], act_bits=8, act_range=quants[name].act_range)}
    refit = reconstruct_layers(model, exact, [name], calibration, ridge=1e-12)[name]
    weight = {m.name: m.module for m in quantizable_modules(model)}[name].weight
    tolerance = 0.05 * float(weight.detach().abs().max())
    assert torch.allclose(refit.weight, weight.detach(), atol=tolerance)
    assert float(refit.bias.abs().max()) < tolerance


def test_refit_fits_the_rounding_error_not_the_clipping_the_plan_chose() -> None:
    # A grid clipping the input at a third of its range: fitting the clipped input (the default)
    # only corrects rounding and stays near the float weights; fitting the raw input would
    # chase the clipping error of the outliers.
    model, quants, calibration = _refit_setup()
    name = CONV.format(1)
    clipped = {name: dataclasses.replace(quants[name], act_bits=8, act_range=quants[name].act_range / 3)}
    weight = {m.name: m.module for m in quantizable_modules(model)}[name].weight.detach()
    change = {}
    for clip_target in (True, False):
        refit = reconstruct_layers(model, clipped, [name], calibration, clip_target=clip_target)[name]
        change[clip_target] = float((refit.weight - weight).norm() / weight.norm())
    assert change[True] < 0.05 < change[False], change


def test_columns_reproduce_the_convolution() -> None:
    conv = torch.nn.Conv1d(3, 4, kernel_size=3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 3, 11)
    cols = _columns(conv, x)
    weight = torch.cat([conv.weight.reshape(4, -1), conv.bias[:, None]], 1).double()
    expected = conv(x).permute(1, 0, 2).reshape(4, -1).double()
    torch.testing.assert_close(weight @ cols, expected, rtol=1e-5, atol=1e-5)


def _nearest(weight: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(weight / scales[:, None]), -qmax, qmax) * scales[:, None]


def _correlated_inputs(features: int, samples: int, seed: int = 0) -> torch.Tensor:
    """``(features + 1, samples)`` float64 columns (last row ones) with strongly correlated features."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, 4, generator=gen, dtype=torch.float64)
    x = mixing @ torch.randn(4, samples, generator=gen, dtype=torch.float64)
    x += 0.1 * torch.randn(features, samples, generator=gen, dtype=torch.float64) + 0.5
    return torch.cat([x, torch.ones(1, samples, dtype=torch.float64)])


@pytest.mark.parametrize("calibration", ["max", "mse"])
def test_gptq_rounding_lands_on_the_grid_the_quantizer_computes(calibration: str) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.cat([torch.randn(6, 20, generator=gen, dtype=torch.float64),
                        torch.zeros(6, 1, dtype=torch.float64)], 1)
    x = _correlated_inputs(20, 400)
    rounded = round_to_grid(weight, x @ x.T, 4, calibration)
    scales = weight_scales(rounded[:, :-1].float(), 7, calibration).double()
    torch.testing.assert_close(scales, weight_scales(weight[:, :-1].float(), 7, calibration).double(), rtol=1e-6,
                               atol=0)
    steps = rounded[:, :-1] / scales[:, None]
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert float(steps.abs().max()) <= 7 + 1e-4


def test_gptq_rounding_lowers_the_output_error_of_correlated_inputs() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.cat([torch.randn(8, 32, generator=gen, dtype=torch.float64),
                        torch.randn(8, 1, generator=gen, dtype=torch.float64)], 1)
    x = _correlated_inputs(32, 600)
    nearest = torch.cat([_nearest(weight[:, :-1], max_weight_scales(weight[:, :-1].float(), 7).double(), 7),
                         weight[:, -1:]], 1)
    rounded = round_to_grid(weight, x @ x.T, 4, "max")
    error = {name: float(((w - weight) @ x).norm()) for name, w in (("nearest", nearest), ("gptq", rounded))}
    assert error["gptq"] < 0.5 * error["nearest"], error
    assert not torch.equal(rounded[:, -1], weight[:, -1])  # the bias absorbed part of the rounding error


def test_gptq_rounding_of_uncorrelated_inputs_is_round_to_nearest() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.cat([torch.randn(5, 12, generator=gen, dtype=torch.float64),
                        torch.randn(5, 1, generator=gen, dtype=torch.float64)], 1)
    gram = torch.diag(torch.rand(13, generator=gen, dtype=torch.float64) + 0.5)
    rounded = round_to_grid(weight, gram, 4, "max")
    expected = _nearest(weight[:, :-1], max_weight_scales(weight[:, :-1].float(), 7).double(), 7)
    torch.testing.assert_close(rounded[:, :-1], expected)
    torch.testing.assert_close(rounded[:, -1], weight[:, -1])


def test_refit_leaves_the_model_unchanged_and_rejects_unknown_layers() -> None:
    model, quants, calibration = _refit_setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reconstruct_layers(model, quants, [CONV.format(1), CONV.format(2)], calibration)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(PlanError, match="not quantized layers"):
        reconstruct_layers(model, quants, ["wav2vec2.nope"], calibration)
    with pytest.raises(PlanError, match="calibration audio"):
        reconstruct_layers(model, quants, [CONV.format(1)], [])


@pytest.mark.parametrize("arch", ["tiny-wav2vec2", "tiny-hubert"])
def test_replaying_fixed_stages_gives_the_same_refits_and_skips_the_cnn(arch: str, monkeypatch) -> None:
    # Past the CNN encoder, the positional conv and each block, their outputs are replayed, not
    # recomputed: the refits must be exactly those of running the whole model for every layer.
    model, _, calibration = _refit_setup(arch)
    quants = plan_layer_quants(model, uniform_plan("mse", Bits(4, 8)), collect_statistics(model, calibration))
    names = [n for n in quants if "conv_layers.0." not in n and "pos_conv" not in n]
    assert "conv_layers.1." in names[0] and any(".encoder.layers.1." in n for n in names) and names[-1] == "lm_head"
    calls = []
    last_conv = [n for n in names if "conv_layers." in n][-1]
    handle = {m.name: m.module for m in quantizable_modules(model)}[last_conv].register_forward_hook(
        lambda *_: calls.append(1))
    replayed = reconstruct_layers(model, quants, names, calibration, round_weights=True)
    handle.remove()
    # The last CNN conv runs once per wave in each model: when the encoder's outputs are recorded.
    assert len(calls) == 2 * len(calibration), len(calls)
    monkeypatch.setattr(_StageRecords, "advance", lambda self, position, runs: None)
    recomputed = reconstruct_layers(model, quants, names, calibration, round_weights=True)
    for name in names:
        assert torch.equal(replayed[name].weight, recomputed[name].weight), name
        assert torch.equal(replayed[name].bias, recomputed[name].bias), name


class _RefitObjective:
    """A fake evaluator: a candidate's KL is 1, halved when its layers compute with refit weights."""

    def __init__(self, rewards_refit: bool) -> None:
        self.rewards_refit = rewards_refit
        self.float_score = Score(None, 0.0)

    def __call__(self, layers) -> Score:
        refit = any(q.refit is not None for q in layers.values())
        return Score(None, 0.5 if refit == self.rewards_refit else 1.0)


class _RoundingObjective:
    """A fake evaluator: KL 1, 0.5 when the CNN convs compute with refit weights, 0.25 when the Transformer does too."""

    float_score = Score(None, 0.0)

    def __call__(self, layers) -> Score:
        refit = {name for name, q in layers.items() if q.refit is not None}
        return Score(None, 0.25 if any(".encoder.layers." in n for n in refit) else 0.5 if refit else 1.0)


def _search(rewards_refit: bool = True, bits: Bits = COARSE,
            objective: object = None) -> tuple[torch.nn.Module, QuantPlan, object, list[torch.Tensor]]:
    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    calibration = example_waves(0, 3, 8000)
    config = SearchConfig(criterion="kl", weight_bits=bits.weight, act_bits=bits.act, percentiles=(100.0, 99.9))
    statistics, scales = search_statistics(model, calibration, config)
    plan, report = search_plan(model, statistics, objective or _RefitObjective(rewards_refit), config,
                               input_scales=scales, calibration=calibration)
    return model, plan, report, calibration


@pytest.fixture(scope="module")
def searched() -> tuple[torch.nn.Module, QuantPlan, object, list[torch.Tensor]]:
    return _search()


def test_search_refits_the_cnn_convs_and_keeps_them_when_they_help(searched) -> None:
    model, plan, report, _ = searched
    convs = [m.name for m in quantizable_modules(model) if m.op == "conv1d" and m.name != CONV.format(0)]
    assert report.refit_layers == convs
    assert report.refit_kept and report.refit_trial["after"]["kl"] < report.refit_trial["before"]["kl"]
    assert sorted(plan.refit_weights()) == sorted(convs)
    assert all("weights reconstructed" in la.reason for la in plan.layers if la.refit is not None)
    assert report.final_score.kl == pytest.approx(0.5)
    assert report.rounding_trial == {} and not report.rounding_kept  # 8-bit weights: rounding to nearest is enough


@pytest.fixture(scope="module")
def rounded() -> tuple[torch.nn.Module, QuantPlan, object, list[torch.Tensor]]:
    return _search(bits=Bits(4, 8), objective=_RoundingObjective())


def test_search_at_4_weight_bits_gptq_rounds_every_conv_and_linear(rounded) -> None:
    model, plan, report, _ = rounded
    expected = [m.name for m in quantizable_modules(model) if m.op in ("conv1d", "linear") and m.name != CONV.format(0)]
    assert report.rounding_kept and not report.refit_kept
    assert report.rounding_trial["layers"] == expected and report.rounding_trial["after"]["kl"] == pytest.approx(0.25)
    assert sorted(plan.refit_weights()) == sorted(expected)
    assert all("GPTQ-rounded" in la.reason for la in plan.layers if la.refit is not None)
    for layer in plan.layers:
        if layer.refit is None:
            continue
        weight = plan.refits[layer.name].weight
        if layer.input_scale is not None:
            weight = scaled_weight(weight, layer.input_scale)
        steps = weight.reshape(weight.shape[0], -1) / weight_scales(weight, 7, layer.weight_calibration)[:, None]
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3, msg=layer.name)


def _assert_converted_equals_simulated(model: torch.nn.Module, plan: QuantPlan, calibration: list[torch.Tensor],
                                       wave: torch.Tensor) -> torch.Tensor:
    """Check the ``convert_pt2e`` graph of ``plan`` computes what the simulation does; returns the output."""
    converted = quantize_model(model, wave, calibration, plan=plan, fit_to_cpu=False).converted
    with fake_quantized(model, plan_layer_quants(model, plan, {})) as simulated, torch.no_grad():
        expected = simulated(wave)
    torch.testing.assert_close(converted(wave), expected, rtol=0, atol=1e-5)
    return expected


def test_converted_graph_computes_with_the_gptq_rounded_weights(rounded) -> None:
    model, plan, _, calibration = rounded
    _assert_converted_equals_simulated(model, plan, calibration, example_waves(9, 1, 8000)[0])


def test_search_drops_a_refit_that_does_not_help() -> None:
    _, plan, report, _ = _search(rewards_refit=False)
    assert report.refit_layers and not report.refit_kept
    assert plan.refits == {} and all(la.refit is None for la in plan.layers)


def test_the_float_fallback_weighs_each_group_after_reconstruction() -> None:
    """Every candidate that floats a group still computes its remaining CNN convs with refit weights."""
    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    calibration = example_waves(0, 3, 8000)
    config = SearchConfig(criterion="kl", act_bits=4, percentiles=(100.0,), float_share=0.5)
    statistics, scales = search_statistics(model, calibration, config)
    seen = []

    class Recording(_RefitObjective):
        def __call__(self, layers) -> Score:
            seen.append(layers)
            return super().__call__(layers)

    _, report = search_plan(model, statistics, Recording(True), config, input_scales=scales, calibration=calibration)
    searched = max(len(c) for c in seen)
    floating = [c for c in seen if searched / 2 < len(c) < searched]  # one group left float, not a sensitivity trial
    assert len(floating) >= len(report.float_trials) - 1 > 0
    convs = [m.name for m in quantizable_modules(model) if m.op == "conv1d" and m.name != CONV.format(0)]
    assert all(c[n].refit is not None for c in floating for n in convs if n in c)


def test_search_with_refit_is_deterministic(searched) -> None:
    _, plan, _, _ = searched
    again = _search()[1]
    assert again == plan
    assert {n: r.digest for n, r in again.refits.items()} == {n: r.digest for n, r in plan.refits.items()}


def test_search_without_calibration_audio_names_the_remedy() -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    calibration = example_waves(0, 2, 8000)
    config = SearchConfig(criterion="kl")
    statistics, scales = search_statistics(model, calibration, config)
    with pytest.raises(ValueError, match="calibration=waves, or set refit_ops"):
        search_plan(model, statistics, Evaluator(model, calibration), config, input_scales=scales)


def test_refit_halves_the_dev_kl_of_the_shipped_ref_wav2vec2() -> None:
    # The case it is for: a trained wav2vec2 whose CNN convs 1-6 see int8 GELU outputs.
    from sq_pt2e.inputs import load_source
    from sq_pt2e.models import load_model

    torch.set_num_threads(1)
    model = load_model("ref-wav2vec2")
    calibration = [u.wave for u in load_source(None, limit=3)]
    dev = Evaluator(model, [u.wave for u in load_source(None, shipped="synthetic-dev", limit=3)])
    plan = QuantPlan(default=LayerPlan("*", calibration="mse", act_scheme="affine")).with_skipped([CONV.format(0)],
                                                                                                  "reads the waveform")
    quants = plan_layer_quants(model, plan, collect_statistics(model, calibration))
    convs = [m.name for m in quantizable_modules(model) if m.op == "conv1d" and m.name in quants]
    refits = reconstruct_layers(model, quants, convs, calibration)
    before = dev(quants).kl
    after = dev({n: q.with_refit(refits.get(n)) for n, q in quants.items()}).kl
    assert after < 0.5 * before, (before, after)


def test_converted_graph_computes_with_the_refit_weights(searched) -> None:
    model, plan, _, calibration = searched
    wave = example_waves(9, 1, 8000)[0]
    expected = _assert_converted_equals_simulated(model, plan, calibration, wave)
    without = dataclasses.replace(plan, layers=tuple(dataclasses.replace(la, refit=None) for la in plan.layers),
                                  refits={})
    with fake_quantized(model, plan_layer_quants(model, without, {})) as simulated, torch.no_grad():
        assert not torch.allclose(simulated(wave), expected, atol=1e-4)


def test_plan_file_round_trip_keeps_the_refit_weights(searched, tmp_path) -> None:
    _, plan, _, _ = searched
    path = plan.save(tmp_path / "plan.json")
    assert refit_file(path).is_file()
    loaded = QuantPlan.load(path)
    assert loaded == plan
    for name, refit in plan.refits.items():
        assert torch.equal(loaded.refits[name].weight, refit.weight)
        assert torch.equal(loaded.refits[name].bias, refit.bias)


def test_plan_without_its_weights_file_is_refused_clearly(searched, tmp_path) -> None:
    _, plan, _, _ = searched
    path = plan.save(tmp_path / "plan.json")
    refit_file(path).unlink()
    with pytest.raises(PlanError, match="refit.safetensors, which does not exist"):
        QuantPlan.load(path)
    from_json = QuantPlan.from_dict(json.loads(path.read_text()))
    with pytest.raises(PlanError, match="does not hold"):
        from_json.refit_weights()


def test_plan_with_another_weights_file_is_refused(searched, tmp_path) -> None:
    _, plan, _, _ = searched
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    refit_layer = next(la for la in data["layers"] if la["refit"])
    refit_layer["refit"] = "0" * 16
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="do not belong together"):
        QuantPlan.load(path)


def test_refit_plan_on_another_checkpoint_is_refused(searched) -> None:
    _, plan, _, calibration = searched
    other = build_model("tiny-wav2vec2", seed=1)
    with pytest.raises(QuantizationError, match="another checkpoint"):
        quantize_model(other, calibration[0], calibration, plan=plan, fit_to_cpu=False)


def test_skipping_a_refit_layer_drops_its_weights(searched) -> None:
    _, plan, _, _ = searched
    name = next(iter(plan.refits))
    skipped = plan.with_skipped([name], "by hand")
    assert name not in skipped.refits and name not in skipped.refit_weights()
    assert len(skipped.refits) == len(plan.refits) - 1
