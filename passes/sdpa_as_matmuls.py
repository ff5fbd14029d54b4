"""Write scaled-dot-product attention as the two 4-D matmuls of "eager" attention.

``aten.scaled_dot_product_attention`` is one opaque op: a quantizer cannot put int8 on
its inputs. Written as ``matmul(softmax(matmul(q, k^T) * scale [+ mask]), v)`` it can:
the quantizer then annotates ``q``, ``k^T``, ``v`` and the attention probabilities, and
inductor fuses the quantized pattern into torchao's int8 attention kernel
(:mod:`sq_pt2e.backends.int8_attention`). The matmuls stay 4-D, the form torchao's
pattern expects (inductor decomposes them into ``expand -> reshape -> bmm``).

A boolean mask (``True``: attend) becomes an additive one, 0 where it attends and the
lowest float32 where not (as transformers builds masks for eager attention; ``exp`` of either
that or SDPA's ``-inf`` is 0 next to an unmasked score). Attention with dropout, causal
masking or grouped-query heads is left alone.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import (
    DEQUANTIZE_PER_TENSOR,
    QUANTIZE_PER_TENSOR,
    NodeRewritePass,
    Rewrite,
    sdpa_arguments,
)

__all__ = ["SdpaAsMatmulsPass", "attention_matmuls"]

aten = torch.ops.aten
_QDQ = QUANTIZE_PER_TENSOR + DEQUANTIZE_PER_TENSOR


class SdpaAsMatmulsPass(NodeRewritePass):
    """Rewrite mask-free or masked ``aten.scaled_dot_product_attention`` as 4-D matmuls."""

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
            return None
        arguments = sdpa_arguments(node)
        mask = arguments["attn_mask"]
        if any(arguments[k] for k in ("dropout_p", "is_causal", "enable_gqa")):
            return None
        query, key, value = arguments["query"], arguments["key"], arguments["value"]
        head_dim = query.meta["val"].shape[-1]
        scale = arguments["scale"] or 1.0 / math.sqrt(head_dim)
        graph = graph_module.graph

        def call(target: torch._ops.OpOverload, *args: object) -> Node:
            new = graph.call_function(target, args)
            # the quantizer reads shapes and dtypes from the fake value, so compute it
            new.meta["val"] = target(*(a.meta["val"] if isinstance(a, Node) else a for a in args))
            return new

        extra: tuple[Node, ...] = ()
        with graph.inserting_before(node):
            key_t = call(aten.transpose.int, key, -2, -1)
            scores = call(aten.matmul.default, query, key_t)
            scaled = call(aten.mul.Tensor, scores, scale)
            if isinstance(mask, Node) and mask.meta["val"].dtype == torch.bool:
                mask = call(aten.where.Scalar, mask, 0.0, torch.finfo(torch.float32).min)
                extra = (mask,)
            if mask is not None:
                scaled = call(aten.add.Tensor, scaled, mask)
            probs = call(aten.softmax.int, scaled, -1)
            out = call(aten.matmul.default, probs, value)
        copy = _contiguous_after_head_transpose(graph, node)
        return Rewrite(out, also_tag=(key_t, scores, scaled, probs, *extra) + ((copy,) if copy else ()))


def _contiguous_after_head_transpose(graph: torch.fx.Graph, attention: Node) -> Node | None:
    """Insert ``clone(contiguous)`` after the transpose that brings the heads back next to the features.

    Models write ``attention(q, k, v).transpose(1, 2).reshape(B, T, H * D)``; inductor's
    quantized-attention pattern wants the output copy explicit (``.contiguous()``) so
    that the int8 quantization of the output projection's input stops there.
    """
    node = attention
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node.target == aten.transpose.int:
            with graph.inserting_after(node):
                copy = graph.call_function(aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
            node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
            copy.meta["val"] = node.meta["val"].clone(memory_format=torch.contiguous_format)
            return copy
        if node.target not in (aten.reshape.default, aten.view.default):
            return None
    return None


def attention_matmuls(graph_module: GraphModule) -> list[tuple[Node, Node]]:
    """``(q @ k^T, probs @ v)`` matmul pairs written by :class:`SdpaAsMatmulsPass` (or by eager attention).

    A pair is a 4-D ``aten.matmul`` whose output reaches, through scaling, masking and a
    softmax (and quantize/dequantize in a converted graph, an observer in a prepared one),
    the first argument of a second 4-D ``aten.matmul``.
    """
    pairs = []
    for node in graph_module.graph.nodes:
        if node.target != aten.matmul.default or node.meta["val"].dim() != 4:
            continue
        probs = node.args[0]
        while isinstance(probs, Node) and (probs.target in _QDQ or probs.op == "call_module"):  # or observers
            probs = probs.args[0]
        if not isinstance(probs, Node) or probs.target not in (aten.softmax.int, aten._softmax.default):
            continue
        scores = probs.args[0]
        while isinstance(scores, Node) and scores.target in (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor):
            scores = scores.args[0]
        if isinstance(scores, Node) and scores.target == aten.matmul.default:
            pairs.append((scores, node))
    return pairs
