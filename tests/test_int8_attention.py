"""Int8 attention: the matmul rewrite, its quantization, the plan flag, its int8 kernels under inductor."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sq_pt2e.backends import inductor as inductor_backend
from sq_pt2e.backends.inductor import compile_inductor, fit_plan_to_cpu
from sq_pt2e.backends.int8_attention import (
    attention_kernel_calls,
    attention_kv_bits,
    fused_int8_attention_supported,
    quantized_attention_count,
)
from sq_pt2e.errors import BackendError, PlanError, QuantizationError
from sq_pt2e.export import export_speech_model
from sq_pt2e.hardware import CpuInfo, cpu_info
from sq_pt2e.passes.attention_as_int_mm import AttentionAsIntMmPass, int8_bmm
from sq_pt2e.passes.sdpa_as_matmuls import SdpaAsMatmulsPass, attention_matmuls
from sq_pt2e.plan import QuantPlan
from sq_pt2e.quantizer import StableQuantQuantizer
from sq_pt2e.testing import tiny_quantized_model

pytestmark = pytest.mark.usefixtures("single_thread")

aten = torch.ops.aten
INT8_ATTENTION = QuantPlan(attention="int8")
KV7_ATTENTION = QuantPlan(attention="int8", attention_kv_bits=7)
WITH_VNNI = CpuInfo("Test CPU with VNNI", ("avx2", "avx512f", "avx512_vnni"), 2)
AVX2_ONLY = CpuInfo("Test CPU with AVX2", ("avx2", "fma"), 2)
needs_vnni = pytest.mark.skipif(cpu_info().exact_int8_operand_bits < 8,
                                reason="8-bit second operands of int8 GEMMs saturate int16 sums without VNNI")


@pytest.mark.parametrize("name", ["tiny_wav2vec2", "tiny_hubert"])
def test_sdpa_as_matmuls_keeps_the_float_output(name, request, example_wave) -> None:
    model = request.getfixturevalue(name)
    graph = export_speech_model(model, example_wave).module()
    reference = graph(example_wave)
    assert SdpaAsMatmulsPass()(graph).modified
    targets = [n.target for n in graph.graph.nodes]
    assert aten.scaled_dot_product_attention.default not in targets
    assert len(attention_matmuls(graph)) == 2 == targets.count(aten.softmax.int)
    assert targets.count(aten.clone.default) >= 2  # the head transpose is made contiguous before the output proj
    torch.testing.assert_close(graph(example_wave), reference, rtol=1e-5, atol=1e-5)


def test_a_boolean_mask_becomes_additive_and_dropout_is_left_alone() -> None:
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    class Dropout(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=generator) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 3:] = False  # the last two frames are padding: no query attends to them
    graph = torch.export.export(Attention(), (q, k, v, mask)).module()
    assert SdpaAsMatmulsPass()(graph).modified
    assert len(attention_matmuls(graph)) == 1
    torch.testing.assert_close(graph(q, k, v, mask), Attention()(q, k, v, mask), rtol=1e-5, atol=1e-6)
    assert not SdpaAsMatmulsPass()(torch.export.export(Dropout(), (q, k, v)).module()).modified


def test_plan_attention_round_trips_and_is_validated() -> None:
    assert QuantPlan.from_dict(INT8_ATTENTION.to_dict()).attention == "int8"
    legacy = QuantPlan().to_dict()
    del legacy["attention"]
    assert QuantPlan.from_dict(legacy).attention == "float"
    with pytest.raises(PlanError, match="attention='int4'"):
        QuantPlan(attention="int4")
    assert "attention_scales" not in INT8_ATTENTION.to_dict()  # plans without fixed scales keep their bytes
    for bad in (((0.1, 0.2),), ((0.1, 0.2, -0.3),), ((0.1, 0.2, float("nan")),), ((0.1, 0.2, True),)):
        with pytest.raises(PlanError, match=r"attention_scales\[0\].*three positive scales"):
            QuantPlan(attention="int8", attention_scales=bad)
    with pytest.raises(PlanError, match="list of \\[q, k, v\\] scale lists"):
        QuantPlan.from_dict({**INT8_ATTENTION.to_dict(), "attention_scales": [0.1, 0.2, 0.3]})


def test_plan_attention_kv_bits_round_trip_and_are_validated() -> None:
    assert "attention_kv_bits" not in INT8_ATTENTION.to_dict()
    assert QuantPlan.from_dict(KV7_ATTENTION.to_dict()) == KV7_ATTENTION
    for bad in (6, 9, True, "7"):
        with pytest.raises(PlanError, match="attention_kv_bits="):
            QuantPlan(attention="int8", attention_kv_bits=bad)
    with pytest.raises(PlanError, match="attention_kv_bits=7 is for int8 attention"):
        QuantPlan(attention_kv_bits=7)
    assert KV7_ATTENTION.with_float_attention() == QuantPlan()


def test_int8_attention_quantizes_q_k_v_and_probabilities() -> None:
    tiny = tiny_quantized_model("tiny-hubert", INT8_ATTENTION)
    graph = tiny.quantized.converted
    assert quantized_attention_count(graph) == 2
    for scores, context in attention_matmuls(graph):
        probabilities = context.args[0]
        assert probabilities.args[1:3] == (pytest.approx(1 / 255), 0)  # fixed 1/255 grid, zero point 0
        for operand in (*scores.args, context.args[1]):  # q, k^T, v: symmetric, so no zero-point sums
            assert operand.args[2:6] == (128, 0, 255, torch.uint8)
    with torch.no_grad():
        int8 = graph(tiny.example)
    assert torch.nn.functional.cosine_similarity(int8.flatten(), tiny.float_logits().flatten(), dim=0) > 0.99
    assert quantized_attention_count(tiny_quantized_model("tiny-hubert").quantized.converted) == 0


def test_int8_attention_is_refused_for_xnnpack_and_for_graphs_without_attention() -> None:
    with pytest.raises(QuantizationError, match="x86_inductor"):
        StableQuantQuantizer(INT8_ATTENTION, target="xnnpack")

    class NoAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    graph = torch.export.export(NoAttention(), (torch.randn(2, 4),)).module()
    with pytest.raises(QuantizationError, match="no attention"):
        prepare_pt2e(graph, StableQuantQuantizer(INT8_ATTENTION))


def test_the_simulation_refuses_int8_attention_and_eval_runs_the_converted_graph(tiny_hubert, example_wave,
                                                                               calibration_waves) -> None:
    from sq_pt2e.baselines import build_method
    from sq_pt2e.simulate import plan_layer_quants

    with pytest.raises(PlanError, match="does not model"):
        plan_layer_quants(tiny_hubert, INT8_ATTENTION, {})
    forward = build_method("stablequant", tiny_hubert, calibration_waves, {}, plan=INT8_ATTENTION)
    longer = torch.cat([example_wave, example_wave], dim=1)  # exported for any length
    assert forward(longer).shape[1] > forward(example_wave).shape[1]


def test_fit_plan_narrows_k_and_v_to_7_bits_without_vnni() -> None:
    fitted, changed = fit_plan_to_cpu(INT8_ATTENTION, AVX2_ONLY)
    assert changed and (fitted.attention, fitted.attention_kv_bits) == ("int8", 7)
    assert fit_plan_to_cpu(INT8_ATTENTION, WITH_VNNI) == (INT8_ATTENTION, False)
    pinned = dataclasses.replace(INT8_ATTENTION, attention_scales=((0.01, 0.02, 0.03),))
    (scales,) = fit_plan_to_cpu(pinned, AVX2_ONLY)[0].attention_scales
    # q keeps its grid; k and v keep their range (127.5 steps each side on 8 bits, 63 on 7)
    assert scales == pytest.approx((0.01, 0.02 * 127.5 / 63, 0.03 * 127.5 / 63))
    assert fit_plan_to_cpu(fit_plan_to_cpu(pinned, AVX2_ONLY)[0], AVX2_ONLY)[1] is False  # fitting twice: no change


def test_7_bit_k_and_v_are_int8_grids_that_q_and_the_probabilities_do_not_share() -> None:
    graph = tiny_quantized_model("tiny-hubert", KV7_ATTENTION).quantized.converted
    assert quantized_attention_count(graph) == 2 and attention_kv_bits(graph) == 7
    for scores, context in attention_matmuls(graph):
        assert scores.args[0].args[2:6] == (128, 0, 255, torch.uint8)  # q
        for operand in (scores.args[1], context.args[1]):  # k^T, v
            assert operand.args[2:6] == (0, -63, 63, torch.int8)
    assert attention_kv_bits(tiny_quantized_model("tiny-hubert", INT8_ATTENTION).quantized.converted) == 8
    assert attention_kv_bits(tiny_quantized_model("tiny-hubert").quantized.converted) == 0


def test_compiling_8_bit_k_and_v_without_vnni_is_a_clear_error(monkeypatch) -> None:
    tiny = tiny_quantized_model("tiny-wav2vec2", INT8_ATTENTION)
    monkeypatch.setattr(inductor_backend, "cpu_info", lambda: AVX2_ONLY)
    with pytest.raises(BackendError, match="2 int8 attention blocks have 8-bit k or v.*attention_kv_bits=7"):
        compile_inductor(tiny.quantized.converted, tiny.example)


def test_int8_bmm_is_the_exact_integer_product_for_any_strides() -> None:
    generator = torch.Generator().manual_seed(0)
    limit = 2 ** (cpu_info().exact_int8_operand_bits - 1)  # b: within what this CPU multiplies exactly
    a = torch.randint(-128, 128, (2, 3, 7, 16), dtype=torch.int8, generator=generator)
    b = torch.randint(-limit, limit, (2, 3, 9, 16), dtype=torch.int8, generator=generator).transpose(-1, -2)
    expected = (a.long() @ b.long()).int()
    assert torch.equal(int8_bmm(a, b), expected)
    assert torch.equal(int8_bmm(a, b.contiguous()), expected)


def test_int8_bmm_refuses_other_dtypes_and_shapes() -> None:
    a = torch.zeros(1, 2, 3, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 operands.*torch.uint8"):
        int8_bmm(a, torch.zeros(1, 2, 4, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"do not multiply: \(1, 2, 3, 4\) @ \(1, 2, 3, 5\)"):
        int8_bmm(a, torch.zeros(1, 2, 3, 5, dtype=torch.int8))


@needs_vnni
@pytest.mark.parametrize("zero_points", [(0, 128), (128, 7), (37, 200), (128, 128)])
def test_attention_as_int_mm_equals_the_dequantized_matmul(zero_points) -> None:
    class QuantizedMatmul(torch.nn.Module):
        def forward(self, x, y):
            qdq = torch.ops.quantized_decomposed
            a = qdq.dequantize_per_tensor(qdq.quantize_per_tensor(x, 0.02, zero_points[0], 0, 255, torch.uint8),
                                          0.02, zero_points[0], 0, 255, torch.uint8)
            b = qdq.dequantize_per_tensor(qdq.quantize_per_tensor(y, 0.03, zero_points[1], 0, 255, torch.uint8),
                                          0.03, zero_points[1], 0, 255, torch.uint8)
            return torch.matmul(a, b)

    x, y = torch.rand(1, 2, 5, 8) * 3 - 1, torch.randn(1, 2, 8, 6)
    graph = torch.export.export(QuantizedMatmul(), (x, y)).module()
    reference = graph(x, y)
    assert AttentionAsIntMmPass()(graph).modified
    assert [n.target for n in graph.graph.nodes].count(torch.ops.sq_pt2e.int8_bmm.default) == 1
    assert aten.matmul.default not in [n.target for n in graph.graph.nodes]
    torch.testing.assert_close(graph(x, y), reference, rtol=1e-5, atol=1e-5)


def test_attention_as_int_mm_quantizes_int8_operands_without_a_shift() -> None:
    class QuantizedMatmul(torch.nn.Module):  # uint8 probabilities (zero point 0) times 7-bit int8 v
        def forward(self, x, y):
            qdq = torch.ops.quantized_decomposed
            a = qdq.dequantize_per_tensor(qdq.quantize_per_tensor(x, 1 / 255, 0, 0, 255, torch.uint8),
                                          1 / 255, 0, 0, 255, torch.uint8)
            b = qdq.dequantize_per_tensor(qdq.quantize_per_tensor(y, 0.03, 0, -63, 63, torch.int8),
                                          0.03, 0, -63, 63, torch.int8)
            return torch.matmul(a, b)

    x, y = torch.rand(1, 2, 5, 8), torch.randn(1, 2, 8, 6)
    graph = torch.export.export(QuantizedMatmul(), (x, y)).module()
    reference = graph(x, y)
    assert AttentionAsIntMmPass()(graph).modified
    targets = [n.target for n in graph.graph.nodes]
    assert targets.count(aten.bitwise_xor.Scalar) == 1  # only the uint8 operand is shifted
    torch.testing.assert_close(graph(x, y), reference, rtol=1e-5, atol=1e-5)


def test_attention_as_int_mm_rewrites_both_matmuls_of_each_block() -> None:
    tiny = tiny_quantized_model("tiny-hubert", INT8_ATTENTION, fit_to_cpu=True)
    graph = copy.deepcopy(tiny.quantized.converted)
    with torch.no_grad():
        reference = graph(tiny.example)
        assert AttentionAsIntMmPass()(graph).modified
        rewritten = graph(tiny.example)
    assert [n.target for n in graph.graph.nodes].count(torch.ops.sq_pt2e.int8_bmm.default) == 4
    assert quantized_attention_count(graph) == 0
    torch.testing.assert_close(rewritten, reference, rtol=1e-5, atol=1e-5)
    float_graph = tiny_quantized_model("tiny-hubert").quantized.converted
    assert not AttentionAsIntMmPass()(float_graph).modified


def test_attention_kernel_calls_count_call_sites_of_the_fused_kernel() -> None:
    source = (
        "cpp_fused_a_1 = async_compile.cpp_pybinding(['const uint8_t*'], r'''\n"
        "void kernel(const uint8_t* query, const uint8_t* key, const uint8_t* value, uint8_t* output)\n{}\n''')\n"
        "cpp_fused_b_2 = async_compile.cpp_pybinding(['const float*'], r'''\nvoid kernel(const float* in_ptr0)\n''')\n"
        "def call(args):\n    cpp_fused_a_1(buf0, buf1)\n    cpp_fused_b_2(buf2)\n    cpp_fused_a_1(buf3, buf4)\n"
    )
    assert attention_kernel_calls([source]) == 2
    assert attention_kernel_calls([source.replace("uint8_t* query", "float* query")]) == 0
    bmm = "    buf5 = torch.ops.sq_pt2e.int8_bmm.default(buf3, buf4)\n"
    assert attention_kernel_calls([bmm * 4 + "    assert_size_stride(buf5, 'torch.ops.sq_pt2e.int8_bmm.default')"]) == 2
    package_wrapper = '{"nodes": [' + ', '.join(['{"name": "buf64", "node": {"target": "sq_pt2e::int8_bmm"}}'] * 6)
    assert attention_kernel_calls([package_wrapper]) == 3


def test_int8_attention_compiles_to_int8_kernels_and_matches_eager() -> None:
    tiny = tiny_quantized_model("tiny-wav2vec2", INT8_ATTENTION, fit_to_cpu=True)
    compiled = compile_inductor(tiny.quantized.converted, tiny.example)
    assert compiled.report.int8_attention_in_graph == 2
    assert compiled.report.int8_attention_kernels == 2
    assert compiled.report.cosine > 0.999
    # the int8-GEMM route, which AMX CPUs take too when asked (compiled buckets do)
    as_gemms = compile_inductor(tiny.quantized.converted, tiny.example, fused_attention=False)
    assert as_gemms.report.int8_attention_kernels == 2 and as_gemms.report.cosine > 0.999


@pytest.mark.skipif(fused_int8_attention_supported() or torch._C._dispatch_has_kernel_for_dispatch_key(
    "torchao::qscaled_dot_product", "CPU"), reason="the fused route works here: nothing to fall back from")
def test_a_failing_fused_attention_kernel_falls_back_to_int8_gemms(monkeypatch) -> None:
    """Without AMX, torchao's lowering calls its op, which has no CPU kernel: compiling falls back, with a warning."""
    monkeypatch.setattr(inductor_backend, "fused_int8_attention_supported", lambda cpu=None: True)
    tiny = tiny_quantized_model("tiny-wav2vec2", INT8_ATTENTION, fit_to_cpu=True)
    with pytest.warns(UserWarning, match="running int8 attention as int8 GEMMs"):
        compiled = compile_inductor(tiny.quantized.converted, tiny.example)
    report = compiled.report
    assert report.int8_attention_kernels == 2 and report.cosine > 0.999
    assert "qscaled_dot_product" in report.attention_fallback and "(int8 GEMMs: " in report.attention_note


def test_int8_attention_is_packaged_ahead_of_time(tmp_path) -> None:
    """AOTInductor packages run int8 attention as int8 GEMMs (the custom op through AOTI's proxy executor)."""
    from sq_pt2e.backends.inductor import compile_aot_package, load_aot_package

    tiny = tiny_quantized_model("tiny-hubert", INT8_ATTENTION, fit_to_cpu=True)
    compiled = compile_aot_package(tiny.quantized.converted, tiny.example, tmp_path / "int8.pt2")
    assert compiled.report.int8_attention_in_graph == compiled.report.int8_attention_kernels == 2
    assert compiled.report.cosine > 0.999
    with torch.no_grad():
        torch.testing.assert_close(load_aot_package(tmp_path / "int8.pt2")(tiny.example), compiled.verified_output)


_UNDER_AVX2_CAP = """
import json
import torch
from sq_pt2e.backends.inductor import compile_inductor
from sq_pt2e.hardware import cpu_info
from sq_pt2e.passes.attention_as_int_mm import int8_bmm
from sq_pt2e.plan import QuantPlan
from sq_pt2e.testing import tiny_quantized_model

torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)
a = torch.randint(-128, 128, (1, 2, 64, 64), dtype=torch.int8, generator=generator)
b = torch.randint(-128, 128, (1, 2, 64, 64), dtype=torch.int8, generator=generator)
exact = {bits: torch.equal(int8_bmm(a, operand), (a.long() @ operand.long()).int())
         for bits, operand in ((8, b), (7, b // 2))}
tiny = tiny_quantized_model("tiny-hubert", QuantPlan(attention="int8"), fit_to_cpu=True)
report = compile_inductor(tiny.quantized.converted, tiny.example).report
print(json.dumps({"exact_bits": cpu_info().exact_int8_operand_bits, "exact": exact,
                  "kv_bits": tiny.quantized.plan.attention_kv_bits, "kernels": report.int8_attention_kernels,
                  "cosine": report.cosine}))
"""


def test_int8_attention_is_exact_where_onednn_has_no_vnni() -> None:
    """Under ``ONEDNN_MAX_CPU_ISA=AVX2`` (an AVX2-only CPU as oneDNN sees it), 8-bit second operands
    saturate the int8 GEMMs; the plan fitted to that CPU has 7-bit k and v, which compile exactly."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", _UNDER_AVX2_CAP], capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exact_bits"] == 7
    assert result["exact"] == {"8": False, "7": True}  # the saturation the narrowing avoids
    assert (result["kv_bits"], result["kernels"]) == (7, 2)
    assert result["cosine"] > 0.999
