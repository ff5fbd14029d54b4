"""Express LayerNorm and per-channel GroupNorm with ops XNNPACK runs.

ExecuTorch's XNNPACK delegate has no normalisation op, so ``layer_norm`` (26 in
wav2vec2-base, 57 in HuBERT-large) and the CNN encoder's ``group_norm`` fall back to
portable kernels and cut the graph into many partitions. XNNPACK does run
``mean.dim`` over the two innermost dims of a 4-D tensor (global average pooling),
``sub``, ``mul``, ``add`` and ``rsqrt``; this pass rewrites

    y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias

with those, viewing the normalised axis as the innermost dims of a 4-D tensor.
Runs on a ``GraphModule`` with constants as attributes (a ``convert_pt2e`` output or
``ExportedProgram.module()``), before exporting for ExecuTorch.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import NodeRewritePass, Rewrite, add_constant, reshape_sizes

__all__ = ["DecomposeNormsPass"]

aten = torch.ops.aten


def _shape_source(node: Node, x: object) -> torch.Tensor | None:
    """A tensor with the norm's (static) shape: its output's meta, else its input's.

    ``convert_pt2e`` inserts dequantize nodes without shape metadata, so the input of a
    norm after an int8 layer may carry none; the norm's own output has the same shape.
    """
    value = node.meta.get("val")
    if value is None and isinstance(x, Node):
        value = x.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def _affine_and_eps(node: Node) -> tuple[object, object, float]:
    """``(weight, bias, eps)`` of ``layer_norm`` / ``group_norm``: both take them as args 2-4."""
    args = node.args
    return (args[2] if len(args) > 2 else None, args[3] if len(args) > 3 else None,
            float(args[4]) if len(args) > 4 else 1e-5)


def _normalise_4d(gm: GraphModule, x4: Node, eps: float) -> Node:
    graph = gm.graph
    mean = graph.call_function(aten.mean.dim, (x4, [2, 3], True))
    centred = graph.call_function(aten.sub.Tensor, (x4, mean))
    squared = graph.call_function(aten.mul.Tensor, (centred, centred))
    variance = graph.call_function(aten.mean.dim, (squared, [2, 3], True))
    eps_node = graph.get_attr(add_constant(gm, "_norm_eps", torch.tensor([eps], dtype=torch.float32)))
    inverse = graph.call_function(aten.rsqrt.default, (graph.call_function(aten.add.Tensor, (variance, eps_node)),))
    return graph.call_function(aten.mul.Tensor, (centred, inverse))


class DecomposeNormsPass(NodeRewritePass):
    """Rewrite ``aten.layer_norm`` (last dim) and ``aten.group_norm`` (one group per channel)."""

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        if node.op != "call_function":
            return None
        if node.target == aten.layer_norm.default:
            replacement = self._layer_norm(graph_module, node)
        elif node.target == aten.group_norm.default:
            replacement = self._group_norm(graph_module, node)
        else:
            return None
        return None if replacement is None else Rewrite(replacement)

    @staticmethod
    def _layer_norm(gm: GraphModule, node: Node) -> Node | None:
        x, shape = node.args[0], list(node.args[1])
        weight, bias, eps = _affine_and_eps(node)
        value = _shape_source(node, x)
        if value is None or len(shape) != 1 or value.dim() < 2:
            return None
        full = reshape_sizes(value.shape)
        if full is None or -1 in full[:-2] or full[-1] == -1:
            return None  # only the time axis may be dynamic
        with gm.graph.inserting_before(node):
            x4 = gm.graph.call_function(aten.reshape.default, (x, [math.prod(full[:-2]), full[-2], full[-1], 1]))
            out = gm.graph.call_function(aten.reshape.default, (_normalise_4d(gm, x4, eps), full))
            if weight is not None:
                out = gm.graph.call_function(aten.mul.Tensor, (out, weight))
            if bias is not None:
                out = gm.graph.call_function(aten.add.Tensor, (out, bias))
        return out

    @staticmethod
    def _group_norm(gm: GraphModule, node: Node) -> Node | None:
        x, groups = node.args[0], int(node.args[1])
        weight, bias, eps = _affine_and_eps(node)
        value = _shape_source(node, x)
        if value is None or value.dim() != 3 or groups != value.shape[1]:
            return None  # only one group per channel, (batch, channels, time)
        sizes = reshape_sizes(value.shape)
        if sizes is None or -1 in sizes[:2]:
            return None  # only the time axis may be dynamic
        batch, channels, time = sizes
        with gm.graph.inserting_before(node):
            x4 = gm.graph.call_function(aten.reshape.default, (x, [batch, channels, time, 1]))
            out = gm.graph.call_function(aten.reshape.default, (_normalise_4d(gm, x4, eps), [batch, channels, time]))
            for param, op in ((weight, aten.mul.Tensor), (bias, aten.add.Tensor)):
                if param is None:
                    continue
                column = gm.graph.call_function(aten.reshape.default, (param, [channels, 1]))
                out = gm.graph.call_function(op, (out, column))
        return out
