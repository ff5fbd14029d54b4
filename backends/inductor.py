"""Compile a converted int8 graph with inductor for x86 (oneDNN int8 kernels).

Inductor only fuses ``dequantize -> conv/linear`` into oneDNN int8 kernels when
weights are frozen constants (``torch._inductor.config.freezing``) and autograd is
off; it also bakes the thread count into the generated code. This module sets
both, compiles once per thread count, and then *checks* the result: it counts the
int8 conv/linear kernels in the generated code against the int8 layers of the
graph, and compares the compiled output with the eager int8 output. It raises
rather than return a model that silently runs in float or computes wrong values.

CPUs without VNNI (AVX2 only) multiply u8*s8 pairs into saturating int16
(``vpmaddubsw``): W8A8 then differs from the eager int8 model. ``fit_plan_to_cpu``
narrows such layers to 7-bit weights, which cannot saturate, and int8 attention's ``k``
and ``v`` to 7-bit grids for the same reason. On AMX-INT8 CPUs, oneDNN's
int8 grouped convolution computes wrong values with 8 to 28 input channels per group and
kernels of 8 or more (torch 2.13; measured: compiled vs eager cosine 0.01-0.04, right
with AMX disabled, with 2-7 or 32-64 channels per group and with kernels of 3-5);
``fit_plan_to_cpu`` keeps grouped convs with :data:`AMX_UNSAFE_GROUP_CHANNELS` channels
per group in float there.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx import GraphModule

from sq_pt2e.annotators import attention_grid_half_span
from sq_pt2e.errors import BackendError, Int8NotUsedError, NumericsMismatchError
from sq_pt2e.backends.int8_attention import (
    attention_kernel_calls,
    attention_kv_bits,
    fused_int8_attention_supported,
    int8_attention_patterns,
    quantized_attention_count,
)
from sq_pt2e.hardware import CpuInfo, cpu_info
from sq_pt2e.passes.attention_as_int_mm import AttentionAsIntMmPass
from sq_pt2e.passes.conv1d_as_conv2d import QuantizedConv1dAsConv2dPass
from sq_pt2e.passes.conv1d_as_gemm import QuantizedConv1dAsGemmPass
from sq_pt2e.passes.verify_quantization import summarize_quantized_graph
from sq_pt2e.passes.waveform_conv_as_gemm import WaveformConvAsGemmPass
from sq_pt2e.plan import LayerPlan, QuantPlan

__all__ = [
    "AMX_GROUPED_CONV_REASON",
    "AMX_UNSAFE_GROUP_CHANNELS",
    "CompiledInt8",
    "InductorReport",
    "compare_outputs",
    "compile_aot_package",
    "compile_inductor",
    "fit_plan_to_cpu",
    "load_aot_package",
    "narrow_attention_kv",
]

_INT8_KERNEL = re.compile(r"torch\.ops\.onednn\.(qconv\w*|qlinear\w*)\.")
_AOT_INT8_KERNEL = re.compile(r"AOTI_TORCH_ERROR_CODE_CHECK\(aoti_torch_cpu__(qconv\w*|qlinear\w*)\(")
SATURATION_REASON = "7-bit weights: this CPU has no VNNI, so W8A8 u8*s8 pairs would saturate int16"
AMX_UNSAFE_GROUP_CHANNELS = range(8, 32)
AMX_GROUPED_CONV_REASON = (
    "float: oneDNN's AMX int8 grouped convolution computes wrong values with "
    f"{AMX_UNSAFE_GROUP_CHANNELS.start} to {AMX_UNSAFE_GROUP_CHANNELS.stop - 1} channels per group"
)


def fit_plan_to_cpu(plan: QuantPlan, cpu: CpuInfo | None = None, *,
                    group_channels: Mapping[str, int] | None = None) -> tuple[QuantPlan, bool]:
    """Fit a plan to what this CPU's int8 kernels compute exactly; returns ``(plan, changed)``.

    Without VNNI, W8A8 layers are narrowed to W7A8 and int8 attention's ``k`` and ``v`` to
    7 bits (:func:`narrow_attention_kv`). With AMX-INT8, the grouped convs of
    ``group_channels`` (layer name -> input channels per group, e.g. from
    :func:`sq_pt2e.graph.group_channels`) with :data:`AMX_UNSAFE_GROUP_CHANNELS` channels
    per group are kept float. Each change of a layer is recorded in its reason.
    """
    cpu = cpu or cpu_info()
    fitted = plan
    if cpu.has_amx_int8:
        fitted = _float_small_groups(fitted, group_channels or {})
    elif not cpu.has_vnni:
        fitted = narrow_attention_kv(_narrow_to_w7(fitted), cpu.exact_int8_operand_bits)
    return fitted, fitted != plan


def narrow_attention_kv(plan: QuantPlan, bits: int) -> QuantPlan:
    """``plan`` with int8 attention's ``k`` and ``v`` on grids of at most ``bits`` bits.

    Fixed scales (``attention_scales``) of ``k`` and ``v`` are widened so that the narrower
    grid spans the same range: its step grows by ``127.5 / 63`` from 8 to 7 bits
    (:func:`~sq_pt2e.annotators.attention_grid_half_span`).
    """
    if plan.attention != "int8" or plan.attention_kv_bits <= bits:
        return plan
    ratio = attention_grid_half_span(plan.attention_kv_bits) / attention_grid_half_span(bits)
    scales = tuple((q, k * ratio, v * ratio) for q, k, v in plan.attention_scales)
    return dataclasses.replace(plan, attention_kv_bits=bits, attention_scales=scales)


def _narrow_to_w7(plan: QuantPlan) -> QuantPlan:
    def fit(layer: LayerPlan) -> LayerPlan:
        if layer.skip or layer.weight_bits < 8 or layer.act_bits < 8:
            return layer
        reason = f"{layer.reason}; {SATURATION_REASON}" if layer.reason else SATURATION_REASON
        return dataclasses.replace(layer, weight_bits=7, reason=reason)

    return plan.map_layer_plans(fit)


def _float_small_groups(plan: QuantPlan, group_channels: Mapping[str, int]) -> QuantPlan:
    changes = {}
    for name, channels in group_channels.items():
        layer = plan.resolve(name, "grouped_conv1d")  # the listed entry, or the default it falls under
        if channels in AMX_UNSAFE_GROUP_CHANNELS and not layer.skip:
            changes[name] = dataclasses.replace(layer, skip=True, reason=f"{AMX_GROUPED_CONV_REASON} ({channels})")
    if not changes:
        return plan
    layers = tuple(changes.pop(layer.name, layer) for layer in plan.layers) + tuple(changes.values())
    return dataclasses.replace(plan, layers=layers)


@dataclass(frozen=True)
class InductorReport:
    """Evidence that the compiled model runs int8 kernels and matches eager int8."""

    threads: int
    compile_seconds: float
    int8_kernels: dict[str, int]
    int8_layers_in_graph: int
    cosine: float
    max_abs_diff: float
    cpu: str
    int8_attention_kernels: int = 0
    """Attention blocks the generated code runs on int8 kernels (the name predates the int8-GEMM route)."""
    int8_attention_in_graph: int = 0
    attention_fallback: str = ""
    """Why int8 attention runs as int8 GEMMs although the CPU has torchao's fused kernel (empty: it does not)."""

    @property
    def int8_kernel_count(self) -> int:
        return sum(self.int8_kernels.values())

    @property
    def attention_note(self) -> str:
        """``"N attention blocks on int8 kernels; "`` for result notes, or empty without int8 attention."""
        blocks = self.int8_attention_kernels
        if not blocks:
            return ""
        fallback = f" (int8 GEMMs: {self.attention_fallback})" if self.attention_fallback else ""
        return f"{blocks} attention blocks on int8 kernels{fallback}; "


@dataclass
class CompiledInt8:
    """A compiled int8 model (call it like the eager one), its verification report and its verified output."""

    fn: Callable[..., torch.Tensor]
    report: InductorReport
    verified_output: torch.Tensor
    """The compiled output on the example input, as checked against eager int8."""

    def __call__(self, wave: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(wave, *extra)


def compare_outputs(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Cosine similarity and max absolute difference of two outputs (flattened)."""
    if reference.shape != other.shape:
        msg = f"output shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}"
        raise NumericsMismatchError(msg)
    a, b = reference.detach().double().flatten(), other.detach().double().flatten()
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return cosine, float((a - b).abs().max())


def compile_inductor(
    converted: GraphModule,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    threads: int | None = None,
    min_cosine: float = 0.999,
    dynamic: bool = False,
    conv_as_gemm: bool = True,
    fused_attention: bool = True,
) -> CompiledInt8:
    """Compile a ``convert_pt2e`` graph with inductor and verify it.

    Args:
        converted: the int8 model from ``convert_pt2e`` (q/dq representation).
        example: a waveform to compile for and to compare compiled vs eager on, or a tuple
            of all the graph's inputs (e.g. waveform and number of valid samples).
        threads: intra-op threads (default: the current setting); set before compiling.
        min_cosine: the least cosine similarity of compiled vs eager int8 output.
        dynamic: compile with dynamic shapes (default: one fixed shape).
        conv_as_gemm: run the CNN encoder's int8 convolutions as int8 GEMMs on unfolded
            frames (:class:`~sq_pt2e.passes.conv1d_as_gemm.QuantizedConv1dAsGemmPass`), and a
            float first conv as a float GEMM on waveform windows
            (:class:`~sq_pt2e.passes.waveform_conv_as_gemm.WaveformConvAsGemmPass`); the other
            int8 convs always go through the conv2d rewrite. Int8 results are identical either
            way; the float GEMM differs from the float conv by summation order only.
        fused_attention: on AMX CPUs, run int8 attention as torchao's fused kernel (default;
            for 8-bit ``k`` and ``v``); False: as int8 GEMMs, as on other CPUs and in
            AOTInductor packages.

    Int8 attention (a plan with ``attention="int8"``) compiles to torchao's fused int8
    attention kernel on AMX CPUs, and to int8 GEMMs on other CPUs
    (:mod:`sq_pt2e.backends.int8_attention`); the attention blocks on int8 kernels are counted too.
    If the fused route fails to compile, to run or to verify (e.g. a torchao build whose
    lowering falls back to the op, which has no CPU kernel in its PyPI wheel), the model is
    compiled again with int8 GEMMs, with a warning and the reason in
    ``report.attention_fallback``.

    Raises:
        Int8NotUsedError: fewer int8 kernels in the generated code than int8 layers (or
            attention blocks on int8 kernels than quantized attention blocks).
        NumericsMismatchError: compiled output disagrees with eager int8.
        BackendError: inductor failed to compile, or the graph has int8 attention whose ``k``
            or ``v`` grid is wider than this CPU multiplies exactly (8 bits without VNNI).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    attention, kv_bits = _int8_attention_blocks(converted)
    fused = bool(attention) and fused_attention and fused_int8_attention_supported() and kv_bits == 8
    inputs = example if isinstance(example, tuple) else (example,)
    with torch.no_grad():
        eager = converted(*inputs)
    compile_once = functools.partial(_compile_verified, converted, inputs, eager, attention=attention,
                                     dynamic=dynamic, conv_as_gemm=conv_as_gemm, min_cosine=min_cosine)
    if not fused:
        return compile_once(attention_as_int_mm=bool(attention))
    try:
        return compile_once(attention_as_int_mm=False)
    except (BackendError, Int8NotUsedError, NumericsMismatchError) as exc:
        reason = f"torchao's fused int8 attention kernel failed: {str(exc).split('. ')[0]}"
        warnings.warn(f"{reason}; running int8 attention as int8 GEMMs instead", stacklevel=2)
        compiled = compile_once(attention_as_int_mm=True)
        compiled.report = dataclasses.replace(compiled.report, attention_fallback=reason)
        return compiled


def _compile_verified(converted: GraphModule, inputs: tuple[torch.Tensor, ...], eager: torch.Tensor, *,
                      attention: int, attention_as_int_mm: bool, dynamic: bool, conv_as_gemm: bool,
                      min_cosine: float) -> CompiledInt8:
    """One :func:`compile_inductor` attempt (``attention``: the graph's int8 attention blocks): rewrite,
    compile, count the int8 kernels, compare with ``eager``."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    graph = _backend_graph(converted, conv_as_gemm, attention_as_int_mm=attention_as_int_mm)
    start = time.perf_counter()
    try:
        with inductor_config.patch(_inductor_configs(attention)), torch.no_grad():
            compiled = torch.compile(graph, dynamic=dynamic)
            output, sources = run_and_get_code(compiled, *inputs)
    except Exception as exc:  # inductor raises many types; keep the cause
        raise BackendError(f"inductor failed to compile the int8 model: {exc}") from exc
    report = _verified_report(converted, eager, output, _INT8_KERNEL, sources, time.perf_counter() - start,
                              min_cosine)
    return CompiledInt8(compiled, report, output)


def compile_aot_package(
    converted: GraphModule,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    package_path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    min_cosine: float = 0.999,
    conv_as_gemm: bool = True,
) -> CompiledInt8:
    """Compile a ``convert_pt2e`` graph ahead of time (AOTInductor) into a ``.pt2`` package, verified.

    The same graph rewrites, int8-kernel count and compiled-vs-eager check as
    :func:`compile_inductor`, for one fixed input shape; the package (C++ wrapper, kernels and
    frozen int8 weights in one file) is written atomically only once the check passed, and
    :func:`load_aot_package` loads it in another process in milliseconds instead of compiling
    again. The generated kernels are specific to this CPU's ISA and the thread count.

    Int8 attention runs as int8 GEMMs (:mod:`sq_pt2e.passes.attention_as_int_mm`) on every CPU,
    AMX ones included (torchao's fused AMX kernel is not packaged): the package calls the custom
    op ``sq_pt2e::int8_bmm`` (registered where this module is imported).

    Raises:
        Int8NotUsedError, NumericsMismatchError: as :func:`compile_inductor`.
        BackendError: AOTInductor failed, or the graph's int8 attention has ``k`` or ``v``
            grids wider than this CPU multiplies exactly.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    attention, _ = _int8_attention_blocks(converted)
    inputs = example if isinstance(example, tuple) else (example,)
    with torch.no_grad():
        eager = converted(*inputs)
    final = Path(package_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.stem}.{os.getpid()}.partial.pt2")
    start = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(_backend_graph(converted, conv_as_gemm, attention_as_int_mm=bool(attention)),
                                           inputs)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                     inductor_configs=_inductor_configs(attention))
        with zipfile.ZipFile(partial) as archive:  # the wrapper's .json lists the custom-op calls
            sources = [archive.read(n).decode(errors="replace") for n in archive.namelist()
                       if n.endswith((".cpp", "wrapper.json"))]
        program = load_aot_package(partial)
        with torch.no_grad():
            output = program(*inputs)
        report = _verified_report(converted, eager, output, _AOT_INT8_KERNEL, sources, time.perf_counter() - start,
                                  min_cosine)
        os.replace(partial, final)  # the loaded program keeps its own copy of the package
    except (Int8NotUsedError, NumericsMismatchError):
        raise
    except Exception as exc:  # AOTInductor raises many types; keep the cause
        raise BackendError(f"AOTInductor failed to compile the int8 model: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return CompiledInt8(program, report, output)


def load_aot_package(package_path: str | os.PathLike[str]) -> Callable[..., torch.Tensor]:
    """Load a ``.pt2`` package of :func:`compile_aot_package` (call it with the graph's inputs).

    Packages with int8 attention call ``sq_pt2e::int8_bmm``, registered by this module's import
    of :mod:`sq_pt2e.passes.attention_as_int_mm`.
    """
    return torch._inductor.aoti_load_package(str(package_path))


def _inductor_configs(attention: int) -> dict[str, object]:
    """Inductor settings for an int8 graph: frozen weights (oneDNN's int8 kernels need them), and with
    ``attention`` int8 attention blocks the pass that keeps their softmax matchable."""
    configs: dict[str, object] = {"freezing": True}
    if attention:
        configs["post_grad_custom_pre_pass"] = int8_attention_patterns()
    return configs


def _int8_attention_blocks(converted: GraphModule) -> tuple[int, int]:
    """The graph's quantized attention blocks and the bits of their widest ``k`` / ``v`` grid; raises
    BackendError if this CPU would not multiply them exactly."""
    attention = quantized_attention_count(converted)
    bits, cpu = attention_kv_bits(converted), cpu_info()
    if attention and bits > cpu.exact_int8_operand_bits:
        raise BackendError(
            f"the graph's {attention} int8 attention blocks have {bits}-bit k or v, but this CPU has no VNNI "
            f"({cpu.summary()}): its int8 GEMMs would saturate int16 sums; quantize with a plan fitted to the CPU "
            f"(fit_plan_to_cpu: attention_kv_bits={cpu.exact_int8_operand_bits}) or attention='float'")
    return attention, bits


def _backend_graph(converted: GraphModule, conv_as_gemm: bool, *, attention_as_int_mm: bool = False) -> GraphModule:
    """A copy of ``converted`` with the rewrites the x86 int8 kernels need (see :func:`compile_inductor`)."""
    graph = copy.deepcopy(converted)
    if attention_as_int_mm:
        AttentionAsIntMmPass()(graph)
    if conv_as_gemm:
        QuantizedConv1dAsGemmPass()(graph)
        WaveformConvAsGemmPass()(graph)
    QuantizedConv1dAsConv2dPass()(graph)
    return graph


def _verified_report(converted: GraphModule, eager: torch.Tensor, output: torch.Tensor, kernel: re.Pattern[str],
                     sources: list[str], seconds: float, min_cosine: float) -> InductorReport:
    """The report of a compile whose generated ``sources`` call int8 kernels matching ``kernel``.

    Raises:
        Int8NotUsedError: fewer int8 kernels (or int8 attention blocks) than int8 layers (blocks).
        NumericsMismatchError: ``output`` disagrees with the eager int8 output.
    """
    expected = len(summarize_quantized_graph(converted).int8_layers)
    attention = quantized_attention_count(converted)
    kernels: dict[str, int] = {}
    for source in sources:
        for name in kernel.findall(source):
            kernels[name] = kernels.get(name, 0) + 1
    cosine, max_diff = compare_outputs(eager, output)
    report = InductorReport(
        threads=torch.get_num_threads(),
        compile_seconds=seconds,
        int8_kernels=dict(sorted(kernels.items())),
        int8_layers_in_graph=expected,
        cosine=cosine,
        max_abs_diff=max_diff,
        cpu=cpu_info().summary(),
        int8_attention_kernels=attention_kernel_calls(sources),
        int8_attention_in_graph=attention,
    )
    if report.int8_attention_kernels < attention:
        msg = (f"inductor ran {report.int8_attention_kernels} of {attention} int8 attention blocks on int8 kernels "
               "(the rest would run as float q/dq reference math)")
        raise Int8NotUsedError(msg)
    if report.int8_kernel_count < expected:
        msg = (
            f"inductor generated {report.int8_kernel_count} int8 conv/linear kernels for {expected} int8 layers "
            "(the rest would run as float q/dq reference math)"
        )
        raise Int8NotUsedError(msg)
    if cosine < min_cosine:
        msg = (
            f"compiled int8 output disagrees with eager int8: cosine {cosine:.5f} < {min_cosine} "
            f"(max abs diff {max_diff:.4g}) on {report.cpu}"
        )
        raise NumericsMismatchError(msg)
    return report
