"""Int8 attention under inductor: torchao's fused kernel on AMX CPUs, int8 GEMMs on other CPUs.

With ``QuantPlan.attention == "int8"`` the quantizer writes attention as two matmuls
(:class:`~sq_pt2e.passes.sdpa_as_matmuls.SdpaAsMatmulsPass`) and quantizes ``q``, ``k``,
``v`` and the attention probabilities to uint8. Inductor then sees
``dq -> matmul -> softmax -> q/dq -> matmul -> q``. On AMX-INT8 CPUs torchao's pattern
(``torchao.prototype.inductor.fx_passes.qsdpa_fusion``) replaces it by one fused kernel,
``torchao::qscaled_dot_product``: a C++ template built on AMX tiles (without AMX the op has
no fast CPU kernel). On other CPUs the two matmuls run as int8 GEMMs
(:class:`~sq_pt2e.passes.attention_as_int_mm.AttentionAsIntMmPass`), the softmax between
them in float. Without VNNI, oneDNN sums pairs of u8*s8 products in a saturating int16, as
for W8A8 layers: there ``k`` and ``v`` (the GEMMs' second operands) take 7-bit grids
(``QuantPlan.attention_kv_bits``, set by ``backends.inductor.fit_plan_to_cpu``), whose
products cannot saturate, and :func:`attention_kv_bits` lets the compiler refuse wider ones.

torch 2.13's joint-graph pass rewrites ``softmax(x * s)`` into
``where(all(isfinite(x * s)), (x - amax(x)) * s, x * s - amax(x * s))``: torchao's
pattern, written for the stable branch alone, then matches nothing, and the global ``all``
makes inductor's fused softmax kernel about ten times slower (26 instead of ~3 ms per
HuBERT-large layer at 10 s). The scores of an int8 ``q @ k^T`` are finite, so there the
stable branch is exact: :class:`Int8AttentionPatterns` keeps it before matching.
"""

from __future__ import annotations

import functools
import re

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import PatternMatcherPass
from torch.fx import Graph, GraphModule, Node

from sq_pt2e.hardware import CpuInfo, cpu_info
from sq_pt2e.passes.rewrite_utils import DEQUANTIZE_PER_TENSOR
from sq_pt2e.passes.attention_as_int_mm import int8_attention_operand
from sq_pt2e.passes.sdpa_as_matmuls import attention_matmuls

__all__ = ["Int8AttentionPatterns", "attention_kernel_calls", "attention_kv_bits", "fused_int8_attention_supported",
           "int8_attention_patterns", "quantized_attention_count"]

aten = torch.ops.aten
_KERNEL_DEFINITION = re.compile(r"(\w+) = async_compile\.cpp_pybinding\((.*?)'''\)", re.DOTALL)
_ATTENTION_SIGNATURE = "kernel(const uint8_t* query, const uint8_t* key, const uint8_t* value"
# a call in inductor's Python wrapper, or an extern node of an AOTInductor package's wrapper.json
_INT8_BMM_CALL = re.compile(r'= torch\.ops\.sq_pt2e\.int8_bmm\.default\(|"target": "sq_pt2e::int8_bmm"')


def fused_int8_attention_supported(cpu: CpuInfo | None = None) -> bool:
    """Whether this CPU runs torchao's fused int8 attention kernel (it needs AMX-INT8 tiles)."""
    return (cpu or cpu_info()).has_amx_int8 and torch.cpu._is_amx_tile_supported()


def quantized_attention_count(graph_module: GraphModule) -> int:
    """Attention blocks of a converted graph whose ``q @ k^T`` reads dequantized int8 ``q`` and ``k``."""
    return sum(1 for scores, _ in attention_matmuls(graph_module)
               if all(isinstance(a, Node) and a.target in DEQUANTIZE_PER_TENSOR for a in scores.args[:2]))


def attention_kv_bits(graph_module: GraphModule) -> int:
    """Bits of the widest ``k`` / ``v`` grid (the second operands of the attention matmuls) of a
    converted graph's quantized attention blocks, as signed int8 grids; 0 without such blocks."""
    widest = 0
    for matmul in (m for pair in attention_matmuls(graph_module) for m in pair):
        operand = int8_attention_operand(matmul.args[1])
        if operand is not None:
            low, high = operand[3]
            widest = max(widest, (max(-low, high + 1) - 1).bit_length() + 1)
    return widest


def attention_kernel_calls(sources: list[str]) -> int:
    """Attention blocks that inductor's generated code runs on int8 kernels.

    A block is one call of the fused kernel (AMX), or two calls of
    :func:`~sq_pt2e.passes.attention_as_int_mm.int8_bmm` (its two matmuls, other CPUs).
    """
    calls = bmm_calls = 0
    for source in sources:
        for name, body in _KERNEL_DEFINITION.findall(source):
            if _ATTENTION_SIGNATURE in body:
                calls += len(re.findall(rf"(?<![\w.]){re.escape(name)}\(", source))
        bmm_calls += len(_INT8_BMM_CALL.findall(source))
    return calls + bmm_calls // 2


def _reads_dequantized_matmul(node: Node) -> bool:
    """Whether ``node`` is the scores of int8 attention: ``(bmm(dq(a), dq(b)) viewed) * c``, or the
    scaled int32 products of :func:`~sq_pt2e.passes.attention_as_int_mm.int8_bmm` with their zero-point sums."""
    while node.target in (aten.mul.Tensor, aten.div.Tensor, aten.reshape.default, aten.view.default,
                          aten.expand.default, aten.sub.Tensor, torch.ops.prims.convert_element_type.default):
        node = node.args[0]
    if node.target == torch.ops.sq_pt2e.int8_bmm.default:
        return True
    if node.target != aten.bmm.default:
        return False
    for operand in node.args:
        while operand.target in (aten.reshape.default, aten.view.default, aten.expand.default, aten.clone.default):
            operand = operand.args[0]
        if operand.target not in DEQUANTIZE_PER_TENSOR:
            return False
    return True


def _keep_stable_softmax(graph: Graph) -> int:
    """Replace the finiteness guard of int8 attention's scaled softmax by its stable branch; returns the count."""
    kept = 0
    for node in list(graph.nodes):
        if node.target != aten.where.self:
            continue
        condition, stable, original = node.args
        guarded = (isinstance(condition, Node) and condition.target == aten.logical_not.default
                   and condition.args[0].target == aten.any.dims)
        if guarded and original.target == aten.sub.Tensor and _reads_dequantized_matmul(original.args[0]):
            node.replace_all_uses_with(stable)
            graph.erase_node(node)
            kept += 1
    if kept:
        graph.eliminate_dead_code()
    return kept


class Int8AttentionPatterns(PatternMatcherPass, CustomGraphPass):
    """Inductor post-grad pass: torchao's quantized-attention patterns, after :func:`_keep_stable_softmax`."""

    def __init__(self) -> None:
        from torchao.prototype.inductor.fx_passes.qsdpa_fusion import _register_qsdpa_lowerings

        super().__init__()
        _register_qsdpa_lowerings(self)

    def __call__(self, graph: Graph) -> None:
        _keep_stable_softmax(graph)
        self.apply(graph)

    def uuid(self) -> bytes:
        from torchao.prototype.inductor.fx_passes import qsdpa_fusion

        return get_hash_for_files((__file__, qsdpa_fusion.__file__))


@functools.lru_cache(maxsize=None)
def int8_attention_patterns() -> Int8AttentionPatterns:
    """The pass to set as ``torch._inductor.config.post_grad_custom_pre_pass`` (one instance per process)."""
    return Int8AttentionPatterns()
