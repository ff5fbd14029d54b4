"""Express unmasked scaled-dot-product attention with batched matmuls and softmax.

ExecuTorch decomposes ``scaled_dot_product_attention`` into ops of which several are
not delegated to XNNPACK (``mul.Scalar`` for the scale, the ``any``/``where``/
``logical_not`` of its safe softmax, ``expand_copy``), splitting every Transformer
layer into pieces. For attention without mask, dropout or causality this pass writes
it as ``bmm(softmax(bmm(q, k^T) * scale), v)`` on 3-D tensors, all of which XNNPACK
runs. The scale is a tensor constant so the multiply stays ``mul.Tensor``.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import NodeRewritePass, Rewrite, add_constant, reshape_sizes, sdpa_arguments

__all__ = ["DecomposeAttentionPass"]

aten = torch.ops.aten


class DecomposeAttentionPass(NodeRewritePass):
    """Rewrite mask-free, dropout-free, non-causal ``aten.scaled_dot_product_attention``."""

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        graph = graph_module.graph
        if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
            return None
        arguments = sdpa_arguments(node)
        if arguments["attn_mask"] is not None or any(arguments[k] for k in ("dropout_p", "is_causal", "enable_gqa")):
            return None
        q, k, v = arguments["query"], arguments["key"], arguments["value"]
        q_val, k_val = q.meta.get("val"), k.meta.get("val")
        if q_val is None or k_val is None or q_val.dim() != 4:
            return None
        q_sizes, k_sizes = reshape_sizes(q_val.shape), reshape_sizes(k_val.shape)
        v_sizes = reshape_sizes(v.meta["val"].shape)
        if q_sizes is None or k_sizes is None or v_sizes is None or -1 in q_sizes[:2] + q_sizes[3:] + v_sizes[3:]:
            return None  # only the length may be dynamic: it is the -1 of each reshape
        batch, heads, length, dim = q_sizes
        keys, v_dim = k_sizes[2], v_sizes[3]
        scale = arguments["scale"] or 1.0 / math.sqrt(dim)
        name = add_constant(graph_module, "_attention_scale", torch.tensor([scale], dtype=torch.float32))
        with graph.inserting_before(node):
            q3 = graph.call_function(aten.reshape.default, (q, [batch * heads, length, dim]))
            k3 = graph.call_function(aten.reshape.default, (k, [batch * heads, keys, dim]))
            v3 = graph.call_function(aten.reshape.default, (v, [batch * heads, keys, v_dim]))
            scores = graph.call_function(aten.bmm.default, (q3, graph.call_function(aten.transpose.int, (k3, 1, 2))))
            scores = graph.call_function(aten.mul.Tensor, (scores, graph.get_attr(name)))
            probs = graph.call_function(aten._softmax.default, (scores, -1, False))
            out3 = graph.call_function(aten.bmm.default, (probs, v3))
            out = graph.call_function(aten.reshape.default, (out3, [batch, heads, length, v_dim]))
        return Rewrite(out)
