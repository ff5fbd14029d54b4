"""Let the XNNPACK delegate store 4-bit Linear weights packed, two values a byte.

A plan with ``weight_bits=4`` (or fewer) quantizes a layer's weight per output channel on a
symmetric grid (-7..7 at 4 bits), which ``convert_pt2e`` keeps as an int8 constant: half of
every byte unused. ExecuTorch's XNNPACK delegate packs a static per-channel weight as 4-bit
(``qcint4``) when its dequantize op records the range -8..7 exactly, and then runs the Linear as
XNNPACK's int8-activation, 4-bit-weight GEMM. This pass records -8..7 on the weights of int8
Linears whose grid lies inside it. ``dequantize_per_channel`` does not clamp, and the stored
values do not change, so the graph computes exactly what it did; the ``.pte``'s Linear weights
take half the bytes. XNNPACK packs 4-bit weights for Linears only: convolutions keep int8 bytes.

Runs on the ``xnnpack`` target's converted graph, before lowering
(:func:`sq_pt2e.backends.executorch_xnnpack.lower_to_xnnpack` applies it).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import get_constant

__all__ = ["PACKED_INT4_RANGE", "pack_int4_linear_weights", "packed_int4_linear_weights", "packs_as_int4"]

PACKED_INT4_RANGE = (-8, 7)
"""The weight range ExecuTorch's XNNPACK delegate stores as packed 4-bit values."""

_DQ_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_LINEAR = torch.ops.aten.linear.default


def packs_as_int4(op: str, weight_bits: int) -> bool:
    """Whether the ``.pte`` stores a layer's weights packed, two a byte: Linears whose symmetric grid
    (``2**(bits-1) - 1`` levels each side) fits in -8..7, i.e. 4 bits or fewer."""
    return op == "linear" and 2 ** (weight_bits - 1) - 1 <= PACKED_INT4_RANGE[1]


def _linear_weight_dequantize(node: Node) -> Node | None:
    """The per-channel int8 weight dequantize of an int8 Linear at ``node`` (weight constant, axis 0)."""
    if node.op != "call_function" or node.target != _LINEAR:
        return None
    weight = node.args[1]
    if not (isinstance(weight, Node) and weight.target == _DQ_CHANNEL and weight.args[6] == torch.int8):
        return None
    source, axis = weight.args[0], weight.args[3]
    if not (isinstance(source, Node) and source.op == "get_attr" and axis == 0):
        return None
    if any(user.target != _LINEAR or user.args[1] is not weight for user in weight.users):
        return None
    return weight


def packed_int4_linear_weights(graph_module: GraphModule) -> list[str]:
    """The Linear nodes whose weight XNNPACK will store as packed 4-bit values (range -8..7)."""
    return [node.name for node in graph_module.graph.nodes
            if (weight := _linear_weight_dequantize(node)) is not None
            and tuple(weight.args[4:6]) == PACKED_INT4_RANGE]


def pack_int4_linear_weights(graph_module: GraphModule) -> list[str]:
    """Record the range -8..7 on every int8 Linear weight whose grid lies inside it (4 bits or fewer).

    The weight values must lie in -8..7 too, and the zero points be 0 (both hold for this
    project's symmetric weight grids; other weights are left alone). Results are unchanged.

    Returns:
        The names of the Linear nodes whose weight XNNPACK will pack as 4-bit (including any
        recorded that way before).
    """
    packed, changed = [], False
    for node in graph_module.graph.nodes:
        weight = _linear_weight_dequantize(node)
        if weight is None:
            continue
        if tuple(weight.args[4:6]) != PACKED_INT4_RANGE:
            if not _fits_int4(graph_module, weight):
                continue
            weight.update_arg(4, PACKED_INT4_RANGE[0])
            weight.update_arg(5, PACKED_INT4_RANGE[1])
            changed = True
        packed.append(node.name)
    if changed:
        graph_module.recompile()
    return packed


def _fits_int4(graph_module: GraphModule, weight: Node) -> bool:
    """Whether a weight's grid and values lie in -8..7 and its zero points are 0 (XNNPACK's packed
    4-bit weights are symmetric: it ignores any other zero point)."""
    low, high = PACKED_INT4_RANGE
    quant_min, quant_max = (int(bound) for bound in weight.args[4:6])
    if not (low <= quant_min and quant_max <= high):
        return False
    values = get_constant(graph_module, str(weight.args[0].target))
    if int(values.min()) < low or int(values.max()) > high:
        return False
    zero_points = weight.args[2]
    if isinstance(zero_points, Node):
        return not get_constant(graph_module, str(zero_points.target)).any()
    return not zero_points
