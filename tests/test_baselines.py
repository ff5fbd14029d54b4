"""Every comparison method builds a waveform -> logits callable; bit-width rules hold."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.baselines import BASELINES, Bits, build_method, uniform_plan, with_bits
from sq_pt2e.models import build_model
from sq_pt2e.simulate import collect_statistics


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(1, 16000, generator=generator) for _ in range(2)]
    return model, calibration, collect_statistics(model, calibration)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_gives_logits_close_to_float(setup, name: str) -> None:
    model, calibration, statistics = setup
    wave = torch.randn(1, 20000, generator=torch.Generator().manual_seed(1))
    reference = build_method("float32", model, calibration, statistics)(wave)
    logits = build_method(name, model, calibration, statistics)(wave)
    assert logits.shape == reference.shape == (1, 62, 32)
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99


def test_fixed_width_baselines_reject_other_bit_widths(setup) -> None:
    model, calibration, statistics = setup
    with pytest.raises(ValueError, match="W8A8 only"):
        build_method("x86-inductor-default", model, calibration, statistics, Bits(4, 8))


def test_cnn_recipe_keeps_first_three_conv_layers_float(setup) -> None:
    from sq_pt2e.baselines import _plan_for

    model, _, _ = setup
    plan = _plan_for("cnn0-2-float", model, Bits())
    skipped = sorted(layer.name for layer in plan.layers if layer.skip)
    assert skipped == [f"wav2vec2.feature_extractor.conv_layers.{i}.conv" for i in range(3)]


def test_bits_parse_and_with_bits() -> None:
    assert Bits.parse("w4a8") == Bits(4, 8) and str(Bits(6, 6)) == "W6A6"
    with pytest.raises(ValueError, match="W8A8"):
        Bits.parse("8bit")
    plan = with_bits(uniform_plan("max", Bits()), Bits(4, 4))
    assert plan.default.weight_bits == 4 and all(d.act_bits == 4 for d in plan.op_defaults)


def test_unknown_method_is_named_in_the_error(setup) -> None:
    model, calibration, statistics = setup
    with pytest.raises(KeyError, match="unknown method 'fancy'"):
        build_method("fancy", model, calibration, statistics)
