"""The methods StableQuant is compared with, each a named recipe with one interface.

``build_method(name, model, calibration, statistics, bits)`` returns a waveform ->
logits callable for accuracy evaluation. Plan-based methods (uniform max,
percentile, MSE, entropy; the "keep the first CNN layers float" recipe) run as
fake-quantized simulation, which equals the eager ``convert_pt2e`` model. The stock
PT2E quantizers (torchao ``X86InductorQuantizer``, ExecuTorch ``XNNPACKQuantizer``)
run as their eager converted graphs; PyTorch dynamic int8 as its quantized modules.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.observers import AbsHistogram
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.quantizer import Target
from sq_pt2e.simulate import fake_quantized, plan_layer_quants, quantizable_modules

__all__ = ["BASELINES", "Baseline", "Bits", "build_method", "uniform_plan", "with_bits"]

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Bits:
    """Weight and activation bit widths, e.g. ``Bits(8, 8)`` for W8A8."""

    weight: int = 8
    act: int = 8

    def __str__(self) -> str:
        return f"W{self.weight}A{self.act}"

    @classmethod
    def parse(cls, text: str) -> Bits:
        """``"W4A8"`` -> ``Bits(4, 8)``."""
        upper = text.upper()
        if not (upper.startswith("W") and "A" in upper):
            raise ValueError(f"bit width {text!r} (expected the form W8A8)")
        weight, act = upper[1:].split("A", 1)
        return cls(int(weight), int(act))


@dataclass(frozen=True)
class Baseline:
    """A comparison method: its name, what it is, and whether it supports other bit widths."""

    name: str
    description: str
    any_bits: bool


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("float32", "the float model", True),
        Baseline("max", "uniform: max |x| calibration for every layer", True),
        Baseline("percentile-99.99", "uniform: 99.99th percentile of |x| for every layer", True),
        Baseline("mse", "uniform: MSE-optimal range for every layer", True),
        Baseline("entropy", "uniform: entropy (KL) calibration for every layer", True),
        Baseline("cnn0-2-float", "CNN layers 0-2 kept float, max calibration elsewhere", True),
        Baseline("x86-inductor-default", "torchao X86InductorQuantizer defaults (8-bit only)", False),
        Baseline("xnnpack-default", "ExecuTorch XNNPACKQuantizer symmetric per-channel defaults (8-bit only)", False),
        Baseline("dynamic-int8", "PyTorch dynamic int8 quantization of Linear layers (8-bit only)", False),
    )
}


def uniform_plan(calibration: str, bits: Bits, *, percentile: float | None = None,
                 keep_float: Sequence[str] = (), model: str = "") -> QuantPlan:
    """Every conv1d / linear with one calibration method; the layers in ``keep_float`` float."""
    default = LayerPlan("*", weight_bits=bits.weight, act_bits=bits.act, calibration=calibration,
                        clip_percentile=percentile)
    plan = QuantPlan(default=default, model=model)
    return plan.with_skipped(list(keep_float), "kept float by the recipe") if keep_float else plan


def _plan_for(name: str, model: nn.Module, bits: Bits) -> QuantPlan:
    if name == "max":
        return uniform_plan("max", bits)
    if name == "percentile-99.99":
        return uniform_plan("percentile", bits, percentile=99.99)
    if name in ("mse", "entropy"):
        return uniform_plan(name, bits)
    if name == "cnn0-2-float":
        first = [m.name for m in quantizable_modules(model) if any(f"conv_layers.{i}." in m.name for i in range(3))]
        return uniform_plan("max", bits, keep_float=first)
    raise KeyError(name)


class _Simulated:
    """Callable running ``model`` with a plan's fake quantization (re-entered per call)."""

    def __init__(self, model: nn.Module, quants: dict) -> None:
        self.model, self.quants = model, quants

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        with fake_quantized(self.model, self.quants) as run, torch.no_grad():
            return run(wave)


def _converted_pt2e(model: nn.Module, calibration: Sequence[torch.Tensor], quantizer: object) -> Forward:
    """The eager ``convert_pt2e`` graph of ``model`` under ``quantizer``, exported for any length."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from sq_pt2e.export import export_speech_model
    from sq_pt2e.passes.fold_weight_norm import folded_copy
    from sq_pt2e.pipeline import calibrate

    exported = export_speech_model(folded_copy(model), calibration[0], dynamic_time=True)
    prepared = prepare_pt2e(exported.module(), quantizer)
    calibrate(prepared, calibration)
    converted = convert_pt2e(prepared)
    return lambda wave: converted(wave)


def build_method(
    name: str,
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    statistics: dict[str, AbsHistogram],
    bits: Bits = Bits(),
    *,
    plan: QuantPlan | None = None,
    target: Target = "x86_inductor",
) -> Forward:
    """A waveform -> logits callable of ``model`` quantized by method ``name``.

    Args:
        name: a key of :data:`BASELINES`, or ``"stablequant"`` with ``plan`` given.
        model: the float model.
        calibration: calibration waveforms (for the stock quantizers).
        statistics: histograms from ``collect_statistics`` (for plan-based methods).
        bits: bit widths; methods with ``any_bits=False`` accept only W8A8.
        plan: the plan of ``"stablequant"``. A plan with int8 attention runs as the eager
            ``convert_pt2e`` graph (the simulation models conv/linear inputs only), calibrated
            on ``calibration``.
        target: the backend whose arithmetic ``"stablequant"`` simulates: with ``"xnnpack"`` every
            int8 layer's output is on its int8 grid too, observed on ``calibration``
            (:mod:`sq_pt2e.output_grids`), as in the ExecuTorch program.
    """
    if name == "stablequant":
        if plan is None:
            raise ValueError("method 'stablequant' needs its plan")
        if plan.attention == "int8":
            if not calibration:
                raise ValueError("a plan with int8 attention needs calibration audio (for q, k and v)")
            from sq_pt2e.quantizer import StableQuantQuantizer

            return _converted_pt2e(model, calibration, StableQuantQuantizer(plan, target=target))
        quants = plan_layer_quants(model, plan, statistics)
        if target == "xnnpack":
            if not calibration:
                raise ValueError("target='xnnpack' needs calibration audio (for the int8 output grids)")
            from sq_pt2e.output_grids import OutputGridCalibrator

            quants = OutputGridCalibrator(model, calibration)(quants)
        return _Simulated(model, quants)
    if name not in BASELINES:
        raise KeyError(f"unknown method {name!r} (known: stablequant, {', '.join(BASELINES)})")
    if not BASELINES[name].any_bits and bits != Bits(8, 8):
        raise ValueError(f"method {name!r} supports W8A8 only, got {bits}")
    if name == "float32":
        wrapper = to_ctc_logits(model).eval()
        return lambda wave: wrapper(wave)
    if name == "x86-inductor-default":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        return _converted_pt2e(model, calibration, quantizer)
    if name == "xnnpack-default":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        return _converted_pt2e(model, calibration, quantizer)
    if name == "dynamic-int8":
        from torch.ao.quantization import quantize_dynamic

        dynamic = quantize_dynamic(copy.deepcopy(to_ctc_logits(model)).eval(), {nn.Linear}, dtype=torch.qint8)
        return lambda wave: dynamic(wave)
    return _Simulated(model, plan_layer_quants(model, _plan_for(name, model, bits), statistics))


def with_bits(plan: QuantPlan, bits: Bits) -> QuantPlan:
    """``plan`` with every layer's (and default's) bit widths replaced by ``bits``."""

    def set_bits(layer: LayerPlan) -> LayerPlan:
        return dataclasses.replace(layer, weight_bits=bits.weight, act_bits=bits.act)

    return plan.map_layer_plans(set_bits)
