"""The benchmark: float and int8 variants of one model, timed in one process.

Every variant is built for one (input length, thread count) and timed the same
way: median of ``runs`` calls after warm-up, batch 1 by default. Ratios are taken
against float32 eager and float32 compiled *measured in the same run*, and the CPU
model and ISA flags are printed with them, since int8 and bf16 speed depend on them
entirely. Peak memory is the process's resident high-water mark while building and
running a variant (reset between variants through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import copy
import gc
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.compare import graph_constant_bytes, median_latency_ms
from sq_pt2e.hardware import cpu_info
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.passes.fold_weight_norm import folded_copy
from sq_pt2e.plan import QuantPlan
from sq_pt2e.recipes import default_plan

__all__ = ["VARIANTS", "BenchRow", "BenchResult", "Built", "run_benchmark"]

SAMPLE_RATE = 16000


@dataclass
class Built:
    """A runnable variant and what building it cost."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    size_bytes: int
    build_seconds: float
    int8_kernels: int | None = None
    notes: str = ""


@dataclass(frozen=True)
class BenchRow:
    """One variant at one input length and thread count."""

    model: str
    variant: str
    seconds: float
    batch: int
    threads: int
    latency_ms: float
    real_time_factor: float
    vs_fp32_eager: float
    vs_fp32_compiled: float | None
    size_bytes: int
    size_vs_fp32: float
    build_seconds: float
    peak_rss_mib: float | None
    int8_kernels: int | None
    notes: str


@dataclass
class BenchResult:
    """All rows, with the machine they were measured on."""

    cpu: str
    torch_version: str
    rows: list[BenchRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"cpu": self.cpu, "torch": self.torch_version, "skipped": self.skipped,
                           "rows": [asdict(r) for r in self.rows]}, indent=2) + "\n"

    def to_markdown(self) -> str:
        lines = [f"CPU: {self.cpu}; torch {self.torch_version}", ""]
        header = ("| model | variant | audio (s) | batch | threads | latency (ms) | RTF | vs fp32 eager | "
                  "vs fp32 compiled | size (MiB) | size vs fp32 | build (s) | peak RSS (MiB) | int8 kernels | notes |")
        lines += [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            compiled = "" if r.vs_fp32_compiled is None else f"{r.vs_fp32_compiled:.2f}x"
            rss = "" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.0f}"
            kernels = "" if r.int8_kernels is None else str(r.int8_kernels)
            lines.append(
                f"| {r.model} | {r.variant} | {r.seconds:g} | {r.batch} | {r.threads} | {r.latency_ms:.1f} | "
                f"{r.real_time_factor:.3f} | {r.vs_fp32_eager:.2f}x | {compiled} | {r.size_bytes / 2**20:.1f} | "
                f"{r.size_vs_fp32:.3f} | {r.build_seconds:.1f} | {rss} | {kernels} | {r.notes} |"
            )
        if self.skipped:
            lines += ["", "Skipped: " + "; ".join(self.skipped)]
        return "\n".join(lines)

    def save(self, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``bench.json`` and ``bench.md`` atomically."""
        out = Path(folder)
        return (atomic_write_text(out / "bench.json", self.to_json()),
                atomic_write_text(out / "bench.md", self.to_markdown() + "\n"))


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ variants
def _fp32_eager(model: nn.Module, wave: torch.Tensor, _calib: Sequence[torch.Tensor], _plan: QuantPlan,
                _threads: int) -> Built:
    wrapper = to_ctc_logits(model).eval()
    return Built(wrapper, _param_bytes(wrapper), 0.0)


def _compiled(module: nn.Module, wave: torch.Tensor, *, autocast_bf16: bool = False) -> Callable:
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(module)
        if autocast_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                compiled(wave)
        else:
            compiled(wave)

    def run(x: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(freezing=True), torch.no_grad():
            if autocast_bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return compiled(x)
            return compiled(x)

    return run


def _fp32_compiled(model, wave, _calib, _plan, _threads) -> Built:
    wrapper = copy.deepcopy(to_ctc_logits(model)).eval()
    start = time.perf_counter()
    fn = _compiled(wrapper, wave)
    return Built(fn, _param_bytes(wrapper), time.perf_counter() - start)


def _bf16_compiled(model, wave, _calib, _plan, _threads) -> Built:
    wrapper = copy.deepcopy(to_ctc_logits(model)).eval()
    start = time.perf_counter()
    fn = _compiled(wrapper, wave, autocast_bf16=True)
    return Built(fn, _param_bytes(wrapper) // 2, time.perf_counter() - start, notes="autocast bf16, compiled")


def _dynamic_int8(model, wave, _calib, _plan, _threads) -> Built:
    from torch.ao.quantization import quantize_dynamic

    start = time.perf_counter()
    dynamic = quantize_dynamic(copy.deepcopy(to_ctc_logits(model)).eval(), {nn.Linear}, dtype=torch.qint8)
    buffer = io.BytesIO()
    torch.save(dynamic.state_dict(), buffer)  # packed int8 Linear weights serialise with their scales
    return Built(dynamic, buffer.getbuffer().nbytes, time.perf_counter() - start,
                 notes="Linear only (torch.ao quantize_dynamic); size = serialized state dict")


def _x86_default_int8(model, wave, calib, _plan, threads) -> Built:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from sq_pt2e.backends.inductor import compile_inductor
    from sq_pt2e.export import export_speech_model
    from sq_pt2e.pipeline import calibrate

    start = time.perf_counter()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(export_speech_model(copy.deepcopy(model), wave).module(), quantizer)
    calibrate(prepared, calib)
    converted = convert_pt2e(prepared)
    compiled = compile_inductor(converted, wave, threads=threads, min_cosine=0.99)
    return Built(compiled, graph_constant_bytes(converted), time.perf_counter() - start,
                 compiled.report.int8_kernel_count, "torchao X86InductorQuantizer defaults (Linear only)")


def _stablequant_int8(model, wave, calib, plan, threads) -> Built:
    from sq_pt2e.backends.inductor import compile_inductor
    from sq_pt2e.pipeline import quantize_model

    start = time.perf_counter()
    quantized = quantize_model(copy.deepcopy(model), wave, calib, plan=plan)
    compiled = compile_inductor(quantized.converted, wave, threads=threads)
    return Built(compiled, graph_constant_bytes(quantized.converted), time.perf_counter() - start,
                 compiled.report.int8_kernel_count,
                 f"{quantized.bit_widths()}; compiled vs eager int8 cosine {compiled.report.cosine:.5f}")


def _executorch(model, wave, calib, plan, threads, *, int8: bool, friendly: bool = True) -> Built:
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, lower_to_xnnpack
    from sq_pt2e.pipeline import quantize_model

    start = time.perf_counter()
    if int8:
        program = quantize_model(copy.deepcopy(model), wave, calib, plan=plan, target="xnnpack").converted
    else:
        program = copy.deepcopy(to_ctc_logits(model)).eval()
    data, report = lower_to_xnnpack(program, wave, friendly=friendly)
    runner = PteRunner(data, int(wave.shape[-1]), threads=threads)
    lowering = "norms/attention rewritten for XNNPACK" if friendly else "stock lowering"
    return Built(runner, report.pte_bytes, time.perf_counter() - start, None,
                 f"{lowering}; {report.delegate_calls} XNNPACK partitions, {report.portable_op_count} portable ops")


VARIANTS: dict[str, Callable[..., Built]] = {
    "fp32-eager": _fp32_eager,
    "fp32-compiled": _fp32_compiled,
    "bf16-compiled": _bf16_compiled,
    "dynamic-int8": _dynamic_int8,
    "x86-default-int8-inductor": _x86_default_int8,
    "stablequant-int8-inductor": _stablequant_int8,
    "executorch-fp32": lambda *a: _executorch(*a, int8=False),
    "executorch-int8": lambda *a: _executorch(*a, int8=True),
    "executorch-fp32-stock": lambda *a: _executorch(*a, int8=False, friendly=False),
    "executorch-int8-stock": lambda *a: _executorch(*a, int8=True, friendly=False),
}


def run_benchmark(
    model: nn.Module,
    model_name: str,
    *,
    seconds: Sequence[float] = (10.0,),
    threads: Sequence[int] = (1, 2),
    batch: int = 1,
    runs: int = 10,
    variants: Sequence[str] = tuple(VARIANTS),
    plan: QuantPlan | None = None,
    calibration_count: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    on_update: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Time every variant of ``model`` at each input length and thread count.

    Args:
        model: the float model (weights do not change latency; random weights are fine).
        model_name: label for the rows.
        seconds: input lengths in seconds.
        threads: intra-op thread counts (each compiled variant is compiled per count).
        batch: batch size.
        runs: timed runs per variant (median reported), after 2 warm-up runs.
        variants: names from :data:`VARIANTS`.
        plan: the StableQuant plan (default: W8A8 max ranges; latency does not depend on ranges).
        calibration_count: calibration waveforms for the int8 variants.
        seed: seed of the random input waveforms.
        progress: called with one line per variant.
        on_update: called with the result so far after every variant (e.g. to save it), so
            a crash in a native library loses nothing already measured.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} (known: {', '.join(VARIANTS)})")
    cpu = cpu_info()
    result = BenchResult(cpu.summary(), torch.__version__)
    model = folded_copy(model).eval()  # once, numerically identical; the caller's model is left as it is
    plan = plan or default_plan(model=model_name)
    names = list(variants)
    if "bf16-compiled" in names and not any(f in cpu.flags for f in ("amx_bf16", "avx512_bf16")):
        names.remove("bf16-compiled")
        result.skipped.append("bf16-compiled: this CPU has no native bf16 (AMX/AVX512-BF16); emulated bf16 runs "
                              "30-40x slower than fp32 and is not a meaningful baseline here")
    generator = torch.Generator().manual_seed(seed)
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for length in seconds:
            samples = int(length * SAMPLE_RATE)
            wave = torch.randn(batch, samples, generator=generator)
            calib = [torch.randn(batch, samples, generator=generator) for _ in range(calibration_count)]
            base: dict[str, float] = {}
            fp32_bytes = _param_bytes(to_ctc_logits(model))
            for name in names:
                progress(f"[{model_name} {length:g}s x{batch}, {n_threads} thread(s)] {name} ...")
                _reset_peak_rss()
                try:
                    built = VARIANTS[name](model, wave, calib, plan, n_threads)
                    latency = median_latency_ms(built.fn, wave, runs=runs)
                except Exception as exc:  # one failing variant must not lose the others
                    result.skipped.append(f"{model_name} {name} {length:g}s {n_threads}t: {type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0][:200]}")
                    if on_update is not None:
                        on_update(result)
                    continue
                base.setdefault(name, latency)
                eager = base.get("fp32-eager", latency)
                compiled = base.get("fp32-compiled")
                result.rows.append(BenchRow(
                    model=model_name, variant=name, seconds=length, batch=batch, threads=n_threads,
                    latency_ms=latency, real_time_factor=latency / 1000.0 / length,
                    vs_fp32_eager=eager / latency,
                    vs_fp32_compiled=None if compiled is None else compiled / latency,
                    size_bytes=built.size_bytes, size_vs_fp32=built.size_bytes / fp32_bytes,
                    build_seconds=built.build_seconds, peak_rss_mib=_peak_rss_mib(),
                    int8_kernels=built.int8_kernels, notes=built.notes,
                ))
                del built
                gc.collect()
                if on_update is not None:
                    on_update(result)
    return result
