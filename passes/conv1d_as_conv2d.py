"""Express each quantized conv1d of a converted graph as a conv2d of height 1.

Why: in torch 2.13 the meta (shape) function of ``onednn.qconv_pointwise`` reads the
kernel size from the prepacked weight, which for conv1d is 4-D ``(OC, IC, 1, K)``;
for a 3-D input it then takes kernel size 1 and infers a wrong output length
(16000 samples, kernel 10, stride 5: 3200 frames instead of 3199). Inductor fails as
soon as a reshape follows the conv (GroupNorm / LayerNorm of the CNN encoder).
Rewriting ``dq(x) -> conv1d(dq(w))`` as ``dq(unsqueeze(x)) -> conv2d(dq(w4)) ->
squeeze`` keeps the int8 pattern inductor fuses and gives the meta function a 2-D
convolution it computes correctly. Numerics are unchanged.

Runs on the output of ``convert_pt2e`` (int8 weights as constants), before
``torch.compile``.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import NodeRewritePass, Rewrite, add_constant, match_quantized_conv1d

__all__ = ["QuantizedConv1dAsConv2dPass"]


class QuantizedConv1dAsConv2dPass(NodeRewritePass):
    """Rewrite ``dq -> conv1d`` patterns as ``dq -> conv2d`` with height-1 tensors."""

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        graph = graph_module.graph
        conv = match_quantized_conv1d(node)
        if conv is None:
            return None
        x_dq, w_dq, w_int = conv.x_dq, conv.w_dq, conv.w_int
        weight4 = getattr(graph_module, w_int.target).unsqueeze(2).contiguous()
        attr_name = add_constant(graph_module, f"{w_int.target}_as_conv2d", weight4)
        with graph.inserting_before(node):
            x_int4 = graph.call_function(torch.ops.aten.unsqueeze.default, (x_dq.args[0], 2))
            x_dq4 = graph.call_function(x_dq.target, (x_int4, *x_dq.args[1:]), dict(x_dq.kwargs))
            w_int4 = graph.get_attr(attr_name)
            w_dq4 = graph.call_function(w_dq.target, (w_int4, *w_dq.args[1:]), dict(w_dq.kwargs))
            conv2d = graph.call_function(
                torch.ops.aten.conv2d.default,
                (x_dq4, w_dq4, conv.bias, [1, conv.stride], [0, conv.padding], [1, conv.dilation], conv.groups),
            )
            out = graph.call_function(torch.ops.aten.squeeze.dim, (conv2d, 2))
        return Rewrite(out, also_tag=(x_int4, x_dq4, w_int4, w_dq4, conv2d))
