"""Ready-made plans for common situations."""

from __future__ import annotations

from sq_pt2e.plan import ActScheme, LayerPlan, QuantPlan

__all__ = ["default_plan"]


def default_plan(model: str = "", *, weight_bits: int = 8, act_bits: int = 8,
                 act_scheme: ActScheme = "symmetric") -> QuantPlan:
    """Every conv1d / linear (the grouped positional conv included) at the given bits, max calibration.

    ``act_scheme="affine"`` gives one-sided layer inputs the affine grid searched plans use.
    """
    return QuantPlan(default=LayerPlan("*", weight_bits=weight_bits, act_bits=act_bits, act_scheme=act_scheme),
                     model=model)
