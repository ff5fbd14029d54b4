"""The kernel profile: events land in the right kinds, and a built int8 variant shows its int8 kernels."""

from __future__ import annotations

import pytest

from sq_pt2e.kernel_profile import KernelProfile, KernelTime, kind_of, profile_variant
from sq_pt2e.models import build_model


@pytest.mark.parametrize(("event", "kind"), [
    ("onednn::qlinear_pointwise", "int8 GEMM / conv (oneDNN)"),
    ("onednn::qconv_pointwise", "int8 GEMM / conv (oneDNN)"),
    ("aten::_int_mm", "int8 GEMM / conv (oneDNN)"),
    ("sq_pt2e::int8_bmm", "framework (dispatch, guards, wrappers)"),
    ("graph_0_cpp_fused__softmax__to_copy_amax_int8_bmm_mul_quantize_per_tensor_sub_transpose_view_19",
     "float attention"),
    ("mkl::_mkl_linear", "float GEMM / conv"),
    ("aten::mkldnn_convolution", "float GEMM / conv"),
    ("aten::addmm", "float GEMM / conv"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "float attention"),
    ("graph_0_cpp_fused_add_native_layer_norm_quantize_per_tensor_41",
     "inductor fused kernels (norms, activations, q/dq, copies)"),
    ("## Call CompiledFxGraph None ##", "framework (dispatch, guards, wrappers)"),
    ("aten::empty", "framework (dispatch, guards, wrappers)"),
    ("aten::gelu", "other"),
])
def test_events_are_sorted_into_kinds(event: str, kind: str) -> None:
    assert kind_of(event) == kind


def test_kinds_sum_to_the_total_and_the_table_lists_the_largest_first() -> None:
    profile = KernelProfile("x", 10.0, [
        KernelTime("onednn::qlinear_pointwise", kind_of("onednn::qlinear_pointwise"), 6.0, 2),
        KernelTime("aten::addmm", kind_of("aten::addmm"), 1.0, 1),
        KernelTime("aten::mm", kind_of("aten::mm"), 3.0, 1),
    ])
    assert profile.by_kind() == {"int8 GEMM / conv (oneDNN)": 6.0, "float GEMM / conv": 4.0}
    table = profile.to_markdown(top=2)
    assert "| int8 GEMM / conv (oneDNN) | 6.0 | 60.0 % |" in table
    assert "aten::addmm" not in table.split("Top 2 kernels:")[1]  # only the 2 largest kernels are listed


def test_an_int8_variant_spends_time_in_int8_kernels_and_names_inductor_kernels() -> None:
    profile = profile_variant(build_model("tiny-wav2vec2", seed=0), "tiny-wav2vec2", "stablequant-int8-inductor",
                              seconds=0.5, threads=1, runs=1, batch=2)
    assert "0.5 s x2, 1 thread(s)" in profile.label
    kinds = profile.by_kind()
    assert kinds["int8 GEMM / conv (oneDNN)"] > 0
    assert kinds["inductor fused kernels (norms, activations, q/dq, copies)"] > 0  # kernel names were on
    assert profile.wall_ms > 0 and profile.total_ms > 0


def test_an_unknown_variant_or_an_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown variant 'fp64'"):
        profile_variant(build_model("tiny-wav2vec2", seed=0), "tiny-wav2vec2", "fp64")
    with pytest.raises(ValueError, match="batch must be at least 1, got 0"):
        profile_variant(build_model("tiny-wav2vec2", seed=0), "tiny-wav2vec2", "fp32-eager", batch=0)
