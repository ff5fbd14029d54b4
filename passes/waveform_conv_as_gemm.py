"""Run a float conv1d that reads the raw waveform (one input channel) as a GEMM.

The CNN encoder's first convolution (kernel 10, stride 5, 512 output channels in
wav2vec2-base) is kept in float by the search (``SearchConfig.keep_float``). oneDNN
runs a one-input-channel conv poorly: 276 ms of 3.8 s for wav2vec2-base on 10 s of
audio at one thread on an AVX2 CPU, for about 0.2 % of the multiply-adds. The same
conv is a ``(B, T', K) x (K, C_out)`` GEMM on the waveform's windows, and it writes a
time-major ``(B, T', C_out)`` result: the norm, GELU and quantize after it, and the
next layer's windows (:class:`~sq_pt2e.passes.conv1d_as_gemm.QuantizedConv1dAsGemmPass`),
then read it without a transposition. The result equals the conv up to float
summation order. Runs on the output of ``convert_pt2e``, before ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import NodeRewritePass, Rewrite, add_constant, conv1d_arguments, get_constant

__all__ = ["WaveformConvAsGemmPass"]

aten = torch.ops.aten


class WaveformConvAsGemmPass(NodeRewritePass):
    """Rewrite float ``conv1d`` with one input channel and a constant weight as ``unfold -> linear``."""

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        graph = graph_module.graph
        if node.op != "call_function" or node.target != aten.conv1d.default:
            return None
        weight_node = node.args[1]
        if not (isinstance(weight_node, Node) and weight_node.op == "get_attr"):
            return None  # a dequantized (int8) weight: the int8 passes handle it
        weight = get_constant(graph_module, weight_node.target)
        bias, stride, padding, dilation, groups = conv1d_arguments(node)
        out_channels, in_channels, kernel = weight.shape
        if in_channels != 1 or groups != 1 or padding != 0 or dilation != 1 or weight.dtype != torch.float32:
            return None
        name = add_constant(graph_module, f"{weight_node.target.replace('.', '_')}_as_gemm",
                            weight.reshape(out_channels, kernel))
        batch, samples = int(node.args[0].meta["val"].shape[0]), int(node.args[0].meta["val"].shape[-1])
        with graph.inserting_before(node):
            signal = graph.call_function(aten.reshape.default, (node.args[0], [batch, samples]))
            windows = graph.call_function(aten.unfold.default, (signal, 1, kernel, stride))
            linear = graph.call_function(aten.linear.default, (windows, graph.get_attr(name), bias))
            out = graph.call_function(aten.permute.default, (linear, [0, 2, 1]))
        return Rewrite(out, also_tag=(signal, windows, linear))
