"""Fake-quant simulation equals the eager convert_pt2e graph, and leaves the model intact."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.baselines import Bits, uniform_plan
from sq_pt2e.errors import PlanError
from sq_pt2e.models import build_model
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.simulate import collect_statistics, fake_quantized, plan_layer_quants, quantizable_modules


def _waves(seed: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 16000, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("arch", ["tiny-wav2vec2", "tiny-hubert"])
@pytest.mark.parametrize(("method", "bits"), [("max", Bits(8, 8)), ("mse", Bits(4, 8)), ("entropy", Bits(6, 6))])
def test_simulation_equals_eager_convert_pt2e(arch: str, method: str, bits: Bits) -> None:
    torch.set_num_threads(1)
    model = build_model(arch, seed=0)
    calibration, wave = _waves(0, 3), _waves(1, 1)[0]
    plan = uniform_plan(method, bits)
    converted = quantize_model(model, wave, calibration, plan=plan, fit_to_cpu=False).converted
    quants = plan_layer_quants(model, plan, collect_statistics(model, calibration))
    with fake_quantized(model, quants) as simulated, torch.no_grad():
        expected = simulated(wave)
    torch.testing.assert_close(converted(wave), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-wav2vec2", "tiny-hubert"])
@pytest.mark.parametrize("act_bits", [8, 6])
def test_affine_simulation_equals_eager_convert_pt2e(arch: str, act_bits: int) -> None:
    torch.set_num_threads(1)
    model = build_model(arch, seed=0)
    calibration, wave = _waves(0, 3), _waves(1, 1)[0]
    plan = QuantPlan(default=LayerPlan("*", act_bits=act_bits, calibration="mse", act_scheme="affine"))
    converted = quantize_model(model, wave, calibration, plan=plan, fit_to_cpu=False).converted
    quants = plan_layer_quants(model, plan, collect_statistics(model, calibration))
    affine = [q for q in quants.values() if q.act_floor is not None]
    assert all(-q.act_range < q.act_floor <= 0.0 for q in affine)
    assert sum(-0.2 < q.act_floor for q in affine) >= 6  # GELU outputs (>= -0.17) feed the CNN convs 1-6
    with fake_quantized(model, quants) as simulated, torch.no_grad():
        expected = simulated(wave)
    torch.testing.assert_close(converted(wave), expected, rtol=0, atol=1e-5)


def test_fake_quantized_restores_weights_and_removes_hooks() -> None:
    model = build_model("tiny-hubert", seed=0)
    wave = _waves(2, 1)[0]
    with torch.no_grad():
        before = model(wave).logits
    quants = plan_layer_quants(model, uniform_plan("max", Bits(4, 4)), collect_statistics(model, _waves(0, 2)))
    with fake_quantized(model, quants) as simulated, torch.no_grad():
        assert not torch.allclose(simulated(wave), before, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(model(wave).logits, before, rtol=0, atol=0)


def test_fake_quantized_rejects_unknown_layers() -> None:
    from sq_pt2e.simulate import LayerQuant

    with pytest.raises(PlanError, match="not in the model"):
        with fake_quantized(build_model("tiny-hubert"), {"hubert.nope": LayerQuant(1.0, 8, 8)}):
            pass


def test_statistics_cover_every_quantizable_layer() -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    statistics = collect_statistics(model, _waves(0, 2))
    assert set(statistics) == {m.name for m in quantizable_modules(model)}
    assert all(h.total > 0 and h.max_abs > 0 for h in statistics.values())


def test_errors_in_simulation_name_the_layer() -> None:
    import numpy as np

    from sq_pt2e.errors import QuantizationError
    from sq_pt2e.observers import AbsHistogram
    from sq_pt2e.simulate import LayerQuant

    model = build_model("tiny-wav2vec2", seed=0)
    layers = quantizable_modules(model)
    target = layers[3]
    statistics = {m.name: AbsHistogram(np.ones(2048), 1.0, 1.0) for m in layers}
    statistics[target.name] = AbsHistogram(np.zeros(2048), 1.0, 0.0)  # never reached by calibration
    with pytest.raises(QuantizationError, match=target.name):
        plan_layer_quants(model, uniform_plan("max", Bits(8, 8)), statistics)
    with torch.no_grad():
        target.module.weight[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match=target.name):
        with fake_quantized(model, {target.name: LayerQuant(1.0, 8, 8)}):
            pass
