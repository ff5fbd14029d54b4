"""Run int8 attention's two matmuls as int8 GEMMs (``torch._int_mm``) on VNNI CPUs without AMX.

A plan with ``attention="int8"`` quantizes ``q``, ``k``, ``v`` and the attention
probabilities to uint8 (:mod:`sq_pt2e.passes.sdpa_as_matmuls`), so a converted graph
holds ``matmul(dq(A), dq(B))`` twice per attention block. Inductor would run those as float
``bmm`` on dequantized values. This pass writes each as an exact integer product instead:

``dq(A) @ dq(B) = sa * sb * (A' @ B' - zb' * rowsum(A') - za' * colsum(B' - zb'))``

where ``A' = A - 128`` is the uint8 tensor shifted to signed int8 (zero point
``za' = za - 128``; inductor fuses the shift into the kernel that quantizes; an int8
operand is quantized by aten ops, which inductor fuses likewise) and ``A' @ B'`` is
:func:`int8_bmm`, one ``torch._int_mm`` (oneDNN, int8 x int8 with int32 sums) per batch
and head. This project's quantizer makes ``q``, ``k`` and ``v`` symmetric (zero point
128, or int8 on ``-63..63`` for 7-bit ``k`` and ``v``, so ``za' = 0``): only the
probabilities' zero point (0, so ``za' = -128``) leaves a sum, ``128 * colsum(V')``, a few
values per head. The sums and the scaling are aten ops that inductor fuses with the
softmax around them. Integer products are exact, so the result
equals the dequantized float matmul up to float rounding.

Runs on the output of ``convert_pt2e``, before ``torch.compile`` (or in eager).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.passes.rewrite_utils import DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR, NodeRewritePass, Rewrite

__all__ = ["AttentionAsIntMmPass", "int8_attention_operand", "int8_bmm"]

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
    """Rewrite 4-D ``matmul(dq(q(x)), dq(q(y)))`` (uint8 or int8, per tensor) as :func:`int8_bmm` plus
    zero-point sums."""

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        if node.op != "call_function" or node.target != aten.matmul.default or node.meta["val"].dim() != 4:
            return None
        operands = [int8_attention_operand(arg) for arg in node.args[:2]]
        if None in operands:
            return None
        (qa, a_scale, a_zero, _), (qb, b_scale, b_zero, _) = operands  # type: ignore[misc]
        graph = graph_module.graph
        new: list[Node] = []

        def call(target: object, *args: object, **kwargs: object) -> Node:
            new.append(graph.call_function(target, args, kwargs))  # type: ignore[arg-type]
            return new[-1]

        with graph.inserting_before(node):
            a, b = (_as_int8(q, call) for q in (qa, qb))
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


def _as_int8(quantize: Node, call: Callable[..., Node]) -> Node:
    """The int8 operand of a quantize op: uint8 shifted by -128 (zero point too), int8 recomputed."""
    if quantize.args[5] == torch.int8:
        # written out as quantize_per_tensor computes it, because torch 2.13's inductor would fuse the
        # quantize op into the qlinear before it and there give the int8 output a uint8 buffer and
        # clamp it to -128..127 instead of the operand's narrower grid (k and v on 7 bits)
        x, scale, zero, low, high = quantize.args[:5]
        scaled = call(aten.round.default, call(aten.mul.Tensor, x, 1.0 / scale))  # type: ignore[operator]
        shifted = call(aten.add.Tensor, scaled, zero) if zero else scaled
        return call(aten._to_copy.default, call(aten.clamp.default, shifted, low, high), dtype=torch.int8)
    # x - 128 as int8 is x with its top bit flipped: an xor and a reinterpretation, which inductor
    # vectorizes (a detour through int16 made the softmax kernel feeding it about 5x slower)
    return call(aten.view.dtype, call(aten.bitwise_xor.Scalar, quantize, 128), torch.int8)


def int8_attention_operand(node: object) -> tuple[Node, float, int, tuple[int, int]] | None:
    """``(quantize node, scale, zero point, (low, high))`` of ``dq(q(x))`` on a per-tensor grid with
    scalar parameters, the zero point and the range as on the int8 grid the GEMM multiplies
    (a uint8 grid shifted by -128)."""
    if not (isinstance(node, Node) and node.target == DEQUANTIZE_PER_TENSOR[0]):
        return None
    quantize = node.args[0]
    if not (isinstance(quantize, Node) and quantize.target == QUANTIZE_PER_TENSOR[0]):
        return None
    scale, zero, low, high, dtype = quantize.args[1:6]
    if node.args[1:6] != quantize.args[1:6] or dtype not in (torch.uint8, torch.int8):
        return None
    shift = 128 if dtype == torch.uint8 else 0
    return quantize, float(scale), int(zero) - shift, (int(low) - shift, int(high) - shift)  # type: ignore[arg-type]
