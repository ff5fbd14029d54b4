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
    int8_attention_supported,
    quantized_attention_count,
)
from sq_pt2e.errors import BackendError, PlanError, QuantizationError
from sq_pt2e.export import export_speech_model
from sq_pt2e.hardware import CpuInfo
from sq_pt2e.passes.attention_as_int_mm import AttentionAsIntMmPass, int8_bmm
from sq_pt2e.passes.sdpa_as_matmuls import SdpaAsMatmulsPass, attention_matmuls
from sq_pt2e.plan import QuantPlan
from sq_pt2e.quantizer import StableQuantQuantizer
from sq_pt2e.testing import tiny_quantized_model

pytestmark = pytest.mark.usefixtures("single_thread")

aten = torch.ops.aten
INT8_ATTENTION = QuantPlan(attention="int8")
WITH_VNNI = CpuInfo("Test CPU with VNNI", ("avx2", "avx512f", "avx512_vnni"), 2)
AVX2_ONLY = CpuInfo("Test CPU with AVX2", ("avx2", "fma"), 2)
needs_vnni = pytest.mark.skipif(not int8_attention_supported(),
                                reason="int8 attention needs VNNI (int8 GEMMs) or AMX-INT8 (torchao's fused kernel)")


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


def test_fit_plan_keeps_attention_float_without_vnni() -> None:
    with pytest.warns(UserWarning, match="VNNI or AMX-INT8"):
        fitted, changed = fit_plan_to_cpu(INT8_ATTENTION, AVX2_ONLY)
    assert fitted.attention == "float"
    assert fit_plan_to_cpu(INT8_ATTENTION, WITH_VNNI)[0].attention == "int8"
    pinned = dataclasses.replace(INT8_ATTENTION, attention_scales=((0.01, 0.02, 0.03),))
    with pytest.warns(UserWarning, match="VNNI or AMX-INT8"):
        fitted, _ = fit_plan_to_cpu(pinned, AVX2_ONLY)
    assert (fitted.attention, fitted.attention_scales) == ("float", ())  # the fixed scales go with int8 attention


def test_compiling_int8_attention_without_vnni_is_a_clear_error(monkeypatch) -> None:
    tiny = tiny_quantized_model("tiny-wav2vec2", INT8_ATTENTION)
    monkeypatch.setattr(inductor_backend, "int8_attention_supported", lambda: False)
    with pytest.raises(BackendError, match="2 int8 attention blocks.*VNNI or AMX-INT8"):
        compile_inductor(tiny.quantized.converted, tiny.example)


@needs_vnni
def test_int8_bmm_is_the_exact_integer_product_for_any_strides() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (2, 3, 7, 16), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (2, 3, 9, 16), dtype=torch.int8, generator=generator).transpose(-1, -2)
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


@needs_vnni
def test_attention_as_int_mm_rewrites_both_matmuls_of_each_block() -> None:
    tiny = tiny_quantized_model("tiny-hubert", INT8_ATTENTION)
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


@needs_vnni
def test_int8_attention_compiles_to_int8_kernels_and_matches_eager() -> None:
    tiny = tiny_quantized_model("tiny-wav2vec2", INT8_ATTENTION)
    compiled = compile_inductor(tiny.quantized.converted, tiny.example)
    assert compiled.report.int8_attention_in_graph == 2
    assert compiled.report.int8_attention_kernels == 2
    assert compiled.report.cosine > 0.999
    # the int8-GEMM route, which AMX CPUs take too when asked (compiled buckets do)
    as_gemms = compile_inductor(tiny.quantized.converted, tiny.example, fused_attention=False)
    assert as_gemms.report.int8_attention_kernels == 2 and as_gemms.report.cosine > 0.999


@needs_vnni
def test_int8_attention_is_packaged_ahead_of_time(tmp_path) -> None:
    """AOTInductor packages run int8 attention as int8 GEMMs (the custom op through AOTI's proxy executor)."""
    from sq_pt2e.backends.inductor import compile_aot_package, load_aot_package

    tiny = tiny_quantized_model("tiny-hubert", INT8_ATTENTION)
    compiled = compile_aot_package(tiny.quantized.converted, tiny.example, tmp_path / "int8.pt2")
    assert compiled.report.int8_attention_in_graph == compiled.report.int8_attention_kernels == 2
    assert compiled.report.cosine > 0.999
    with torch.no_grad():
        torch.testing.assert_close(load_aot_package(tmp_path / "int8.pt2")(tiny.example), compiled.verified_output)
