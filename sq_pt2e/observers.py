"""Histogram observers for activation quantization, and the range functions over them.

``AbsHistogramObserver`` collects a histogram of |x| on a power-of-two grid
``[0, 2**e]`` with a fixed number of bins, and the most negative value seen. When
data exceed the grid, ``e`` grows and neighbouring bins merge exactly (pairwise
sums), so histograms of different calibration shards merge exactly too
(:func:`merge_histograms`). From one histogram every candidate range is computed
without running calibration again: max, percentile, MSE-optimal and entropy (KL).
Collecting (``forward``) is kept apart from computing (``calculate_qparams`` and
the pure ``range_*`` functions).

The grid of a range ``r`` is symmetric, ``{-q..q} * r / q``, unless a floor ``lo``
(``-r <= lo <= 0``) is given: then the same ``2q + 1`` levels cover ``[lo, r]``
(affine, zero point ``round(-lo / scale)``), which halves the step for inputs that
are one-sided, such as GELU outputs (>= -0.17) feeding the CNN encoder's
convolutions. :func:`act_qparams` is the one place both grids are computed.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchao.quantization.pt2e.observer import HistogramObserver, UniformQuantizationObserverBase

from sq_pt2e.digest import hash_tensor
from sq_pt2e.errors import QuantizationError

__all__ = [
    "ACCUMULATOR_BITS",
    "AbsHistogram",
    "AbsHistogramObserver",
    "FlooredHistogramObserver",
    "act_floor",
    "act_qparams",
    "grid_bounds",
    "grid_floor",
    "outlier_floor",
    "outlier_qparams",
    "PerChannelMseWeightObserver",
    "accumulator_bound",
    "check_accumulator",
    "check_weight",
    "int16_pair_saturates",
    "max_weight_scales",
    "merge_histograms",
    "mse_weight_scales",
    "weight_scales",
    "DEFAULT_BINS",
    "range_entropy",
    "range_for",
    "range_max",
    "range_mse",
    "range_percentile",
]

DEFAULT_BINS = 2048
ACCUMULATOR_BITS = 32  # int8 GEMM / conv kernels (oneDNN, XNNPACK) accumulate in int32
RangeMethod = Literal["max", "percentile", "mse", "entropy"]


@dataclass(frozen=True)
class AbsHistogram:
    """A histogram of |x|: ``counts`` over equal bins of ``[0, upper]``, plus the exact max.

    ``min_value`` is the smallest signed value seen (``None``: not recorded, e.g. a
    statistics file of an older version; such layers get symmetric grids).

    Raises:
        QuantizationError: counts not 1-D, negative or non-finite; ``upper`` or
            ``max_abs`` negative or non-finite; data seen (``max_abs > 0``) on no grid;
            ``min_value`` non-finite or outside ``[-max_abs, max_abs]``.
    """

    counts: np.ndarray  # float64, shape (bins,)
    upper: float
    max_abs: float
    min_value: float | None = None

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        if counts.ndim != 1 or counts.size == 0:
            raise QuantizationError(f"histogram counts must be 1-D and non-empty, got shape {counts.shape}")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise QuantizationError("histogram counts must be finite and non-negative")
        for label, value in (("upper", self.upper), ("max_abs", self.max_abs)):
            if not (math.isfinite(value) and value >= 0.0):
                raise QuantizationError(f"histogram {label}={value!r} (expected a finite value >= 0)")
        if self.max_abs > self.upper and self.upper > 0.0:
            raise QuantizationError(f"histogram max_abs={self.max_abs} lies outside its grid [0, {self.upper}]")
        if self.min_value is not None and not (math.isfinite(self.min_value)
                                               and -self.max_abs <= self.min_value <= self.max_abs):
            raise QuantizationError(f"histogram min_value={self.min_value!r} (expected a finite value within "
                                    f"[-max_abs, max_abs] = [{-self.max_abs}, {self.max_abs}])")

    @property
    def bin_width(self) -> float:
        return self.upper / len(self.counts)

    @property
    def total(self) -> float:
        return float(self.counts.sum())


def merge_histograms(histograms: Sequence[AbsHistogram]) -> AbsHistogram:
    """The histogram of the union of the data behind ``histograms``, exactly.

    ``AbsHistogramObserver`` bins |x| on power-of-two grids ``[0, 2**e]``: a histogram
    on a finer grid is carried to a coarser one by summing neighbouring bins in pairs,
    which is exactly what the observer would have counted there. Counts are sums of
    integers in float64, so the merge equals one observer fed every shard, in any order.

    Args:
        histograms: histograms with the same number of bins (e.g. one per calibration shard).

    Returns:
        The merged histogram (``min_value`` only if every input recorded one).

    Raises:
        ValueError: no histograms, different bin counts, or a grid that is not a power of two.
    """
    if not histograms:
        raise ValueError("no histograms to merge")
    bins = len(histograms[0].counts)
    if any(len(h.counts) != bins for h in histograms):
        raise ValueError(f"histograms have different bin counts: {sorted({len(h.counts) for h in histograms})}")
    upper = max(h.upper for h in histograms)
    counts = np.zeros(bins, dtype=np.float64)
    for hist in histograms:
        if hist.upper == 0.0:  # only zeros were seen: all mass is in bin 0 on every grid
            counts[0] += hist.counts.sum()
            continue
        steps = math.log2(upper / hist.upper)
        if steps != int(steps):
            raise ValueError(f"histogram grid [0, {hist.upper}] is not a power-of-two refinement of [0, {upper}]")
        coarse = hist.counts.astype(np.float64)
        for _ in range(min(int(steps), int(math.log2(bins)) + 1)):  # beyond that, all mass sits in bin 0
            coarse = np.concatenate([coarse.reshape(-1, 2).sum(axis=1), np.zeros(bins // 2)])
        counts += coarse
    mins = [h.min_value for h in histograms]
    min_value = None if any(m is None for m in mins) else min(mins)  # type: ignore[type-var]
    return AbsHistogram(counts, upper, max(h.max_abs for h in histograms), min_value)


def act_floor(hist: AbsHistogram, act_range: float) -> float | None:
    """The affine grid's lower end for ``act_range``: ``max(min x, -act_range)``, at most 0.

    Returns:
        ``None`` when the data are not one-sided enough to gain anything (the floor
        would be ``-act_range``: the symmetric grid) or no minimum was recorded.
    """
    if hist.min_value is None:
        return None
    floor = min(0.0, max(hist.min_value, -act_range))
    return None if floor <= -act_range else floor


def grid_floor(affine: bool, fixed_floor: float | None, hist: AbsHistogram | None, act_range: float,
               *, layer: str = "") -> float | None:
    """The lower end of a layer's grid: None (symmetric), else the fixed floor, else :func:`act_floor`.

    The one rule shared by the PT2E observer and the simulation, so both build the same grid.

    Raises:
        QuantizationError: an affine grid without a fixed floor and without statistics.
    """
    if not affine:
        return None
    if fixed_floor is not None:
        return float(fixed_floor)
    if hist is None:
        raise QuantizationError(f"layer {layer!r} has an affine grid without a fixed floor and no calibration "
                                "statistics")
    return act_floor(hist, act_range)


def act_qparams(act_range: float, bits: int, floor: float | None = None, *,
                unsigned: bool = False, eps: float = float(torch.finfo(torch.float32).eps),
                ) -> tuple[float, int, int, int]:
    """Scale, zero point and integer range of an input-activation grid.

    Args:
        act_range: the largest value the grid covers (max |x| when symmetric).
        bits: activation bits; the grid has ``2q + 1`` levels, ``q = 2**(bits-1) - 1``.
        floor: lower end of an affine grid (``-act_range <= floor <= 0``); None: symmetric.
        unsigned: integers stored as ``{0..2q}`` (x86 oneDNN) instead of ``{-q..q}`` (XNNPACK).
        eps: smallest scale.

    Returns:
        ``(scale, zero_point, quant_min, quant_max)``. Both storages give the same grid.
    """
    q = 2 ** (bits - 1) - 1
    offset = q if unsigned else 0
    if floor is None:
        return max(act_range / q, eps), offset, offset - q, offset + q
    scale = max((act_range - floor) / (2 * q), eps)
    zero = min(2 * q, max(0, round(-floor / scale)))  # levels below zero, as stored from 0
    return scale, zero - q + offset, offset - q, offset + q


def grid_bounds(act_range: float, bits: int, floor: float | None = None,
                outlier_range: float | None = None) -> tuple[float, float]:
    """The interval ``[low, high]`` an input grid covers (values beyond it are clipped); with an
    outlier split (``outlier_range``), the interval the grid and its outlier grid cover together."""
    step, zero, qmin, qmax = act_qparams(act_range, bits, floor)
    low, high = (qmin - zero) * step, (qmax - zero) * step
    if outlier_range is None:
        return low, high
    below = outlier_floor(floor is not None)  # None: the outlier grid reaches below zero too
    return low - (outlier_range if below is None else -below), high + outlier_range


def outlier_floor(affine: bool) -> float | None:
    """Lower end of an outlier-split grid (``LayerPlan.outlier_range``).

    What an affine (one-sided) input grid clips lies above it: ``[0, outlier_range]``;
    a symmetric grid clips both ways: ``[-outlier_range, outlier_range]`` (None: symmetric).
    """
    return 0.0 if affine else None


def outlier_qparams(outlier_range: float, bits: int, affine: bool, *,
                    unsigned: bool = False) -> tuple[float, int, int, int]:
    """Scale, zero point and integer range of an outlier-split grid (see :func:`outlier_floor`)."""
    return act_qparams(outlier_range, bits, outlier_floor(affine), unsigned=unsigned)


def range_max(hist: AbsHistogram) -> float:
    """The largest |x| seen."""
    return hist.max_abs


def range_percentile(hist: AbsHistogram, percentile: float) -> float:
    """The value below which ``percentile`` % of |x| lies (linear inside a bin), capped at max."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile} (expected 0 < p <= 100)")
    if percentile >= 100.0 or hist.total == 0:
        return hist.max_abs
    cumulative = np.cumsum(hist.counts)
    target = hist.total * percentile / 100.0
    index = int(np.searchsorted(cumulative, target, side="left"))
    below = cumulative[index - 1] if index > 0 else 0.0
    inside = hist.counts[index]
    fraction = (target - below) / inside if inside > 0 else 1.0
    return float(min((index + fraction) * hist.bin_width, hist.max_abs))


def range_mse(hist: AbsHistogram, qmax: int, *, affine: bool = False) -> float:
    """The clip ``c`` minimising the expected squared quantization error.

    Error model: values below ``c`` get rounding error ``step**2 / 12`` each, with
    ``step = c / qmax`` on the symmetric grid, or ``(c + min(-min x, c)) / (2 qmax)``
    on the affine grid of :func:`act_floor` (``affine=True``); values above are clipped
    to ``c`` (error ``(x - c)**2``). Values sit at bin centres. Candidates are the bin
    edges (and the exact max).
    """
    counts = hist.counts
    centres = (np.arange(len(counts)) + 0.5) * hist.bin_width
    # Suffix sums over bins at or above candidate edge k: S0, S1, S2 of counts * x^p.
    s0 = np.cumsum(counts[::-1])[::-1]
    s1 = np.cumsum((counts * centres)[::-1])[::-1]
    s2 = np.cumsum((counts * centres**2)[::-1])[::-1]
    edges = np.arange(1, len(counts) + 1) * hist.bin_width  # candidate clip after bin k
    above_s0 = np.append(s0[1:], 0.0)
    above_s1 = np.append(s1[1:], 0.0)
    above_s2 = np.append(s2[1:], 0.0)
    clip_error = above_s2 - 2 * edges * above_s1 + edges**2 * above_s0
    below = hist.total - above_s0
    if affine and hist.min_value is not None:
        step = (edges + np.minimum(max(0.0, -hist.min_value), edges)) / (2 * qmax)
    else:
        step = edges / qmax
    rounding_error = below * step**2 / 12.0
    total_error = clip_error + rounding_error
    best = int(np.argmin(total_error))
    return float(min(edges[best], hist.max_abs))


def range_entropy(hist: AbsHistogram, qmax: int) -> float:
    """The clip minimising KL(P || Q) between the |x| histogram and its quantized version.

    TensorRT-style: P is the histogram up to the candidate clip with the clipped mass
    folded into the last bin; Q merges the unclipped bins (without that mass) into
    ``qmax`` levels and spreads each level back uniformly over P's non-empty bins.
    """
    counts = hist.counts
    bins = len(counts)
    levels = qmax
    if hist.total == 0 or bins <= levels:
        return hist.max_abs
    best_kl, best_end = math.inf, bins
    for end in range(levels, bins + 1):
        sliced = counts[:end]
        p = sliced.astype(np.float64).copy()
        p[-1] += counts[end:].sum()
        nonzero = p > 0
        # Merge into `levels` groups of (nearly) equal width.
        group = (np.arange(end) * levels) // end
        group_sum = np.bincount(group, weights=sliced, minlength=levels)
        group_nonzero = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, group_sum[group] / np.maximum(group_nonzero[group], 1), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        pn, qn = p[nonzero] / p_sum, np.maximum(q[nonzero] / q_sum, 1e-12)
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_kl, best_end = kl, end
    return float(min(best_end * hist.bin_width, hist.max_abs))


def range_for(hist: AbsHistogram, method: RangeMethod, qmax: int, percentile: float | None = None, *,
              layer: str = "") -> float:
    """Dispatch to the range function named by ``method``; the result is always usable.

    Args:
        hist: the layer's |x| histogram.
        method: ``"max"``, ``"percentile"``, ``"mse"`` or ``"entropy"``.
        qmax: largest integer level (127 at 8 bits).
        percentile: for ``method="percentile"``.
        layer: named in error messages.

    Returns:
        A finite range > 0.

    Raises:
        ValueError: unknown method, or a percentile method without a percentile.
        QuantizationError: no calibration data reached the layer (empty histogram),
            or every value it saw was zero or subnormal (a zero range would give scale 0).
    """
    where = f" for layer {layer!r}" if layer else ""
    if method not in ("max", "percentile", "mse", "entropy"):
        raise ValueError(f"unknown range method {method!r} (expected max, percentile, mse or entropy)")
    if method == "percentile" and percentile is None:
        raise ValueError("method='percentile' needs a percentile")
    if hist.total == 0:
        raise QuantizationError(f"no calibration data reached the layer{where}: its range is undefined")
    if method == "max":
        value = range_max(hist)
    elif method == "percentile":
        value = range_percentile(hist, percentile)  # type: ignore[arg-type]
    elif method == "mse":
        value = range_mse(hist, qmax)
    else:
        value = range_entropy(hist, qmax)
    if not (math.isfinite(value) and value > 0.0):
        why = ("all inputs were zero" if hist.max_abs == 0.0 else
               f"max |x| = {hist.max_abs:.3g} is too small for a float grid: the layer's activations vanish")
        raise QuantizationError(f"calibrated activation range is {value}{where} ({why})")
    return value


class FlooredHistogramObserver(HistogramObserver):
    """``HistogramObserver`` of ``max(x, floor)``: for an output whose values below ``floor`` all
    mean the same to the next op (a GELU), so its grid spends no levels on them."""

    def __init__(self, floor: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.floor = floor

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        super().forward(x_orig.detach().clamp(min=self.floor))
        return x_orig


class AbsHistogramObserver(UniformQuantizationObserverBase):
    """Per-tensor activation observer: |x| histogram and min, range chosen by ``method``.

    With ``qscheme=per_tensor_symmetric`` the grid is ``[-r, r]``: zero point 0 on int8
    storage, ``q`` on uint8 storage (what x86 oneDNN kernels take), the same grid
    either way. With ``per_tensor_affine`` it is ``[floor, r]`` (:func:`act_qparams`),
    the floor fixed or taken from the data (:func:`act_floor`).

    Args:
        method: ``"max"``, ``"percentile"``, ``"mse"`` or ``"entropy"``.
        percentile: the percentile for ``method="percentile"``.
        fixed_range: use this range instead of the calibrated one (search results).
        fixed_floor: with the affine qscheme, this lower end instead of the calibrated one.
        bins: histogram bins.
        layer: name used in error messages (set by the quantizer after prepare).
        **kwargs: dtype, qscheme, quant_min, quant_max, eps as set by ``prepare_pt2e``.
    """

    def __init__(
        self,
        method: RangeMethod = "max",
        percentile: float | None = None,
        fixed_range: float | None = None,
        fixed_floor: float | None = None,
        bins: int = DEFAULT_BINS,
        layer: str = "",
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_tensor_symmetric,
        quant_min: int | None = -127,
        quant_max: int | None = 127,
        **kwargs: object,
    ) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        if qscheme not in (torch.per_tensor_symmetric, torch.per_tensor_affine):
            raise QuantizationError(f"AbsHistogramObserver is per tensor (symmetric or affine), got qscheme={qscheme}")
        if fixed_floor is not None and qscheme != torch.per_tensor_affine:
            raise QuantizationError(f"fixed_floor={fixed_floor} needs qscheme=per_tensor_affine, got {qscheme}")
        self.method = method
        self.percentile = percentile
        self.fixed_range = fixed_range
        self.fixed_floor = fixed_floor
        self.bins = bins
        self.layer = layer
        self.register_buffer("counts", torch.zeros(bins, dtype=torch.float64))
        # The histogram covers [0, 2**exponent] once a nonzero value was seen (has_grid).
        self.register_buffer("exponent", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("has_grid", torch.tensor(False))
        self.register_buffer("max_abs", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("min_value", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("nonfinite", torch.tensor(0, dtype=torch.int64))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        signed = x.detach().flatten().to(torch.float64)
        finite = torch.isfinite(signed)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            signed = signed[finite]
            if signed.numel() == 0:
                return x
        values = signed.abs()
        batch_max = float(values.max())
        self.max_abs.fill_(max(float(self.max_abs), batch_max))
        self.min_value.fill_(min(float(self.min_value), float(signed.min())))
        if batch_max > 0.0:
            needed = math.frexp(batch_max)[1]  # smallest e with batch_max < 2**e
            self._grow_to(needed)
        upper = 2.0 ** int(self.exponent)
        # values / upper first: bins / upper overflows when upper is tiny (subnormal data).
        index = torch.clamp(((values / upper) * self.bins).floor().to(torch.int64), max=self.bins - 1)
        self.counts += torch.bincount(index, minlength=self.bins).to(torch.float64)
        return x

    def _grow_to(self, exponent: int) -> None:
        """Widen the grid to ``[0, 2**exponent]``, merging bins pairwise per doubling."""
        current = int(self.exponent)
        if not bool(self.has_grid):
            # Only zeros so far (all in bin 0, valid on any grid): take the new grid as it is.
            self.has_grid.fill_(True)
            self.exponent.fill_(exponent)
            return
        if exponent <= current:
            return
        if float(self.counts.sum()) > 0:
            steps = exponent - current
            counts = self.counts
            for _ in range(min(steps, 64)):
                counts = torch.cat([counts.view(-1, 2).sum(dim=1), torch.zeros(self.bins // 2, dtype=counts.dtype)])
            self.counts.copy_(counts)
        self.exponent.fill_(exponent)

    def histogram(self) -> AbsHistogram:
        """The collected histogram as plain numpy data."""
        upper = 2.0 ** int(self.exponent) if bool(self.has_grid) else 0.0
        seen = math.isfinite(float(self.min_value))
        return AbsHistogram(self.counts.numpy().copy(), upper, float(self.max_abs),
                            float(self.min_value) if seen else None)

    def chosen_range(self) -> float:
        """The largest value the quantization grid will cover (max |x| when symmetric)."""
        if self.fixed_range is not None:
            return float(self.fixed_range)
        where = f" for layer {self.layer!r}" if self.layer else ""
        if int(self.nonfinite) > 0:
            msg = f"calibration saw {int(self.nonfinite)} NaN/Inf activation values{where}"
            raise QuantizationError(msg)
        hist = self.histogram()
        if hist.total == 0:
            msg = f"no calibration data reached the observer{where}: run calibration before convert_pt2e"
            raise QuantizationError(msg)
        return range_for(hist, self.method, (self.quant_max - self.quant_min) // 2, self.percentile, layer=self.layer)

    def chosen_floor(self, act_range: float) -> float | None:
        """The affine grid's lower end (None: symmetric grid)."""
        affine = self.qscheme == torch.per_tensor_affine
        return grid_floor(affine, self.fixed_floor, self.histogram() if affine else None, act_range,
                          layer=self.layer)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        bits = int(math.log2(self.quant_max - self.quant_min + 2))
        act_range = self.chosen_range()
        scale, zero_point, _, _ = act_qparams(act_range, bits, self.chosen_floor(act_range),
                                              unsigned=self.quant_min == 0, eps=float(self.eps))
        return torch.tensor([scale], dtype=torch.float32), torch.tensor([zero_point], dtype=torch.int32)

    def extra_repr(self) -> str:
        return (f"method={self.method}, percentile={self.percentile}, fixed_range={self.fixed_range}, "
                f"fixed_floor={self.fixed_floor}, layer={self.layer!r}")


def check_weight(weight: torch.Tensor, *, layer: str = "") -> None:
    """Refuse weights that cannot be quantized: empty, or holding NaN/Inf.

    Dead output channels (all zero) are fine: their scale is ``eps``, never 0.

    Raises:
        QuantizationError: naming the layer and how many values are bad.
    """
    where = f" of layer {layer!r}" if layer else ""
    if weight.ndim == 0 or weight.numel() == 0:
        raise QuantizationError(f"weight{where} has shape {tuple(weight.shape)}: nothing to quantize")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        channels = int((~finite).reshape(weight.shape[0], -1).any(dim=1).sum())
        msg = f"weight{where} has {int((~finite).sum())} NaN/Inf value(s) in {channels} output channel(s)"
        raise QuantizationError(msg)


def max_weight_scales(weight: torch.Tensor, qmax: int, eps: float = 2**-12, *, layer: str = "") -> torch.Tensor:
    """Per-output-channel symmetric scales ``max|w| / qmax`` (axis 0), at least ``eps``.

    Raises:
        QuantizationError: NaN/Inf or empty weights (see :func:`check_weight`).
    """
    check_weight(weight, layer=layer)
    flat = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
    return torch.clamp(flat / qmax, min=eps)


# mse_weight_scales by weight content: the search and the weight reconstruction simulate the same
# weights many times (ref-hubert W4A8: 5,652 calls, 61 of 272 s of the search before this memo).
_MSE_SCALES: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
_MSE_SCALES_ENTRIES = 4096
_MSE_SCALES_LOCK = threading.Lock()


def mse_weight_scales(weight: torch.Tensor, qmax: int, *, grid: int = 100, max_shrink: float = 0.8,
                      eps: float = 2**-12, layer: str = "") -> torch.Tensor:
    """Per-output-channel scales minimising the squared weight quantization error.

    Grid search over clip factors ``1, 1 - 1/grid, ...`` down to ``1 - max_shrink`` of
    ``max|w|`` per channel, as GPTQ's ``find_params(mse=True)`` does. Results are remembered
    by the weight's content (a SHA-256 of its bytes), so the same weight is searched once.

    Raises:
        QuantizationError: NaN/Inf or empty weights (see :func:`check_weight`).
    """
    flat = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    content = hashlib.sha256()
    hash_tensor(content, flat)
    key = (content.hexdigest(), qmax, grid, max_shrink, eps)
    with _MSE_SCALES_LOCK:
        if key in _MSE_SCALES:
            _MSE_SCALES.move_to_end(key)
            return _MSE_SCALES[key].clone()
    best_scale = max_weight_scales(weight, qmax, eps, layer=layer)
    best_error = torch.full_like(best_scale, float("inf"))
    base = best_scale.clone()
    for step in range(int(max_shrink * grid) + 1):
        scale = torch.clamp(base * (1.0 - step / grid), min=eps)
        quantized = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax) * scale[:, None]
        error = ((quantized - flat) ** 2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    with _MSE_SCALES_LOCK:
        _MSE_SCALES[key] = best_scale.clone()
        while len(_MSE_SCALES) > _MSE_SCALES_ENTRIES:
            _MSE_SCALES.popitem(last=False)
    return best_scale


def weight_scales(weight: torch.Tensor, qmax: int, calibration: str, *, layer: str = "") -> torch.Tensor:
    """Per-output-channel scales of ``weight`` by a plan's ``weight_calibration``: ``"mse"`` or ``"max"``."""
    return (mse_weight_scales if calibration == "mse" else max_weight_scales)(weight, qmax, layer=layer)


class PerChannelMseWeightObserver(UniformQuantizationObserverBase):
    """Per-output-channel symmetric weight observer with MSE-optimal clipping (axis 0)."""

    def __init__(
        self,
        ch_axis: int = 0,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_channel_symmetric,
        quant_min: int | None = -127,
        quant_max: int | None = 127,
        **kwargs: object,
    ) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        if ch_axis != 0 or qscheme != torch.per_channel_symmetric:
            raise QuantizationError("PerChannelMseWeightObserver supports per_channel_symmetric on axis 0 only")
        self.ch_axis = ch_axis
        self.weight: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.weight = w.detach().clone()
        return w

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weight is None:
            raise QuantizationError("weight observer saw no weight: run calibration before convert_pt2e")
        scales = mse_weight_scales(self.weight, (self.quant_max - self.quant_min) // 2)
        return scales, torch.zeros_like(scales, dtype=torch.int32)


def accumulator_bound(reduction: int, weight_bits: int, act_bits: int, *, unsigned_act: bool = False) -> int:
    """Worst-case magnitude of an int accumulator summing ``reduction`` weight x activation products.

    Symmetric signed grids: ``|w| <= 2**(weight_bits-1) - 1``, ``|x|`` likewise; on
    uint8 storage (x86 oneDNN, zero point ``q``) the stored activation reaches ``2q``
    before the zero-point correction, doubling the bound.

    Args:
        reduction: products per output (``in_features``, or ``in_channels / groups * kernel``).
        weight_bits: weight bits (2..8).
        act_bits: activation bits (2..8).
        unsigned_act: activations stored as uint8 with zero point ``q``.
    """
    if reduction < 1 or not 2 <= weight_bits <= 8 or not 2 <= act_bits <= 8:
        raise QuantizationError(f"reduction={reduction}, weight_bits={weight_bits}, act_bits={act_bits} "
                                "(expected reduction >= 1 and 2 <= bits <= 8)")
    qw, qa = 2 ** (weight_bits - 1) - 1, 2 ** (act_bits - 1) - 1
    return reduction * qw * (2 * qa if unsigned_act else qa)


def check_accumulator(layer: str, reduction: int, weight_bits: int, act_bits: int, *,
                      accumulator_bits: int = ACCUMULATOR_BITS, unsigned_act: bool = True) -> None:
    """Raise if the layer's integer accumulation could overflow ``accumulator_bits`` (signed).

    With int32 accumulators this needs more than 66,000 products per output at W8A8
    (uint8 storage), far beyond wav2vec2 / HuBERT layers; lower bit widths only lower
    the bound. The check exists so a model that does exceed it fails loudly.

    Raises:
        QuantizationError: naming the layer, the bound and the accumulator limit.
    """
    bound = accumulator_bound(reduction, weight_bits, act_bits, unsigned_act=unsigned_act)
    limit = 2 ** (accumulator_bits - 1) - 1
    if bound > limit:
        raise QuantizationError(
            f"layer {layer!r}: {reduction} products of W{weight_bits}A{act_bits} can reach {bound}, beyond the "
            f"int{accumulator_bits} accumulator's {limit}; lower its bits or keep it in float"
        )


def int16_pair_saturates(weight_bits: int, act_bits: int) -> bool:
    """Whether AVX2 ``vpmaddubsw`` (u8 x s8 pairs summed into saturating int16) can saturate.

    Two products of a uint8 activation (up to ``2q_a``, zero point ``q_a``) and a
    signed weight (up to ``q_w``) must fit 32767: W8A8 cannot (2 * 254 * 127 = 64516),
    W7A8 can (2 * 254 * 63 = 32004), which is why x86 plans narrow weights to 7 bits
    on CPUs without VNNI.
    """
    return accumulator_bound(2, weight_bits, act_bits, unsigned_act=True) > 2**15 - 1
