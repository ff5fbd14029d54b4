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
    accumulator_bound,
    act_floor,
    check_accumulator,
    int16_pair_saturates,
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


def test_per_channel_qscheme_and_a_floor_on_a_symmetric_grid_are_rejected() -> None:
    with pytest.raises(QuantizationError, match="per tensor"):
        AbsHistogramObserver(qscheme=torch.per_channel_affine)
    with pytest.raises(QuantizationError, match="fixed_floor=-0.1 needs qscheme=per_tensor_affine"):
        AbsHistogramObserver(fixed_floor=-0.1)


@pytest.mark.parametrize(("dtype", "quant_min", "quant_max", "offset"),
                         [(torch.uint8, 0, 254, 0), (torch.int8, -127, 127, -127)])
def test_affine_grid_covers_min_to_range_with_the_same_levels(dtype, quant_min, quant_max, offset) -> None:
    observer = AbsHistogramObserver(dtype=dtype, qscheme=torch.per_tensor_affine, quant_min=quant_min,
                                    quant_max=quant_max, layer=LAYER)
    observer(torch.nn.functional.gelu(torch.linspace(-4.0, 5.0, 1001)))  # one-sided: min -0.17, max 5
    minimum = float(torch.nn.functional.gelu(torch.linspace(-4.0, 5.0, 1001)).min())
    scale, zero_point = observer.calculate_qparams()
    assert scale.item() == pytest.approx((5.0 - minimum) / 254, rel=1e-6)  # half the symmetric step 5/127, nearly
    assert zero_point.item() == round(-minimum / scale.item()) + offset
    assert observer.histogram().min_value == pytest.approx(minimum)


def test_affine_grid_of_two_sided_data_is_the_symmetric_grid() -> None:
    symmetric = AbsHistogramObserver(dtype=torch.uint8, quant_min=0, quant_max=254)
    affine = AbsHistogramObserver(dtype=torch.uint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=254)
    data = torch.linspace(-3.0, 2.0, 101)  # the negative side is the larger: floor = -range
    symmetric(data)
    affine(data)
    assert [t.item() for t in affine.calculate_qparams()] == [t.item() for t in symmetric.calculate_qparams()]


def test_act_floor_is_none_unless_it_narrows_the_grid() -> None:
    hist = AbsHistogram(np.ones(16), 4.0, 4.0, -0.5)
    assert act_floor(hist, 4.0) == -0.5
    assert act_floor(hist, 0.25) is None  # a clip below |min|: the floor would be -range
    assert act_floor(AbsHistogram(np.ones(16), 4.0, 4.0, 1.0), 4.0) == 0.0  # all positive: floor at zero
    assert act_floor(AbsHistogram(np.ones(16), 4.0, 4.0), 4.0) is None  # minimum not recorded


def test_mse_range_of_a_one_sided_histogram_is_wider_on_the_affine_grid() -> None:
    counts = np.exp(-np.arange(2048) / 40.0)  # heavy-ish tail on [0, 8]
    one_sided = AbsHistogram(counts, 8.0, 8.0, -0.17)
    assert range_mse(one_sided, 127, affine=True) > range_mse(one_sided, 127)  # finer steps: clipping costs more
    assert range_mse(AbsHistogram(counts, 8.0, 8.0), 127, affine=True) == range_mse(one_sided, 127)


def test_min_value_outside_the_data_is_refused() -> None:
    with pytest.raises(QuantizationError, match="min_value=-2.0"):
        AbsHistogram(np.ones(4), 1.0, 1.0, -2.0)


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


def test_mse_weight_scales_are_remembered_by_content_not_by_tensor() -> None:
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(8))
    first = mse_weight_scales(weight, 7)
    first.mul_(2)  # the caller's copy: the memo must not change with it
    again = mse_weight_scales(weight.clone(), 7)
    assert torch.equal(again, first / 2)
    changed = weight.clone()
    changed[2] *= 3  # another weight: another search, channel 2's scale triples
    torch.testing.assert_close(mse_weight_scales(changed, 7)[2], 3 * again[2])
    assert not torch.equal(mse_weight_scales(weight, 3), again)  # another grid


def test_per_channel_mse_observer_gives_zero_points_0_and_raises_before_calibration() -> None:
    observer = PerChannelMseWeightObserver(quant_min=-7, quant_max=7)
    with pytest.raises(QuantizationError, match="saw no weight"):
        observer.calculate_qparams()
    weight = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(6))
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    torch.testing.assert_close(scales, mse_weight_scales(weight, 7))
    assert zero_points.tolist() == [0, 0, 0]


# ------------------------------------------------------------------ numerical guards
def test_dead_output_channels_get_a_positive_scale_and_dequantize_to_zero() -> None:
    weight = torch.randn(4, 3, 5)
    weight[1] = 0.0  # a dead channel
    for scales in (max_weight_scales(weight, 127), mse_weight_scales(weight, 127)):
        assert bool(torch.isfinite(scales).all()) and float(scales.min()) > 0.0
        assert scales[1].item() == 2**-12
        q = torch.fake_quantize_per_channel_affine(weight, scales, torch.zeros(4, dtype=torch.int32), 0, -127, 127)
        assert bool(torch.isfinite(q).all()) and float(q[1].abs().max()) == 0.0


def test_all_dead_weights_still_quantize_through_the_mse_observer() -> None:
    observer = PerChannelMseWeightObserver()
    observer(torch.zeros(3, 8))
    scales, zero_points = observer.calculate_qparams()
    assert torch.equal(scales, torch.full((3,), 2**-12)) and int(zero_points.abs().sum()) == 0


def test_non_finite_weights_are_refused_naming_the_layer_and_channels() -> None:
    weight = torch.randn(4, 6)
    weight[0, 1], weight[2, 3], weight[2, 4] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(QuantizationError, match=rf"weight of layer '{LAYER}' has 3 NaN/Inf value\(s\) in 2 output"):
        max_weight_scales(weight, 127, layer=LAYER)
    with pytest.raises(QuantizationError, match="NaN/Inf"):
        mse_weight_scales(weight, 7)
    observer = PerChannelMseWeightObserver()
    observer(weight)
    with pytest.raises(QuantizationError, match="NaN/Inf"):
        observer.calculate_qparams()
    with pytest.raises(QuantizationError, match="nothing to quantize"):
        max_weight_scales(torch.zeros(0, 4), 127)


def test_range_for_refuses_an_unreached_layer_and_an_all_zero_range() -> None:
    empty = AbsHistogram(np.zeros(16), 0.0, 0.0)
    for method in ("max", "percentile", "mse", "entropy"):
        with pytest.raises(QuantizationError, match=rf"no calibration data reached the layer for layer '{LAYER}'"):
            range_for(empty, method, 127, 99.0, layer=LAYER)  # type: ignore[arg-type]
    zeros = _histogram(np.zeros(50))
    for method in ("max", "percentile", "mse", "entropy"):
        with pytest.raises(QuantizationError, match="range is 0.0 .*all inputs were zero"):
            range_for(zeros, method, 127, 99.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("counts", "upper", "max_abs", "message"),
    [
        (np.array([1.0, np.nan]), 1.0, 0.5, "finite and non-negative"),
        (np.array([1.0, -1.0]), 1.0, 0.5, "finite and non-negative"),
        (np.zeros((2, 2)), 1.0, 0.5, "1-D"),
        (np.ones(4), float("inf"), 0.5, "upper=inf"),
        (np.ones(4), 1.0, float("nan"), "max_abs=nan"),
        (np.ones(4), 1.0, 3.0, "outside its grid"),
    ],
)
def test_invalid_histograms_are_refused(counts: np.ndarray, upper: float, max_abs: float, message: str) -> None:
    with pytest.raises(QuantizationError, match=message):
        AbsHistogram(counts, upper, max_abs)


def test_accumulator_bounds_in_closed_form() -> None:
    assert accumulator_bound(3072, 8, 8) == 3072 * 127 * 127
    assert accumulator_bound(3072, 8, 8, unsigned_act=True) == 3072 * 127 * 254
    assert accumulator_bound(10, 4, 2) == 10 * 7 * 1
    with pytest.raises(QuantizationError, match="reduction=0"):
        accumulator_bound(0, 8, 8)


def test_int32_accumulation_overflow_is_refused_naming_the_layer() -> None:
    check_accumulator(LAYER, 6144, 8, 8)  # the positional conv of wav2vec2-base: 48 channels x 128 taps
    limit = (2**31 - 1) // (127 * 254)
    check_accumulator(LAYER, limit, 8, 8)
    with pytest.raises(QuantizationError, match=rf"layer '{LAYER}': {limit + 1} products of W8A8 .* int32"):
        check_accumulator(LAYER, limit + 1, 8, 8)
    check_accumulator(LAYER, limit + 1, 4, 8)  # fewer bits, more headroom
    with pytest.raises(QuantizationError, match="int16"):
        check_accumulator(LAYER, 2, 8, 8, accumulator_bits=16)


def test_int16_pair_saturation_matches_the_w7a8_narrowing_on_avx2() -> None:
    assert int16_pair_saturates(8, 8)
    assert not int16_pair_saturates(7, 8)
    assert not any(int16_pair_saturates(w, a) for w in range(2, 8) for a in range(2, 9))


# ------------------------------------------------------------------ properties of the quantization math
_finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


@settings(max_examples=80, deadline=None)
@given(data=hnp.arrays(np.float32, st.integers(1, 64), elements=_finite), bits=st.integers(2, 8))
def test_symmetric_grid_is_the_same_on_int8_and_uint8_storage(data: np.ndarray, bits: int) -> None:
    x = torch.as_tensor(data)
    top = 2 ** (bits - 1) - 1
    amax = float(x.abs().max())
    if amax == 0.0:
        return
    scale = amax / top
    signed = torch.fake_quantize_per_tensor_affine(x, scale, 0, -top, top)
    unsigned = torch.fake_quantize_per_tensor_affine(x, scale, top, 0, 2 * top)
    torch.testing.assert_close(signed, unsigned, rtol=0, atol=0)


@settings(max_examples=80, deadline=None)
@given(data=hnp.arrays(np.float32, st.integers(2, 64), elements=_finite))
def test_affine_never_has_a_coarser_step_than_symmetric_and_both_round_trip_within_half_a_step(
    data: np.ndarray,
) -> None:
    x = torch.as_tensor(data).double()
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if high - low == 0.0:
        return
    symmetric_scale = max(-low, high) / 127
    affine_scale = (high - low) / 255
    assert affine_scale <= symmetric_scale
    zero_point = int(np.clip(-128 - round(low / affine_scale), -128, 127))
    affine = (torch.clamp(torch.round(x / affine_scale) + zero_point, -128, 127) - zero_point) * affine_scale
    symmetric = torch.clamp(torch.round(x / symmetric_scale), -127, 127) * symmetric_scale
    assert float((x - symmetric).abs().max()) <= symmetric_scale / 2 * (1 + 1e-9)
    assert float((x - affine).abs().max()) <= affine_scale / 2 * (1 + 1e-9)


_samples = hnp.arrays(np.float64, st.integers(20, 400),
                      elements=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False))


@settings(max_examples=60, deadline=None)
@given(values=_samples, shift=st.integers(-8, 8), bins=st.sampled_from([64, 2048]))
def test_every_range_scales_exactly_with_power_of_two_scaling_of_the_data(
    values: np.ndarray, shift: int, bins: int
) -> None:
    if np.abs(values).max() < 1e-6:
        return
    a, b = _histogram(values, bins), _histogram(values * 2.0**shift, bins)
    np.testing.assert_array_equal(a.counts, b.counts)
    for method, percentile in (("max", None), ("percentile", 99.0), ("mse", None), ("entropy", None)):
        expected = range_for(a, method, 127, percentile) * 2.0**shift  # type: ignore[arg-type]
        assert range_for(b, method, 127, percentile) == pytest.approx(expected, rel=1e-12)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(values=_samples, qmax=st.sampled_from([1, 7, 127]))
def test_every_range_is_positive_and_at_most_the_max_and_percentiles_are_monotone(
    values: np.ndarray, qmax: int
) -> None:
    hist = _histogram(values, 256)
    if hist.max_abs == 0.0:
        return
    for method in ("max", "mse", "entropy"):
        assert 0.0 < range_for(hist, method, qmax) <= hist.max_abs  # type: ignore[arg-type]
    ranges = [range_percentile(hist, p) for p in (1.0, 50.0, 90.0, 99.0, 99.9, 100.0)]
    assert ranges == sorted(ranges) and ranges[-1] == hist.max_abs


@settings(max_examples=60, deadline=None)
@given(weight=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 20)), elements=_finite),
       bits=st.integers(2, 8))
def test_per_channel_weight_round_trip_is_within_half_a_step_per_channel(weight: np.ndarray, bits: int) -> None:
    w = torch.as_tensor(weight)
    qmax = 2 ** (bits - 1) - 1
    scales = max_weight_scales(w, qmax)
    dq = torch.fake_quantize_per_channel_affine(w, scales, torch.zeros(len(scales), dtype=torch.int32), 0,
                                                -qmax, qmax)
    error = (w - dq).abs().amax(dim=1)
    assert bool((error <= scales / 2 * (1 + 1e-5) + 1e-7).all())
    mse = mse_weight_scales(w, qmax)
    assert bool((mse <= scales * (1 + 1e-6)).all()) and bool((mse > 0).all())


@pytest.mark.parametrize("tiny", [1e-305, 2.5e-300, 1e-200])
def test_tiny_but_normal_activations_get_a_positive_range_from_every_method(tiny: float) -> None:
    observer = AbsHistogramObserver(bins=256)
    observer(torch.zeros(4, dtype=torch.float64))  # zeros before any nonzero value
    observer(torch.tensor([0.0, tiny, -tiny / 3, tiny / 7], dtype=torch.float64))
    hist = observer.histogram()
    assert hist.max_abs == tiny and hist.total == 8 and hist.upper >= tiny
    for method in ("max", "mse", "entropy"):
        assert 0.0 < range_for(hist, method, 7) <= tiny  # type: ignore[arg-type]


def test_subnormal_activations_are_reported_as_vanishing_not_as_all_zero() -> None:
    observer = AbsHistogramObserver(bins=256)
    observer(torch.tensor([0.0, 5e-324], dtype=torch.float64))
    with pytest.raises(QuantizationError, match="too small for a float grid"):
        range_for(observer.histogram(), "mse", 7)


def test_an_all_zero_layer_still_says_all_inputs_were_zero() -> None:
    observer = AbsHistogramObserver(bins=256)
    observer(torch.zeros(5))
    assert observer.histogram().upper == 0.0
    with pytest.raises(QuantizationError, match="all inputs were zero"):
        range_for(observer.histogram(), "max", 127)
