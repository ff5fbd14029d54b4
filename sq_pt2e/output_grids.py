"""The int8 output grids of XNNPACK's layers, for simulating candidates on the ExecuTorch target.

XNNPACK's int8 convolutions and fully connected layers emit int8, so the ``xnnpack`` target
quantizes every int8 layer's output too (``quantizer.output_qspec``: a histogram observer,
affine int8), and with an outlier split each of the two layers' outputs before they are
added. Those outputs are observed in float during calibration (as every PT2E observer is), so
they depend on a candidate only through a split's clamp interval and reconstructed weights.
:class:`OutputGridCalibrator` observes them with the same observer on the same calibration
audio and adds them to candidates (``LayerQuant.output_grid``), once per distinct layer setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from sq_pt2e.export import export_speech_model
from sq_pt2e.graph import GELU_FLOOR, feeds_only_gelu, find_quantizable_layers
from sq_pt2e.layer_inputs import watch_layer_inputs
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.observers import grid_bounds
from sq_pt2e.passes.fold_weight_norm import fold_weight_norm
from sq_pt2e.quantizer import output_qspec
from sq_pt2e.simulate import Grid, LayerQuant, layer_product, quantizable_modules, refit_weights_in_place
from sq_pt2e.smoothing import inverse_input_scale, scaled_weight

__all__ = ["OutputGridCalibrator", "gelu_fed_layers"]

_Key = tuple[object, ...]


def _output_observer(floor: float | None) -> torch.nn.Module:
    spec = output_qspec(floor)
    return spec.observer_or_fake_quant_ctr.with_args(dtype=spec.dtype, quant_min=spec.quant_min,
                                                     quant_max=spec.quant_max, qscheme=spec.qscheme)()


def _grid(observer: torch.nn.Module) -> Grid:
    scale, zero_point = observer.calculate_qparams()
    return float(scale), int(zero_point), int(observer.quant_min), int(observer.quant_max)


def _key(name: str, quant: LayerQuant, refits: tuple[tuple[str, str], ...]) -> _Key:
    """What a layer's float outputs depend on: its split interval (in smoothed units) and the
    candidate's reconstructed weights (its own and those before it)."""
    split = None
    if quant.outlier_range is not None:
        split = (grid_bounds(quant.act_range, quant.act_bits, quant.act_floor), quant.input_scale)
    return name, split, refits


def gelu_fed_layers(model: nn.Module, example: torch.Tensor) -> set[str]:
    """The conv / linear layers whose output feeds only a GELU (``graph.feeds_only_gelu``), found in
    the exported graph as the quantizer finds them."""
    graph = export_speech_model(model, example).graph_module
    return {layer.name for layer in find_quantizable_layers(graph) if feeds_only_gelu(layer.node)}


class OutputGridCalibrator:
    """Adds XNNPACK's output grids to candidates, observing each distinct layer setting once.

    As in the quantizer, the output of a layer that feeds only a GELU is observed above
    ``GELU_FLOOR``; of a split layer, both of its outputs. That is exact where the outlier part
    is zero; in the loud frames where it is not, the main part's values below the floor are
    lost before the two are added (the search's scores include this).

    Args:
        model: the float model (weight norm is folded in place, as simulation needs).
        waves: the calibration waveforms the converted program's observers will see.
    """

    def __init__(self, model: nn.Module, waves: Sequence[torch.Tensor]) -> None:
        self.wrapper = to_ctc_logits(model).eval()
        fold_weight_norm(self.wrapper)
        self.modules = {m.name: m.module for m in quantizable_modules(self.wrapper)}
        self.waves = list(waves)
        self.gelu_fed = gelu_fed_layers(model, self.waves[0])
        self.grids: dict[_Key, tuple[Grid, Grid | None]] = {}
        self.passes = 0

    def __call__(self, candidate: dict[str, LayerQuant]) -> dict[str, LayerQuant]:
        """``candidate`` with every layer's output grid (and a split's second output grid) set."""
        refits = tuple(sorted((name, q.refit.digest) for name, q in candidate.items() if q.refit is not None))
        missing = {name: quant for name, quant in candidate.items() if _key(name, quant, refits) not in self.grids}
        if missing:
            self._observe(candidate, missing, refits)
        out = {}
        for name, quant in candidate.items():
            main, outliers = self.grids[_key(name, quant, refits)]
            out[name] = dataclasses.replace(quant, output_grid=main, outlier_output_grid=outliers)
        return out

    @torch.no_grad()
    def _observe(self, candidate: dict[str, LayerQuant], missing: dict[str, LayerQuant],
                 refits: tuple[tuple[str, str], ...]) -> None:
        """One float calibration pass with the candidate's refit weights in place, as in the prepared graph."""
        observers = {}
        for name, quant in missing.items():
            floor = GELU_FLOOR if name in self.gelu_fed else None
            split = quant.outlier_range is not None
            observers[name] = (_output_observer(floor), _output_observer(floor) if split else None)
        with refit_weights_in_place(self.modules, candidate):
            watchers = {self.modules[name]: self._watcher(self.modules[name], quant, *observers[name])
                        for name, quant in missing.items()}
            watch_layer_inputs(self.wrapper, watchers, self.waves)
        self.passes += 1
        for name, quant in missing.items():
            main, outliers = observers[name]
            self.grids[_key(name, quant, refits)] = (_grid(main), _grid(outliers) if outliers is not None else None)

    @staticmethod
    def _watcher(module: nn.Module, quant: LayerQuant, main: nn.Module,
                 outliers: nn.Module | None) -> Callable[[torch.Tensor], None]:
        def watch(x: torch.Tensor) -> None:
            if outliers is None:
                main(layer_product(module, x, module.weight, module.bias))
                return
            weight = module.weight
            if quant.input_scale is not None:
                x = x * inverse_input_scale(quant.input_scale, weight.ndim)
                weight = scaled_weight(weight, quant.input_scale)
            clamped = x.clamp(*grid_bounds(quant.act_range, quant.act_bits, quant.act_floor))
            main(layer_product(module, clamped, weight, module.bias))
            outliers(layer_product(module, x - clamped, weight, None))

        return watch
