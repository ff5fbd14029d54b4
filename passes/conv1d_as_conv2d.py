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
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from sq_pt2e.passes.rewrite_utils import add_constant, replace_node

__all__ = ["QuantizedConv1dAsConv2dPass"]

_DQ_TENSOR = (
    torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    torch.ops.quantized_decomposed.dequantize_per_tensor.tensor,
)
_DQ_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_CONV1D = torch.ops.aten.conv1d.default
_CONV1D_DEFAULTS: tuple[object, ...] = (None, None, None, [1], [0], [1], 1)


def _is_call(node: object, targets: object) -> bool:
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    return node.target in targets if isinstance(targets, tuple) else node.target == targets


def _as_list(value: object) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]  # type: ignore[arg-type]


class QuantizedConv1dAsConv2dPass(PassBase):
    """Rewrite ``dq -> conv1d`` patterns as ``dq -> conv2d`` with height-1 tensors."""

    def call(self, graph_module: GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for node in list(graph.nodes):
            if not _is_call(node, _CONV1D):
                continue
            x_dq, w_dq = node.args[0], node.args[1]
            if not (_is_call(x_dq, _DQ_TENSOR) and _is_call(w_dq, _DQ_CHANNEL)):
                continue
            w_int = w_dq.args[0]
            if not isinstance(w_int, Node) or w_int.op != "get_attr":
                continue
            # aten.conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
            args = tuple(node.args) + _CONV1D_DEFAULTS[len(node.args) :]
            bias, groups = args[2], args[6]
            stride, padding, dilation = (_as_list(a) for a in args[3:6])
            weight4 = getattr(graph_module, w_int.target).unsqueeze(2).contiguous()
            attr_name = add_constant(graph_module, f"{w_int.target}_as_conv2d", weight4)
            with graph.inserting_before(node):
                x_int4 = graph.call_function(torch.ops.aten.unsqueeze.default, (x_dq.args[0], 2))
                x_dq4 = graph.call_function(x_dq.target, (x_int4, *x_dq.args[1:]), dict(x_dq.kwargs))
                w_int4 = graph.get_attr(attr_name)
                w_dq4 = graph.call_function(_DQ_CHANNEL, (w_int4, *w_dq.args[1:]), dict(w_dq.kwargs))
                conv2d = graph.call_function(
                    torch.ops.aten.conv2d.default,
                    (x_dq4, w_dq4, bias, [1, stride[0]], [0, padding[0]], [1, dilation[0]], groups),
                )
                out = graph.call_function(torch.ops.aten.squeeze.dim, (conv2d, 2))
            replace_node(graph_module, node, out, also_tag=(x_int4, x_dq4, w_int4, w_dq4, conv2d))
            modified = True
        if modified:
            graph.eliminate_dead_code()
            graph_module.delete_all_unused_submodules()
            graph_module.recompile()
        return PassResult(graph_module, modified)
