"""Run quantized CNN-encoder convolutions as int8 GEMMs over windows built from slices.

For programs of dynamic length lowered to ExecuTorch/XNNPACK. executorch 1.5.1's XNNPACK
runtime crashes on a statically quantized convolution whose input length is dynamic,
while its quantized ``linear`` handles any number of rows. So each eligible ``dq ->
conv1d`` becomes a GEMM over time-major windows, as in
:class:`~sq_pt2e.passes.conv1d_as_gemm.QuantizedConv1dAsGemmPass`, but the windows are
built only from slices, reshapes and a concatenation (``unfold`` has no XNNPACK or
dynamic-shape lowering). For kernel ``K = S + R`` with stride ``S`` and ``0 <= R <= S``,
over ``n = (T - K) // S + 1`` output frames of a time-major ``(B, T, C)`` input:

    first  = x[:, 0 : S*n].reshape(B, n, S*C)             frames  S*j .. S*j + S - 1
    second = x[:, R : R + S*n].reshape(B, n, S*C)[..., (S - R)*C :]   frames  S*j + S .. S*j + K - 1
    windows = cat([first, second], -1)                     (B, n, K*C), frame-major

The windows are cut from the float input of the layer's quantize op and quantized with
the same scale and zero point, so the int8 values are exactly those the conv saw and the
result is identical. Applies to ``dq -> conv1d`` with groups 1, no padding or dilation
and ``stride <= kernel <= 2 * stride`` (every CNN-encoder conv of wav2vec2 / HuBERT);
runs on the output of ``convert_pt2e``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import (
    QUANTIZE_PER_TENSOR,
    NodeRewritePass,
    Rewrite,
    add_constant,
    frame_major_weight,
    match_dense_quantized_conv1d,
)

__all__ = ["QuantizedConv1dAsWindowGemmPass"]

aten = torch.ops.aten


class QuantizedConv1dAsWindowGemmPass(NodeRewritePass):
    """Rewrite eligible ``dq -> conv1d`` as ``slice/reshape/cat -> q -> dq -> linear`` (time-major)."""

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        graph = graph_module.graph
        conv = match_dense_quantized_conv1d(node)
        x_q = conv.x_dq.args[0] if conv is not None else None
        if not (isinstance(x_q, Node) and x_q.op == "call_function" and x_q.target in QUANTIZE_PER_TENSOR):
            return None
        _, channels, kernel = getattr(graph_module, conv.w_int.target).shape
        stride = conv.stride
        if not stride <= kernel <= 2 * stride:
            return None
        name = add_constant(graph_module, f"{conv.w_int.target}_as_window_gemm", frame_major_weight(graph_module, conv))
        batch = int(node.meta["val"].shape[0])
        rest = kernel - stride
        with graph.inserting_before(node):
            frames = graph.call_function(aten.permute.default, (x_q.args[0], [0, 2, 1]))
            length = _length(graph, frames)
            outputs = _symbolic(graph, operator.floordiv, _symbolic(graph, operator.sub, length, kernel), stride)
            span = _symbolic(graph, operator.mul, _symbolic(graph, operator.add, outputs, 1), stride)
            first = graph.call_function(aten.slice.Tensor, (frames, 1, 0, span))
            first = graph.call_function(aten.reshape.default, (first, [batch, -1, stride * channels]))
            parts = [first]
            if rest:
                end = _symbolic(graph, operator.add, span, rest)
                second = graph.call_function(aten.slice.Tensor, (frames, 1, rest, end))
                second = graph.call_function(aten.reshape.default, (second, [batch, -1, stride * channels]))
                second = graph.call_function(aten.slice.Tensor, (second, 2, (stride - rest) * channels,
                                                                  stride * channels))
                parts.append(second)
            windows = parts[0] if len(parts) == 1 else graph.call_function(aten.cat.default, (parts, -1))
            q = graph.call_function(x_q.target, (windows, *x_q.args[1:]), dict(x_q.kwargs))
            x_dq = graph.call_function(conv.x_dq.target, (q, *conv.x_dq.args[1:]), dict(conv.x_dq.kwargs))
            w_dq = graph.call_function(conv.w_dq.target, (graph.get_attr(name), *conv.w_dq.args[1:]),
                                       dict(conv.w_dq.kwargs))
            linear = graph.call_function(aten.linear.default, (x_dq, w_dq, conv.bias))
            result = _requantized(graph, node, linear)
            out = graph.call_function(aten.permute.default, (result, [0, 2, 1]))
        return Rewrite(out, also_tag=(frames, windows, q, x_dq, w_dq, linear, result))


def _requantized(graph: torch.fx.Graph, conv: Node, linear: Node) -> Node:
    """``linear`` followed by the conv's output quantize / dequantize, if its only user is a quantize.

    XNNPACK takes a quantized linear only when its output is quantized directly; the
    conv's own output quantize then re-quantizes exact grid values (no change).
    """
    users = list(conv.users)
    if len(users) != 1 or users[0].target not in QUANTIZE_PER_TENSOR or len(list(users[0].users)) != 1:
        return linear
    quantize = users[0]
    (dequantize,) = quantize.users
    q = graph.call_function(quantize.target, (linear, *quantize.args[1:]), dict(quantize.kwargs))
    return graph.call_function(dequantize.target, (q, *dequantize.args[1:]), dict(dequantize.kwargs))


# Frame arithmetic that stays an int for a fixed length and becomes graph nodes for a dynamic one.
def _length(graph: torch.fx.Graph, frames: Node) -> int | Node:
    source = frames.args[0]
    size = source.meta["val"].shape[2] if isinstance(source, Node) and "val" in source.meta else None
    if isinstance(size, int):
        return size
    return graph.call_function(aten.sym_size.int, (frames, 1))


def _symbolic(graph: torch.fx.Graph, op: Callable[[Any, int], Any], a: int | Node, b: int) -> int | Node:
    """``op(a, b)``: an int when ``a`` is one, else a graph node computing it."""
    return op(a, b) if isinstance(a, int) else graph.call_function(op, (a, b))
