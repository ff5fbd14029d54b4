"""Inductor backend: int8 kernels really used, compiled == eager int8, CPU-fitted plans."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sq_pt2e.backends.inductor import (
    AMX_GROUPED_CONV_REASON,
    SATURATION_REASON,
    compare_outputs,
    compile_inductor,
    fit_plan_to_cpu,
)
from sq_pt2e.errors import NumericsMismatchError
from sq_pt2e.hardware import CpuInfo, capped_by_onednn
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.recipes import default_plan
from sq_pt2e.testing import TinyQuantized, tiny_quantized_model

pytestmark = pytest.mark.usefixtures("single_thread")

AVX2_ONLY = CpuInfo("Test CPU without VNNI", ("avx2",), 2)
WITH_VNNI = CpuInfo("Test CPU with VNNI", ("avx2", "avx512f", "avx512_vnni"), 2)
WITH_AMX = CpuInfo("Test CPU with AMX", ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"), 2)
POS_CONV = "wav2vec2.encoder.pos_conv_embed.conv"
FC1 = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense"


# ------------------------------------------------------------------ fit_plan_to_cpu
def test_fit_plan_narrows_w8a8_to_w7a8_without_vnni() -> None:
    plan = QuantPlan(
        op_defaults=(LayerPlan("*", op="linear", reason="linear default"),),
        layers=(
            LayerPlan(FC1, weight_bits=4),
            LayerPlan("lm_head", act_bits=6),
            LayerPlan("wav2vec2.feature_projection.projection", skip=True, reason="float"),
        ),
    )
    fitted, changed = fit_plan_to_cpu(plan, AVX2_ONLY)
    assert changed
    assert (fitted.default.weight_bits, fitted.default.act_bits, fitted.default.reason) == (7, 8, SATURATION_REASON)
    (linear,) = fitted.op_defaults
    assert (linear.weight_bits, linear.reason) == (7, f"linear default; {SATURATION_REASON}")
    assert fitted.layers == plan.layers  # already narrower than W8A8, or float
    assert fitted.resolve("wav2vec2.encoder.layers.0.attention.k_proj", "linear").weight_bits == 7


def test_fit_plan_leaves_plans_alone_with_vnni() -> None:
    plan = default_plan("tiny-wav2vec2")
    fitted, changed = fit_plan_to_cpu(plan, WITH_VNNI)
    assert fitted is plan
    assert not changed


def test_fit_plan_keeps_small_group_convs_float_on_amx() -> None:
    plan = default_plan("tiny-wav2vec2")
    fitted, changed = fit_plan_to_cpu(plan, WITH_AMX, group_channels={POS_CONV: 16, "other.conv": 48, "small.conv": 4})
    assert changed
    pos = fitted.resolve(POS_CONV, "grouped_conv1d")
    assert pos.skip and pos.reason == f"{AMX_GROUPED_CONV_REASON} (16)"
    # 48 and 4 channels per group compute right
    assert not any(fitted.resolve(name, "grouped_conv1d").skip for name in ("other.conv", "small.conv"))
    assert fitted.default == plan.default  # W8A8 stays W8A8: AMX has VNNI
    assert fit_plan_to_cpu(plan, WITH_VNNI, group_channels={POS_CONV: 16}) == (plan, False)
    listed = dataclasses.replace(plan, layers=(LayerPlan(POS_CONV, op="grouped_conv1d", act_bits=6),))
    (only,) = fit_plan_to_cpu(listed, WITH_AMX, group_channels={POS_CONV: 8})[0].layers
    assert (only.skip, only.act_bits) == (True, 6)
    floated = dataclasses.replace(plan, layers=(LayerPlan(POS_CONV, op="grouped_conv1d", skip=True, reason="mine"),))
    assert fit_plan_to_cpu(floated, WITH_AMX, group_channels={POS_CONV: 8}) == (floated, False)


def test_group_channels_read_from_the_graph_or_the_model(tiny_wav2vec2, example_wave) -> None:
    from sq_pt2e.export import export_speech_model
    from sq_pt2e.graph import group_channels

    graph = export_speech_model(tiny_wav2vec2, example_wave).graph_module
    assert group_channels(graph) == group_channels(tiny_wav2vec2) == {POS_CONV: 32 // 8}


def test_fit_plan_reports_no_change_when_nothing_is_w8a8() -> None:
    plan = default_plan(weight_bits=6)
    assert fit_plan_to_cpu(plan, AVX2_ONLY) == (plan, False)


@pytest.mark.parametrize(("flags", "vnni"), [(("avx2",), False), (("avx_vnni",), True), (("amx_int8",), True)])
def test_cpu_info_vnni_flag(flags: tuple[str, ...], vnni: bool) -> None:
    assert CpuInfo("x", flags, 1).has_vnni is vnni
    assert CpuInfo("x", flags, 1).exact_int8_operand_bits == (8 if vnni else 7)


def test_onednn_isa_cap_hides_the_flags_onednn_will_not_use() -> None:
    amx = CpuInfo("Xeon", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"), 2)
    avx2 = capped_by_onednn(amx, "avx2")
    assert (avx2.flags, avx2.has_vnni, avx2.isa_cap) == (("avx2",), False, "AVX2")
    assert "oneDNN capped at AVX2" in avx2.summary()
    vnni = capped_by_onednn(amx, "AVX512_CORE_VNNI")
    assert vnni.has_vnni and not vnni.has_amx_int8 and "avx512_bf16" not in vnni.flags
    for unchanged in ("", "ALL", "AVX512_CORE_AMX", "not-an-isa"):
        assert capped_by_onednn(amx, unchanged) is amx
    plain = CpuInfo("EPYC", ("avx2",), 2)
    assert capped_by_onednn(plain, "AVX2") is plain  # nothing hidden: no cap to report


# ------------------------------------------------------------------ compare_outputs
def test_compare_outputs_gives_cosine_and_max_abs_difference() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cosine, max_diff = compare_outputs(a, a * 2)
    assert cosine == pytest.approx(1.0)
    assert max_diff == pytest.approx(1.0)
    assert compare_outputs(a, -a)[0] == pytest.approx(-1.0)


def test_compare_outputs_rejects_different_shapes() -> None:
    with pytest.raises(NumericsMismatchError, match=r"output shapes differ: \(2, 2\) vs \(4,\)"):
        compare_outputs(torch.zeros(2, 2), torch.zeros(4))


class _GroupedConv(torch.nn.Module):
    """A positional-conv-like layer: (B, T, C) -> grouped conv1d over time -> (B, T, C)."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def test_a_grouped_conv_with_16_channels_per_group_compiles_right_on_this_cpu(single_thread) -> None:
    """16 channels per group (the reference models' positional conv): oneDNN's AMX kernel gets it wrong,
    so on AMX CPUs quantize_model keeps it float; elsewhere it is int8. Either way compiled == eager."""
    from sq_pt2e.hardware import cpu_info
    from sq_pt2e.pipeline import quantize_exported

    torch.manual_seed(0)
    x = torch.randn(1, 49, 256)
    exported = torch.export.export(_GroupedConv(256, 16, 16).eval(), (x,))
    quantized = quantize_exported(exported, [(x,)], plan=default_plan())
    assert quantized.plan.resolve("conv", "grouped_conv1d").skip is cpu_info().has_amx_int8
    if not cpu_info().has_amx_int8:
        compiled = compile_inductor(quantized.converted, x, threads=1)  # raises if compiled != eager int8
        assert compiled.report.int8_kernel_count == 1


# ------------------------------------------------------------------ compile (about 20 s each)
@pytest.fixture(scope="module")
def tiny() -> TinyQuantized:
    torch.set_num_threads(1)
    # fit_to_cpu=True: on CPUs without VNNI the plan becomes W7A8, which inductor computes exactly.
    return tiny_quantized_model("tiny-wav2vec2", default_plan("tiny-wav2vec2"), fit_to_cpu=True)


def test_compiled_model_runs_one_int8_kernel_per_int8_layer_and_matches_eager(tiny: TinyQuantized) -> None:
    compiled = compile_inductor(tiny.quantized.converted, tiny.example, threads=1)
    report = compiled.report
    int8_layers = len(tiny.quantized.summary.int8_layers)
    # every conv1d / linear, and the grouped positional conv unless fit_plan_to_cpu kept it float (AMX CPUs)
    pos_int8 = int(not tiny.quantized.plan.resolve(POS_CONV, "grouped_conv1d").skip)
    assert int8_layers == 21 + pos_int8
    assert report.int8_layers_in_graph == int8_layers
    assert report.int8_kernel_count == int8_layers
    # conv0 (one input channel) and the grouped positional conv stay convolutions; CNN convs 1-6
    # run as int8 GEMMs (QuantizedConv1dAsGemmPass) beside the 14 Linears.
    assert report.int8_kernels == {"qconv_pointwise": 1 + pos_int8, "qlinear_pointwise": 20}
    assert report.cosine >= 0.999
    assert report.threads == 1
    output = compiled(tiny.example)
    assert output.shape == (1, 12, 32)
    cosine, _ = compare_outputs(tiny.int8_logits(), output)
    assert cosine >= 0.999
    # The caller's graph is not rewritten (the conv2d pass runs on a copy).
    assert not any(n.target == torch.ops.aten.conv2d.default for n in tiny.quantized.converted.graph.nodes)


def test_affine_grids_run_the_same_int8_kernels_and_match_eager() -> None:
    torch.set_num_threads(1)
    tiny = tiny_quantized_model("tiny-wav2vec2", default_plan("tiny-wav2vec2", act_scheme="affine"), fit_to_cpu=True)
    zero_points = {int(n.args[2]) for n in tiny.quantized.converted.graph.nodes
                   if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default}
    assert len(zero_points) > 1  # affine grids (zero points other than q) really are in the graph
    report = compile_inductor(tiny.quantized.converted, tiny.example, threads=1).report
    assert report.int8_kernel_count == report.int8_layers_in_graph == 22
    assert report.cosine >= 0.999


def test_compiled_output_that_differs_from_eager_raises_numerics_mismatch(tiny: TinyQuantized) -> None:
    message = r"compiled int8 output disagrees with eager int8: cosine \S+ < 1.1"
    with pytest.raises(NumericsMismatchError, match=message):
        compile_inductor(tiny.quantized.converted, tiny.example, threads=1, min_cosine=1.1)


def test_inductor_report_kernel_count_sums_the_kernels() -> None:
    from sq_pt2e.backends.inductor import InductorReport

    report = InductorReport(1, 0.0, {"qconv_pointwise": 3, "qlinear_pointwise": 4}, 7, 1.0, 0.0, "cpu")
    assert report.int8_kernel_count == 7
    assert dataclasses.replace(report, int8_kernels={}).int8_kernel_count == 0
