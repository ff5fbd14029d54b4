"""Run int8 attention's two matmuls as int8 GEMMs (``torch._int_mm``) on VNNI CPUs without AMX.

A plan with ``attention="int8"`` quantizes ``q``, ``k``, ``v`` and the attention
probabilities to uint8 (:mod:`sq_pt2e.passes.sdpa_as_matmuls`), so a converted graph
holds ``matmul(dq(A), dq(B))`` twice per attention block. Inductor would run those as float
``bmm`` on dequantized values. This pass writes each as an exact integer product instead:

``dq(A) @ dq(B) = sa * sb * (A' @ B' - zb' * rowsum(A') - za' * colsum(B' - zb'))``

where ``A' = A - 128`` is the uint8 tensor shifted to signed int8 (zero point
``za' = za - 128``; inductor fuses the shift into the kernel that quantizes) and ``A' @ B'``
is :func:`int8_bmm`, one ``torch._int_mm`` (oneDNN, int8 x int8 with int32 sums) per batch
and head. This project's quantizer makes ``q``, ``k`` and ``v`` symmetric (zero point 128,
so ``za' = 0``): only the probabilities' zero point (0, so ``za' = -128``) leaves a sum,
``128 * colsum(V')``, a few values per head. The sums and the scaling are aten ops that
inductor fuses with the softmax around them. Integer products are exact, so the result
equals the dequantized float matmul up to float rounding.

Runs on the output of ``convert_pt2e``, before ``torch.compile`` (or in eager).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR, NodeRewritePass, Rewrite

__all__ = ["AttentionAsIntMmPass", "int8_bmm"]

aten = torch.ops.aten


@torch.library.custom_op("sq_pt2e::int8_bmm", mutates_args=())
def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched int8 matmul with int32 results: ``a (..., M, K) @ b (..., K, N)``, same leading dims."""
    _check_bmm_operands(a, b)
    *batch, rows, depth = a.shape
    columns = b.shape[-1]
    left, right = a.reshape(-1, rows, depth), b.reshape(-1, depth, columns)
    out = torch.empty(left.shape[0], rows, columns, dtype=torch.int32)
    for index in range(left.shape[0]):
        torch._int_mm(left[index], right[index], out=out[index])
    return out.reshape(*batch, rows, columns)


@int8_bmm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_bmm_operands(a, b)
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


def _check_bmm_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int8_bmm takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"int8_bmm shapes do not multiply: {tuple(a.shape)} @ {tuple(b.shape)}")


class AttentionAsIntMmPass(NodeRewritePass):
    """Rewrite 4-D ``matmul(dq(q(x)), dq(q(y)))`` (uint8, per tensor) as :func:`int8_bmm` plus zero-point sums."""

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        if node.op != "call_function" or node.target != aten.matmul.default or node.meta["val"].dim() != 4:
            return None
        operands = [_uint8_source(arg) for arg in node.args[:2]]
        if None in operands:
            return None
        (qa, a_scale, a_zero), (qb, b_scale, b_zero) = operands  # type: ignore[misc]
        graph = graph_module.graph
        new: list[Node] = []

        def call(target: object, *args: object, **kwargs: object) -> Node:
            new.append(graph.call_function(target, args, kwargs))  # type: ignore[arg-type]
            return new[-1]

        a_zero, b_zero = a_zero - 128, b_zero - 128  # the zero points on the int8 grids
        with graph.inserting_before(node):
            # x - 128 as int8 is x with its top bit flipped: an xor and a reinterpretation, which inductor
            # vectorizes (a detour through int16 made the softmax kernel feeding it about 5x slower)
            a, b = (call(aten.view.dtype, call(aten.bitwise_xor.Scalar, q, 128), torch.int8) for q in (qa, qb))
            total = call(torch.ops.sq_pt2e.int8_bmm.default, a, b)
            if b_zero:
                rows = call(aten.sum.dim_IntList, a, [-1], True, dtype=torch.int32)
                total = call(aten.sub.Tensor, total, call(aten.mul.Tensor, rows, b_zero))
            if a_zero:  # sums of B' - zb', which carry the constant term K * za' * zb'
                centered = call(aten.sub.Tensor, call(aten._to_copy.default, b, dtype=torch.int32), b_zero)
                columns = call(aten.sum.dim_IntList, centered, [-2], True, dtype=torch.int32)
                total = call(aten.sub.Tensor, total, call(aten.mul.Tensor, columns, a_zero))
            out = call(aten.mul.Tensor, call(aten._to_copy.default, total, dtype=torch.float32), a_scale * b_scale)
        return Rewrite(out, also_tag=tuple(new[:-1]))


def _uint8_source(node: object) -> tuple[Node, float, int] | None:
    """``(uint8 node, scale, zero point)`` of ``dq(q(x))`` on a uint8 per-tensor grid with scalar parameters."""
    if not (isinstance(node, Node) and node.target == DEQUANTIZE_PER_TENSOR[0]):
        return None
    quantize = node.args[0]
    if not (isinstance(quantize, Node) and quantize.target == QUANTIZE_PER_TENSOR[0]):
        return None
    scale, zero, low, high, dtype = quantize.args[1:6]
    if (low, high, dtype) != (0, 255, torch.uint8) or node.args[1:6] != quantize.args[1:6]:
        return None
    return quantize, float(scale), int(zero)  # type: ignore[return-value,arg-type]
