"""Range functions against closed-form / numpy answers; AbsHistogramObserver collection and qparams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sq_pt2e.quantizer  # noqa: F401  (registers the quantized_decomposed ops through torchao)
from sq_pt2e.errors import QuantizationError
from sq_pt2e.observers import (
    AbsHistogram,
    AbsHistogramObserver,
    PerChannelMseWeightObserver,
    max_weight_scales,
    mse_weight_scales,
    range_entropy,
    range_for,
    range_max,
    range_mse,
    range_percentile,
)

LAYER = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense"


def _histogram(values: np.ndarray, bins: int = 2048) -> AbsHistogram:
    observer = AbsHistogramObserver(bins=bins)
    observer(torch.as_tensor(values))
    return observer.histogram()


def _uniform_counts(bins: int = 1000, upper: float = 1.0) -> AbsHistogram:
    """The exact histogram of a uniform |x| on [0, upper]: equal counts in every bin."""
    return AbsHistogram(np.full(bins, 10.0), upper, upper)


def _expected_sq_error(x: np.ndarray, clip: float, qmax: int) -> float:
    scale = clip / qmax
    return float(np.mean((x - np.clip(np.round(x / scale), -qmax, qmax) * scale) ** 2))


# ------------------------------------------------------------------ range_max / range_percentile
def test_range_max_is_the_exact_largest_magnitude() -> None:
    values = np.array([0.25, -3.0625, 1.5, 2.0])
    assert range_max(_histogram(values)) == 3.0625


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0, 99.0, 99.95])
def test_percentile_of_an_exact_uniform_histogram_is_p_over_100_of_the_range(percentile: float) -> None:
    assert range_percentile(_uniform_counts(upper=2.0), percentile) == pytest.approx(2.0 * percentile / 100, abs=1e-9)


@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.9])
def test_percentile_of_uniform_samples_matches_numpy_within_one_bin(percentile: float) -> None:
    x = np.random.default_rng(0).uniform(-1.0, 1.0, 100_000)
    hist = _histogram(x)
    expected = np.percentile(np.abs(x), percentile)
    assert abs(range_percentile(hist, percentile) - expected) <= hist.bin_width


def test_percentile_100_is_the_max_and_no_percentile_exceeds_it() -> None:
    hist = _histogram(np.array([0.1, 0.2, 0.7]))
    assert range_percentile(hist, 100.0) == 0.7
    assert range_percentile(hist, 99.999) <= 0.7


@pytest.mark.parametrize("percentile", [0.0, -1.0, 100.5])
def test_percentile_outside_0_100_raises(percentile: float) -> None:
    with pytest.raises(ValueError, match=f"percentile={percentile}"):
        range_percentile(_uniform_counts(), percentile)


# ------------------------------------------------------------------ range_mse
def test_mse_clip_of_uniform_data_at_8_bits_is_about_its_max() -> None:
    # Closed form for |x| ~ U(0, 1): d/dc [(1-c)^3/3 + c^3/(12 q^2)] = 0  ->  c = 2q / (2q + 1).
    hist = _uniform_counts(bins=2048)
    clip = range_mse(hist, 127)
    assert clip == pytest.approx(254 / 255, abs=hist.bin_width)
    assert clip >= 0.99 * hist.max_abs


def test_mse_clip_of_gaussian_data_at_4_bits_matches_a_brute_force_search_well_below_max() -> None:
    x = np.random.default_rng(1).standard_normal(100_000)
    hist = _histogram(x)
    clip = range_mse(hist, 7)
    candidates = np.linspace(0.5, hist.max_abs, 800)
    errors = np.array([_expected_sq_error(x, c, 7) for c in candidates])
    best = float(candidates[errors.argmin()])
    assert clip < 0.7 * hist.max_abs
    assert clip == pytest.approx(best, rel=0.05)
    assert _expected_sq_error(x, clip, 7) <= 1.01 * errors.min()
    assert _expected_sq_error(x, clip, 7) < 0.5 * _expected_sq_error(x, hist.max_abs, 7)


# ------------------------------------------------------------------ range_entropy
def test_entropy_range_is_at_most_the_max_and_clips_laplace_more_than_uniform() -> None:
    rng = np.random.default_rng(2)
    uniform = _histogram(rng.uniform(-1.0, 1.0, 100_000))
    laplace = _histogram(rng.laplace(size=100_000))
    uniform_share = range_entropy(uniform, 127) / uniform.max_abs
    laplace_share = range_entropy(laplace, 127) / laplace.max_abs
    assert 0.0 < uniform_share <= 1.0
    assert 0.0 < laplace_share <= 1.0
    assert laplace_share < uniform_share - 0.05


def test_entropy_range_of_an_empty_histogram_or_too_few_bins_is_the_max() -> None:
    assert range_entropy(AbsHistogram(np.zeros(256), 1.0, 0.0), 127) == 0.0
    few = AbsHistogram(np.ones(64), 1.0, 0.9)
    assert range_entropy(few, 127) == 0.9


# ------------------------------------------------------------------ range_for
def test_range_for_dispatches_to_the_named_function() -> None:
    hist = _uniform_counts(bins=2048)
    assert range_for(hist, "max", 127) == range_max(hist)
    assert range_for(hist, "percentile", 127, 90.0) == range_percentile(hist, 90.0)
    assert range_for(hist, "mse", 7) == range_mse(hist, 7)
    assert range_for(hist, "entropy", 127) == range_entropy(hist, 127)


def test_range_for_rejects_unknown_method_and_percentile_without_value() -> None:
    with pytest.raises(ValueError, match="unknown range method 'kl'"):
        range_for(_uniform_counts(), "kl", 127)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a percentile"):
        range_for(_uniform_counts(), "percentile", 127)


# ------------------------------------------------------------------ histogram collection
def test_histogram_grid_is_the_next_power_of_two_and_counts_every_value() -> None:
    observer = AbsHistogramObserver(bins=8)
    observer(torch.tensor([0.0, -0.5, 1.0, 2.9]))
    hist = observer.histogram()
    assert hist.upper == 4.0  # 2.9 < 2**2
    assert hist.max_abs == pytest.approx(2.9)
    np.testing.assert_array_equal(hist.counts, [1, 1, 1, 0, 0, 1, 0, 0])  # bins 0.5 wide


def test_two_batches_give_exactly_the_histogram_of_the_data_at_once_when_the_range_grows() -> None:
    rng = np.random.default_rng(3)
    small, large = rng.uniform(-0.3, 0.3, 5000), rng.standard_normal(5000) * 40.0
    streamed, at_once = AbsHistogramObserver(bins=256), AbsHistogramObserver(bins=256)
    streamed(torch.as_tensor(small))
    streamed(torch.as_tensor(large))
    at_once(torch.as_tensor(np.concatenate([small, large])))
    assert streamed.histogram().upper == at_once.histogram().upper > 64.0
    np.testing.assert_array_equal(streamed.histogram().counts, at_once.histogram().counts)
    assert streamed.histogram().max_abs == at_once.histogram().max_abs


_batches = hnp.arrays(
    np.float64,
    st.integers(1, 60),
    elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


@settings(max_examples=80, deadline=None)
@given(batches=st.lists(_batches, min_size=1, max_size=4), bins=st.sampled_from([2, 16, 2048]))
def test_histogram_merging_is_exact_for_any_batching(batches: list[np.ndarray], bins: int) -> None:
    streamed, at_once = AbsHistogramObserver(bins=bins), AbsHistogramObserver(bins=bins)
    for batch in batches:
        streamed(torch.as_tensor(batch))
    at_once(torch.as_tensor(np.concatenate(batches)))
    a, b = streamed.histogram(), at_once.histogram()
    assert a.upper == b.upper
    assert a.max_abs == b.max_abs
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.total == sum(len(batch) for batch in batches)


def test_nan_or_inf_in_calibration_raises_naming_the_layer() -> None:
    observer = AbsHistogramObserver(layer=LAYER)
    observer(torch.tensor([1.0, float("nan"), float("inf"), 2.0]))
    with pytest.raises(QuantizationError, match=rf"calibration saw 2 NaN/Inf activation values for layer '{LAYER}'"):
        observer.calculate_qparams()


def test_never_calibrated_observer_raises_naming_the_layer() -> None:
    with pytest.raises(QuantizationError, match=rf"no calibration data reached the observer for layer '{LAYER}'"):
        AbsHistogramObserver(layer=LAYER).calculate_qparams()


def test_all_zero_calibration_raises_naming_the_layer() -> None:
    observer = AbsHistogramObserver(layer=LAYER)
    observer(torch.zeros(10))
    with pytest.raises(QuantizationError, match=rf"range is 0.0 for layer '{LAYER}'"):
        observer.calculate_qparams()


def test_fixed_range_overrides_calibration_even_without_data() -> None:
    scale, zero_point = AbsHistogramObserver(fixed_range=2.54, layer=LAYER).calculate_qparams()
    assert scale.item() == pytest.approx(0.02)
    assert zero_point.item() == 0


def test_non_symmetric_qscheme_is_rejected() -> None:
    with pytest.raises(QuantizationError, match="per-tensor symmetric"):
        AbsHistogramObserver(qscheme=torch.per_tensor_affine)


# ------------------------------------------------------------------ calculate_qparams
@pytest.mark.parametrize(
    ("dtype", "quant_min", "quant_max", "zero_point", "q"),
    [
        (torch.int8, -127, 127, 0, 127),
        (torch.uint8, 0, 254, 127, 127),
        (torch.int8, -7, 7, 0, 7),
        (torch.uint8, 0, 14, 7, 7),
    ],
)
def test_qparams_have_scale_range_over_q_and_the_storage_zero_point(
    dtype: torch.dtype, quant_min: int, quant_max: int, zero_point: int, q: int
) -> None:
    observer = AbsHistogramObserver(dtype=dtype, quant_min=quant_min, quant_max=quant_max)
    observer(torch.tensor([-3.5, 1.0, 0.25]))
    scale, zp = observer.calculate_qparams()
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert scale.item() == pytest.approx(3.5 / q, rel=1e-6)
    assert zp.item() == zero_point


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_observer_uses_the_range_function_of_its_method(method: str) -> None:
    x = torch.as_tensor(np.random.default_rng(4).laplace(size=20_000))
    percentile = 99.0 if method == "percentile" else None
    observer = AbsHistogramObserver(method=method, percentile=percentile)  # type: ignore[arg-type]
    observer(x)
    expected = range_for(observer.histogram(), method, 127, 99.0)  # type: ignore[arg-type]
    assert observer.chosen_range() == expected
    assert observer.calculate_qparams()[0].item() == pytest.approx(expected / 127, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(
    data=hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-100, 100, width=32)),
    storage=st.sampled_from([(torch.int8, -127, 127), (torch.uint8, 0, 254), (torch.int8, -7, 7)]),
)
def test_quantize_dequantize_round_trip_error_is_at_most_half_a_step_inside_the_range(
    data: np.ndarray, storage: tuple[torch.dtype, int, int]
) -> None:
    dtype, quant_min, quant_max = storage
    x = torch.as_tensor(data)
    observer = AbsHistogramObserver(dtype=dtype, quant_min=quant_min, quant_max=quant_max)
    observer(x)
    if observer.histogram().max_abs == 0.0:
        return
    scale, zero_point = (t.item() for t in observer.calculate_qparams())
    q = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)
    dq = torch.ops.quantized_decomposed.dequantize_per_tensor(q, scale, zero_point, quant_min, quant_max, dtype)
    assert float((x - dq).abs().max()) <= scale / 2 * (1 + 1e-5) + 1e-6


# ------------------------------------------------------------------ weight observers
def test_max_weight_scales_are_per_output_channel_max_over_q() -> None:
    weight = torch.tensor([[[0.5, -1.27]], [[0.0, 0.0]], [[2.54, 1.0]]])
    scales = max_weight_scales(weight, 127)
    torch.testing.assert_close(scales, torch.tensor([0.01, 2**-12, 0.02]))


def test_mse_weight_scales_never_have_more_error_than_max_scales() -> None:
    weight = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(5))
    weight[0, 0, 0] = 12.0  # an outlier: clipping it pays off at 4 bits
    flat = weight.reshape(8, -1)

    def error(scales: torch.Tensor) -> torch.Tensor:
        quant = torch.clamp(torch.round(flat / scales[:, None]), -7, 7) * scales[:, None]
        return ((quant - flat) ** 2).sum(dim=1)

    mse, plain = mse_weight_scales(weight, 7), max_weight_scales(weight, 7)
    assert bool((mse <= plain).all())
    assert bool((error(mse) <= error(plain)).all())
    assert error(mse)[0] < error(plain)[0]


def test_per_channel_mse_observer_gives_zero_points_0_and_raises_before_calibration() -> None:
    observer = PerChannelMseWeightObserver(quant_min=-7, quant_max=7)
    with pytest.raises(QuantizationError, match="saw no weight"):
        observer.calculate_qparams()
    weight = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(6))
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    torch.testing.assert_close(scales, mse_weight_scales(weight, 7))
    assert zero_points.tolist() == [0, 0, 0]
