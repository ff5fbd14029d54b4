"""Ready-made plans for common situations."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from sq_pt2e.plan import ActScheme, LayerPlan, QuantPlan

__all__ = ["default_plan", "search_shaped_plan"]


def default_plan(model: str = "", *, weight_bits: int = 8, act_bits: int = 8,
                 act_scheme: ActScheme = "symmetric") -> QuantPlan:
    """Every conv1d / linear (the grouped positional conv included) at the given bits, max calibration.

    ``act_scheme="affine"`` gives one-sided layer inputs the affine grid searched plans use.
    """
    return QuantPlan(default=LayerPlan("*", weight_bits=weight_bits, act_bits=act_bits, act_scheme=act_scheme),
                     model=model)


def search_shaped_plan(model: nn.Module, calibration: Sequence[torch.Tensor], model_name: str = "") -> QuantPlan:
    """W8A8 max ranges with the graph a default search produces: affine grids, smoothed CNN
    inputs, the first conv in float.

    For benchmarks: latency depends on which ops the plan puts in the graph (the smoothing
    multiplies included), not on its ranges, so this costs one calibration pass, no search.
    """
    from sq_pt2e.simulate import quantizable_modules
    from sq_pt2e.stablequant import SearchConfig, search_input_scales, searched_modules

    config = SearchConfig()
    searched = {m.name for m in searched_modules(model, config)}
    scales = search_input_scales(model, calibration, config)
    layers = []
    for m in quantizable_modules(model):
        if m.name not in searched:
            layers.append(LayerPlan(m.name, op=m.op, skip=True, reason="kept float by the search config"))
        elif m.name in scales:
            layers.append(LayerPlan(m.name, op=m.op, act_scheme="affine", input_scale=scales[m.name]))
    return dataclasses.replace(default_plan(model_name, act_scheme="affine"), layers=tuple(layers))
