"""Collect activation statistics and simulate quantization on the float ``nn.Module``.

The StableQuant search scores many candidate plans. Exporting and converting each
one would dominate its cost, so candidates run as *fake quantization* on the float
model: a forward pre-hook rounds each layer's input to its int grid and the weight
is swapped for its fake-quantized copy. The arithmetic is the same as the eager
``convert_pt2e`` graph (same scales, same round-half-even, same clamps); a test
checks the two agree. Statistics come from the same ``AbsHistogramObserver`` the
PT2E flow uses, so ranges are identical in both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sq_pt2e.errors import PlanError
from sq_pt2e.layer_inputs import watch_layer_inputs
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.observers import (
    AbsHistogram,
    AbsHistogramObserver,
    act_qparams,
    grid_bounds,
    grid_floor,
    merge_histograms,
    outlier_qparams,
    range_for,
    weight_scales,
)
from sq_pt2e.passes.fold_weight_norm import fold_weight_norm
from sq_pt2e.passes.snap_bias_to_int32_grid import int32_bias_grid, snap_to_int32_grid
from sq_pt2e.plan import LayerPlan, OpKind, QuantPlan
from sq_pt2e.reconstruct import RefitWeights
from sq_pt2e.smoothing import inverse_input_scale, scaled_weight

__all__ = [
    "LayerQuant",
    "QuantizableModule",
    "collect_statistics",
    "fake_quantized",
    "layer_product",
    "merge_statistics",
    "plan_layer_quants",
    "quantizable_modules",
    "refit_weights_in_place",
]


@dataclass(frozen=True)
class QuantizableModule:
    """A Conv1d / Linear of the float model with its export-consistent name and op kind."""

    name: str
    op: OpKind
    module: nn.Module


def quantizable_modules(model: nn.Module) -> list[QuantizableModule]:
    """Conv1d / Linear modules of ``model`` (wrapped as for export), in module order."""
    wrapper = to_ctc_logits(model)
    found = []
    for name, module in wrapper.named_modules():
        if isinstance(module, nn.Conv1d):
            found.append(QuantizableModule(name, "grouped_conv1d" if module.groups != 1 else "conv1d", module))
        elif isinstance(module, nn.Linear):
            found.append(QuantizableModule(name, "linear", module))
    return found


@torch.no_grad()
def collect_statistics(model: nn.Module, waves: Iterable[torch.Tensor],
                       input_scales: dict[str, tuple[float, ...]] | None = None) -> dict[str, AbsHistogram]:
    """One calibration pass: the |x| histogram of every quantizable layer's input.

    Args:
        model: float model (a ``*ForCTC`` model or waveform->logits module).
        waves: ``(batch, samples)`` calibration waveforms.
        input_scales: layers whose input is observed as ``x / s`` (:mod:`sq_pt2e.smoothing`).

    Returns:
        ``{layer name: AbsHistogram}`` for every Conv1d / Linear.
    """
    wrapper = to_ctc_logits(model).eval()
    fold_weight_norm(wrapper)
    observers = {m.name: AbsHistogramObserver(layer=m.name) for m in quantizable_modules(wrapper)}

    scales = input_scales or {}
    unknown = sorted(set(scales) - set(observers))
    if unknown:
        raise PlanError(f"input_scale for layers not in the model: {unknown[:5]}")

    def watcher(m: QuantizableModule) -> Callable[[torch.Tensor], object]:
        observer, scale = observers[m.name], scales.get(m.name)
        if scale is None:
            return observer
        inverse = inverse_input_scale(scale, m.module.weight.ndim)
        return lambda x: observer(x * inverse)

    watch_layer_inputs(wrapper, {m.module: watcher(m) for m in quantizable_modules(wrapper)}, waves)
    return {name: obs.histogram() for name, obs in observers.items()}


def merge_statistics(shards: Sequence[dict[str, AbsHistogram]]) -> dict[str, AbsHistogram]:
    """Merge per-shard :func:`collect_statistics` results layer by layer (exactly).

    Raises:
        ValueError: no shards, or shards that saw different layers.
    """
    if not shards:
        raise ValueError("no calibration shards to merge")
    names = list(shards[0])
    if any(set(s) != set(names) for s in shards):
        raise ValueError("calibration shards have different layers: were they collected on the same model?")
    return {name: merge_histograms([s[name] for s in shards]) for name in names}


Grid = tuple[float, int, int, int]  # scale, zero point, quant_min, quant_max


@dataclass(frozen=True)
class LayerQuant:
    """A resolved layer decision for simulation: the activation grid and bit widths.

    ``act_floor`` is the lower end of an affine input grid (None: symmetric ``[-r, r]``);
    ``input_scale`` the per-channel factors of :mod:`sq_pt2e.smoothing` (None: none);
    ``refit`` the layer's reconstructed weight and bias (:mod:`sq_pt2e.reconstruct`; None: its own);
    ``outlier_range`` the second grid of an outlier split (``LayerPlan.outlier_range``; None: clip).
    ``output_grid`` (and ``outlier_output_grid``, of a split's second layer) the int8 grid of
    the layer's output, for targets whose int8 kernels emit int8 (XNNPACK; None: float output,
    as on x86; :mod:`sq_pt2e.output_grids` calibrates them).
    """

    act_range: float
    act_bits: int
    weight_bits: int
    weight_calibration: str = "max"
    act_floor: float | None = None
    input_scale: tuple[float, ...] | None = None
    refit: RefitWeights | None = None
    outlier_range: float | None = None
    output_grid: Grid | None = None
    outlier_output_grid: Grid | None = None

    @classmethod
    def from_plan(cls, layer: LayerPlan, act_range: float, act_floor: float | None = None,
                  refit: RefitWeights | None = None) -> LayerQuant:
        return cls(act_range, layer.act_bits, layer.weight_bits, layer.weight_calibration, act_floor,
                   layer.input_scale, refit, layer.outlier_range)

    def with_refit(self, refit: RefitWeights | None) -> LayerQuant:
        """The same quantization computing with ``refit``'s weight and bias."""
        return dataclasses.replace(self, refit=refit)


def _fake_quant_weight(weight: torch.Tensor, bits: int, calibration: str,
                       layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` on its per-channel int grid, and the grid's scales."""
    qmax = 2 ** (bits - 1) - 1
    scales = weight_scales(weight, qmax, calibration, layer=layer).float()
    zero = torch.zeros(scales.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight.detach(), scales, zero, 0, -qmax, qmax), scales


def _input_grids(quant: LayerQuant) -> tuple[Grid, tuple[tuple[float, float], Grid] | None]:
    """The layer's input grid and, with an outlier split, the interval it covers and the outlier grid."""
    grid = act_qparams(quant.act_range, quant.act_bits, quant.act_floor)
    if quant.outlier_range is None:
        return grid, None
    bounds = grid_bounds(quant.act_range, quant.act_bits, quant.act_floor)
    return grid, (bounds, outlier_qparams(quant.outlier_range, quant.act_bits, quant.act_floor is not None))


def _input_parts(grid: Grid, outliers: tuple[tuple[float, float], Grid] | None, inverse: torch.Tensor | None,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's (smoothed) input on its grid and, if split, its outliers on theirs."""
    x = x if inverse is None else x * inverse
    quantized = torch.fake_quantize_per_tensor_affine(x, *grid)
    if outliers is None:
        return quantized, None
    (low, high), outlier_grid = outliers
    return quantized, torch.fake_quantize_per_tensor_affine(x - x.clamp(low, high), *outlier_grid)


def _quantize_input(grid: Grid, outliers: tuple[tuple[float, float], Grid] | None, inverse: torch.Tensor | None,
                    _module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Forward pre-hook: the layer's input on its grid(s); a split's two parts summed (one product)."""
    quantized, outliers_part = _input_parts(grid, outliers, inverse, args[0])
    return (quantized if outliers_part is None else quantized + outliers_part, *args[1:])


def layer_product(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s conv1d / linear (its stride, padding, groups) of ``x`` with ``weight`` and ``bias``."""
    if isinstance(module, nn.Conv1d):
        return module._conv_forward(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


class _Int8Output:
    """Hooks of a layer whose int8 kernel emits int8 (XNNPACK): the output on its grid; with a
    split, each of the two layers' outputs on its own grid before they are added, as in the graph."""

    def __init__(self, quant: LayerQuant, inverse: torch.Tensor | None) -> None:
        self.grids, self.inverse = _input_grids(quant), inverse
        self.output_grid, self.outlier_output_grid = quant.output_grid, quant.outlier_output_grid
        self.outliers: torch.Tensor | None = None

    def before(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        quantized, self.outliers = _input_parts(*self.grids, self.inverse, args[0])
        return (quantized, *args[1:])

    def after(self, module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        quantized = torch.fake_quantize_per_tensor_affine(output, *self.output_grid)
        if self.outliers is not None:
            product = layer_product(module, self.outliers, module.weight, None)
            quantized = quantized + torch.fake_quantize_per_tensor_affine(product, *self.outlier_output_grid)
            self.outliers = None
        return quantized


@contextlib.contextmanager
def fake_quantized(model: nn.Module, layers: dict[str, LayerQuant]) -> Iterator[nn.Module]:
    """Temporarily fake-quantize the named layers of ``model``; yields the waveform->logits module.

    Weights are restored and hooks removed on exit, also on error. The positional conv's
    weight norm is folded into a plain weight first and stays folded (in place, as
    :func:`~sq_pt2e.export.export_speech_model` does; the outputs are the same).
    """
    wrapper = to_ctc_logits(model).eval()
    fold_weight_norm(wrapper)
    modules = {m.name: m.module for m in quantizable_modules(wrapper)}
    unknown = sorted(set(layers) - set(modules))
    if unknown:
        raise PlanError(f"layers not in the model: {unknown[:5]}")
    saved, saved_biases, handles = {}, {}, []
    with refit_weights_in_place(modules, layers):
        try:
            for name, quant in layers.items():
                module = modules[name]
                saved[name] = weight = module.weight.data
                inverse = None
                if quant.input_scale is not None:
                    weight = scaled_weight(weight, quant.input_scale, layer=name)
                    inverse = inverse_input_scale(quant.input_scale, weight.ndim)
                module.weight.data, scales = _fake_quant_weight(weight, quant.weight_bits, quant.weight_calibration,
                                                                name)
                if quant.output_grid is None:
                    handles.append(module.register_forward_pre_hook(
                        functools.partial(_quantize_input, *_input_grids(quant), inverse)))
                    continue
                hooks = _Int8Output(quant, inverse)
                handles += [module.register_forward_pre_hook(hooks.before), module.register_forward_hook(hooks.after)]
                if module.bias is not None:  # XNNPACK adds it on the int32 grid (passes.snap_bias_to_int32_grid)
                    saved_biases[name] = module.bias
                    step = int32_bias_grid(hooks.grids[0][0], scales)
                    module.bias = nn.Parameter(snap_to_int32_grid(module.bias, step), requires_grad=False)

            yield wrapper
        finally:
            for handle in handles:
                handle.remove()
            for name, weight in saved.items():
                modules[name].weight.data = weight
            for name, bias in saved_biases.items():
                modules[name].bias = bias


@contextlib.contextmanager
def refit_weights_in_place(modules: dict[str, nn.Module], layers: dict[str, LayerQuant]) -> Iterator[None]:
    """Temporarily give each named module with a refit (``LayerQuant.refit``) its reconstructed weight
    and bias, checked against the float weights they replace; restored on exit, also on error."""
    saved = {}
    try:
        for name, quant in layers.items():
            if quant.refit is None:
                continue
            module = modules[name]
            quant.refit.check_source(module.weight.data, module.bias, layer=name)
            saved[name] = (module.weight.data, module.bias)
            module.weight.data = quant.refit.weight
            module.bias = nn.Parameter(quant.refit.bias.clone(), requires_grad=False)
        yield
    finally:
        for name, (weight, bias) in saved.items():
            modules[name].weight.data = weight
            modules[name].bias = bias


def plan_layer_quants(model: nn.Module, plan: QuantPlan, statistics: dict[str, AbsHistogram]) -> dict[str, LayerQuant]:
    """Resolve ``plan`` on ``model`` to simulation settings (quantized layers only).

    A layer's activation range is its plan's fixed ``act_range`` if set, otherwise
    computed from its histogram with the plan's calibration method, exactly as the
    PT2E observer would; likewise the floor of an affine grid.

    Raises:
        PlanError: the plan names layers the model lacks, or quantizes attention (which
            the simulation does not model: run the ``convert_pt2e`` graph instead).
    """
    if plan.attention == "int8":
        raise PlanError("the plan quantizes attention (attention='int8'), which the int8 simulation does not model: "
                        "evaluate the convert_pt2e graph (sq-pt2e eval does) or set attention='float'")
    modules = quantizable_modules(model)
    plan.check_names([m.name for m in modules])
    refits = plan.refit_weights()
    quants = {}
    for m in modules:
        layer = plan.resolve(m.name, m.op)
        if layer.skip:
            continue
        if layer.act_range is not None:
            act_range = layer.act_range
        else:
            if m.name not in statistics:
                raise PlanError(f"layer {m.name!r} has no calibration statistics")
            qmax = 2 ** (layer.act_bits - 1) - 1
            act_range = range_for(statistics[m.name], layer.calibration, qmax, layer.clip_percentile, layer=m.name)
        floor = grid_floor(layer.act_scheme == "affine", layer.act_floor, statistics.get(m.name), act_range,
                           layer=m.name)
        quants[m.name] = LayerQuant.from_plan(layer, act_range, floor, refits.get(m.name))
    return quants
