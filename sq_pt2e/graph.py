"""Helpers to find quantizable layers in an exported graph and name them.

Layer names are the ``named_modules()`` paths of the float model, read from the
last entry of ``node.meta["nn_module_stack"]`` of each conv/linear node.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from sq_pt2e.plan import OpKind

__all__ = [
    "GELU_FLOOR",
    "QuantizableLayer",
    "feeds_only_gelu",
    "find_quantizable_layers",
    "group_channels",
    "layer_name",
    "named_layers",
    "op_kind",
]

_CONV1D = (torch.ops.aten.conv1d.default, torch.ops.aten.conv1d.padding)
_LINEAR = (torch.ops.aten.linear.default,)


def layer_name(node: Node) -> str:
    """The module path of the layer that produced ``node`` ("" if unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].")


def op_kind(node: Node) -> OpKind | None:
    """``"conv1d"``, ``"grouped_conv1d"``, ``"linear"`` or ``None`` for other nodes."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR:
        return "linear"
    if node.target in _CONV1D:
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        return "grouped_conv1d" if groups != 1 else "conv1d"
    return None


@dataclass(frozen=True)
class QuantizableLayer:
    """One conv/linear call in the graph: its module name, op kind and node."""

    name: str
    op: OpKind
    node: Node


def find_quantizable_layers(gm: GraphModule) -> list[QuantizableLayer]:
    """All conv1d/linear calls of ``gm`` in graph order."""
    layers = []
    for node in gm.graph.nodes:
        kind = op_kind(node)
        if kind is not None:
            layers.append(QuantizableLayer(layer_name(node) or node.name, kind, node))
    return layers


def named_layers(gm: GraphModule, names: Iterable[str], what: str) -> dict[str, QuantizableLayer]:
    """The quantizable layers of ``gm`` by name, for a rewrite of the named ones.

    Raises:
        QuantizationError: a name is not a layer of the graph (``what`` says what was asked for it).
    """
    from sq_pt2e.errors import QuantizationError

    layers = {layer.name: layer for layer in find_quantizable_layers(gm)}
    missing = sorted(set(names) - set(layers))
    if missing:
        raise QuantizationError(f"{what} for layer(s) not in the graph: {missing[:5]}")
    return layers


def group_channels(model: nn.Module) -> dict[str, int]:
    """Input channels per group of every grouped conv1d, by layer name.

    ``model`` is an exported graph (read from each conv's weight shape) or the float model
    (read from its ``Conv1d`` modules); the names are the same either way.
    """
    if not isinstance(model, GraphModule):
        from sq_pt2e.simulate import quantizable_modules

        return {m.name: m.module.in_channels // m.module.groups
                for m in quantizable_modules(model) if m.op == "grouped_conv1d"}
    channels = {}
    for layer in find_quantizable_layers(model):
        if layer.op != "grouped_conv1d":
            continue
        weight = layer.node.args[1]
        value = weight.meta.get("val") if isinstance(weight, Node) else None
        if value is None and isinstance(weight, Node) and weight.op == "get_attr":
            value = operator.attrgetter(weight.target)(model)
        if value is not None:
            channels[layer.name] = int(value.shape[1])
    return channels


_SLICES = (torch.ops.aten.slice.Tensor, torch.ops.aten.slice_copy.Tensor)
_GELUS = (torch.ops.aten.gelu.default,)


def feeds_only_gelu(node: Node) -> bool:
    """Whether every use of ``node``'s output is a GELU (also through slices, e.g. the positional
    conv's trimmed last frame): then how it rounds below ``GELU_FLOOR`` does not matter."""
    users = list(node.users)
    return bool(users) and all(u.target in _GELUS or (u.target in _SLICES and feeds_only_gelu(u)) for u in users)


# GELU(x) for x <= -3 lies within 0.0041 of 0 (GELU(-3) = -0.0040), under a tenth of an int8 step
# of the CNN conv outputs of the reference models: below it an output grid needs no levels.
GELU_FLOOR = -3.0
