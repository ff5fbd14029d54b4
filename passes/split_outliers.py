"""Outlier split: compute the part of a layer's input its int8 grid would clip in a second int8 layer.

A per-tensor int8 grid must choose between resolution (a small range) and the rare large
inputs (a range that covers them). With ``LayerPlan.outlier_range`` set, a layer
``y = W x + b`` whose input grid covers ``[low, high]`` is rewritten as

    y = W clamp(x, low, high) + b  +  W (x - clamp(x, low, high))

which equals the float layer exactly (so calibration through the prepared graph sees the float
model). Both products are quantized: the first on the layer's own grid, the second on a grid
of the outliers alone, ``[0, outlier_range]`` above an affine grid or ``[-outlier_range,
outlier_range]`` around a symmetric one. The outlier input is zero wherever ``x`` is inside
the grid, and exactly zero on the int8 grid too, so the second layer adds nothing there.
Both layers quantize the same weights alike (inductor's freezing keeps one int8 copy).

The second layer's node is marked with :data:`OUTLIER_OF` (the name of the layer it
belongs to) and named ``<layer>.outliers`` in ``nn_module_stack``, so quantizers and reports
can tell it from the plan's own layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.graph import named_layers

__all__ = ["OUTLIER_OF", "OUTLIER_SUFFIX", "outlier_owner", "split_outliers", "split_sum"]

OUTLIER_OF = "sq_outlier_of"
OUTLIER_SUFFIX = ".outliers"
aten = torch.ops.aten


def outlier_owner(node: Node) -> str | None:
    """The layer whose outliers ``node`` computes (None: ``node`` is not an outlier layer)."""
    return node.meta.get(OUTLIER_OF)


def split_sum(node: Node) -> Node:
    """The node that adds a split layer's two outputs, for either of them; ``node`` itself otherwise."""
    users = list(node.users)
    if len(users) == 1 and users[0].target == aten.add.Tensor and any(
            isinstance(a, Node) and outlier_owner(a) is not None for a in users[0].args):
        return users[0]
    return node


def _copy_meta(new: Node, like: Node, *, name: str | None = None) -> None:
    for key in ("stack_trace", "val"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    stack = dict(like.meta.get("nn_module_stack") or {})
    if name is not None:
        stack[f"{name}{OUTLIER_SUFFIX}"] = (f"{name}{OUTLIER_SUFFIX}", torch.nn.Module)
    if stack:
        new.meta["nn_module_stack"] = stack


def split_outliers(gm: GraphModule, grids: Mapping[str, tuple[float, float]]) -> GraphModule:
    """Rewrite each named layer ``name -> (low, high)`` into its clamped and outlier parts (module docstring).

    ``(low, high)`` is the interval the layer's input grid covers (``observers.grid_bounds``),
    in the units the layer's input node carries (after any smoothing multiply).

    Raises:
        QuantizationError: a named layer is not in the graph.
    """
    if not grids:
        return gm
    layers = named_layers(gm, grids, "outlier split")
    for name, (low, high) in sorted(grids.items()):
        node = layers[name].node
        x, weight = node.args[0], node.args[1]
        with gm.graph.inserting_before(node):
            clamped = gm.graph.call_function(aten.clamp.default, (x, low, high))
            outliers = gm.graph.call_function(aten.sub.Tensor, (x, clamped))
            own_weight = gm.graph.get_attr(weight.target) if weight.op == "get_attr" else weight
        with gm.graph.inserting_after(node):
            rest = tuple(node.args[3:]) if len(node.args) > 3 else ()
            second = gm.graph.call_function(node.target, (outliers, own_weight, None, *rest), dict(node.kwargs))
        with gm.graph.inserting_after(second):
            total = gm.graph.call_function(aten.add.Tensor, (node, second))
        node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        node.replace_input_with(x, clamped)  # float (calibration) computes W x exactly: W clamp(x) + W (x - clamp(x))
        for new in (clamped, outliers):
            _copy_meta(new, x)
        if own_weight is not weight:
            _copy_meta(own_weight, weight)
        _copy_meta(second, node, name=name)
        _copy_meta(total, node)
        second.meta[OUTLIER_OF] = name
    gm.graph.lint()
    gm.recompile()
    return gm
