"""Ready-made plans for common situations."""

from __future__ import annotations

from sq_pt2e.plan import LayerPlan, QuantPlan

__all__ = ["POSITIONAL_CONV_REASON", "default_plan"]

POSITIONAL_CONV_REASON = (
    "grouped positional conv (groups=16, kernel 128): inductor's int8 grouped conv1d has produced "
    "wrong outputs (cosine 0.69 vs eager int8); kept float until verified"
)


def default_plan(model: str = "", *, weight_bits: int = 8, act_bits: int = 8) -> QuantPlan:
    """Every conv1d / linear at the given bits with max calibration; the positional conv float."""
    return QuantPlan(
        default=LayerPlan("*", weight_bits=weight_bits, act_bits=act_bits),
        op_defaults=(LayerPlan("*", op="grouped_conv1d", skip=True, reason=POSITIONAL_CONV_REASON),),
        model=model,
    )
