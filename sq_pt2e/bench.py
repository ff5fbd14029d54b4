"""The benchmark: float and int8 variants of one model, each timed in a process of its own.

A *cell* is one variant at one (input length, thread count). By default every cell
is built and timed in a fresh child process (``multiprocessing`` "spawn": a new
interpreter that loads the folded model and the inputs from a file), so no compiled
model, frozen weight copy, oneDNN primitive cache or thread pool of one variant can
slow down another. The benchmark runs in ``rounds`` passes over the variants, the
order rotated by one each round (ABC, BCA, CAB), a fresh process per cell each time,
so slow drift of the machine (CPU clock, other load) hits every variant alike.

Each cell reports the median over all timed runs of all rounds (``runs`` per round,
after 2 warm-up calls, batch 1 by default), the per-round medians and their
``spread`` (max / min): a spread above :data:`SPREAD_LIMIT` is flagged in the table,
and a ratio involving that cell is not to be trusted. Ratios are taken against
float32 eager and float32 compiled medians *of the same run*, and the CPU model and
ISA flags are printed with them, since int8 and bf16 speed depend on them entirely.
Peak memory is the child's resident high-water mark (the interpreter, the model and
the variant built from it; the maximum over rounds). A child that dies (a segfault
in a native library) is recorded in ``skipped`` with its exit code; the others go on.

``isolate=False`` (CLI ``--in-process``) builds every cell in this process instead,
peak memory then reset between cells through ``/proc/self/clear_refs``; for tests
and debugging, not for numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import io
import json
import multiprocessing
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from torch import nn

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.baselines import Bits, with_bits
from sq_pt2e.compare import graph_constant_bytes, timed_runs_ms
from sq_pt2e.distributed.runners import shippable_model
from sq_pt2e.gemm_ceiling import GemmCeiling, feed_forward_shape, measure_gemm_ceiling
from sq_pt2e.hardware import cpu_info
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.passes.fold_weight_norm import folded_copy
from sq_pt2e.plan import QuantPlan
from sq_pt2e.recipes import search_shaped_plan

__all__ = ["SPREAD_LIMIT", "VARIANTS", "BenchRow", "BenchResult", "Built", "bench_model_and_plan", "compiled_forward",
           "run_benchmark"]

SAMPLE_RATE = 16000
DYNAMIC_MAX_SECONDS = 30
"""The longest input of the dynamic-length ``.pte`` variant (``executorch-int8-dynamic``)."""
SPREAD_LIMIT = 1.15
"""Largest trusted spread (max / min of a cell's per-round medians); above it the table flags the cell."""
_CEILING_INTRO = ("GEMM ceiling: one feed-forward block (two Linears at the model's shapes) in float32 and int8 on "
                  "this CPU, verified int8 kernels; where GEMMs dominate, int8 cannot gain more than this over fp32.")


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
    """One variant at one input length and thread count.

    ``latency_ms`` is the median over all timed runs of all rounds, ``round_medians_ms``
    the median of each round, ``spread`` their max / min. The ratios are ``None``
    when that baseline was not measured in the same run. ``build_seconds`` and
    ``peak_rss_mib`` are the largest over the rounds (a later round's compile can hit
    inductor's on-disk cache).
    """

    model: str
    variant: str
    seconds: float
    batch: int
    threads: int
    latency_ms: float
    real_time_factor: float
    vs_fp32_eager: float | None
    vs_fp32_compiled: float | None
    size_bytes: int
    size_vs_fp32: float
    build_seconds: float
    peak_rss_mib: float | None
    int8_kernels: int | None
    notes: str
    round_medians_ms: tuple[float, ...] = ()
    spread: float | None = None

    @property
    def flagged(self) -> bool:
        """Whether the rounds disagree by more than :data:`SPREAD_LIMIT`."""
        return self.spread is not None and self.spread > SPREAD_LIMIT


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _rounds_cells(row: BenchRow) -> str:
    """The "round medians" and "spread" table cells: ``min-max (rounds)`` and the flagged spread."""
    if not row.round_medians_ms:
        return " | "
    flag = " !" if row.flagged else ""
    return (f"{min(row.round_medians_ms):.1f}-{max(row.round_medians_ms):.1f} ({len(row.round_medians_ms)}) | "
            f"{row.spread:.2f}{flag}")


@dataclass
class BenchResult:
    """All rows, with the machine they were measured on and how."""

    cpu: str
    torch_version: str
    rows: list[BenchRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    method: str = ""
    ceilings: list[tuple[str, GemmCeiling]] = field(default_factory=list)
    """``(model, ceiling)`` pairs from :func:`~sq_pt2e.gemm_ceiling.measure_gemm_ceiling` (``gemm_ceiling=True``)."""

    def to_json(self) -> str:
        ceilings = [{"model": model, **asdict(c), "speedup": c.speedup} for model, c in self.ceilings]
        return json.dumps({"cpu": self.cpu, "torch": self.torch_version, "method": self.method,
                           "skipped": self.skipped, "rows": [asdict(r) for r in self.rows],
                           "gemm_ceiling": ceilings}, indent=2) + "\n"

    def to_markdown(self) -> str:
        lines = [f"CPU: {self.cpu}; torch {self.torch_version}", ""]
        lines += [f"Method: {self.method}", ""] if self.method else []
        header = ("| model | variant | audio (s) | batch | threads | latency (ms) | round medians (ms) | spread | "
                  "RTF | vs fp32 eager | vs fp32 compiled | size (MiB) | size vs fp32 | build (s) | peak RSS (MiB) | "
                  "int8 kernels | notes |")
        lines += [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            rss = "" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.0f}"
            kernels = "" if r.int8_kernels is None else str(r.int8_kernels)
            lines.append(
                f"| {r.model} | {r.variant} | {r.seconds:g} | {r.batch} | {r.threads} | {r.latency_ms:.1f} | "
                f"{_rounds_cells(r)} | {r.real_time_factor:.3f} | {_ratio(r.vs_fp32_eager)} | "
                f"{_ratio(r.vs_fp32_compiled)} | {r.size_bytes / 2**20:.1f} | {r.size_vs_fp32:.3f} | "
                f"{r.build_seconds:.1f} | {rss} | {kernels} | {r.notes} |"
            )
        if any(r.flagged for r in self.rows):
            lines += ["", f"! spread (max / min of the per-round medians) above {SPREAD_LIMIT}: the rounds disagree, "
                          "so this latency and every ratio involving it are not trustworthy."]
        if self.ceilings:
            lines += ["", _CEILING_INTRO, "", "| model | backend | frames x hidden -> intermediate | threads | "
                      "fp32 (ms) | int8 (ms) | int8 GMAC/s | int8 vs fp32 |", "|---|---|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {model} | {c.backend} | {c.frames} x {c.hidden} -> {c.intermediate} | {c.threads} | "
                      f"{c.fp32_ms:.1f} | {c.int8_ms:.1f} | {c.macs / 1e6 / c.int8_ms:.0f} | {c.speedup:.2f}x |"
                      for model, c in self.ceilings]
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


def compiled_forward(module: nn.Module, wave: torch.Tensor, *, autocast_bf16: bool = False) -> Callable:
    """``module`` compiled by inductor with frozen weights (compiled on ``wave``), as a callable."""
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
    fn = compiled_forward(wrapper, wave)
    return Built(fn, _param_bytes(wrapper), time.perf_counter() - start)


def _bf16_compiled(model, wave, _calib, _plan, _threads) -> Built:
    wrapper = copy.deepcopy(to_ctc_logits(model)).eval()
    start = time.perf_counter()
    fn = compiled_forward(wrapper, wave, autocast_bf16=True)
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
    # conv_as_gemm=False: the stock flow, without this project's CNN rewrites.
    compiled = compile_inductor(converted, wave, threads=threads, min_cosine=0.99, conv_as_gemm=False)
    return Built(compiled, graph_constant_bytes(converted), time.perf_counter() - start,
                 compiled.report.int8_kernel_count, "torchao X86InductorQuantizer defaults (Linear only)")


def _stablequant_int8(model, wave, calib, plan, threads, *, conv_as_gemm: bool = True,
                      int8_attention: bool = False, aoti: bool = False) -> Built:
    from sq_pt2e.backends.inductor import compile_aot_package, compile_inductor
    from sq_pt2e.pipeline import quantize_model

    start = time.perf_counter()
    if int8_attention:  # quantize_model fits it to the CPU (7-bit k and v without VNNI)
        plan = dataclasses.replace(plan or QuantPlan(), attention="int8")
    quantized = quantize_model(copy.deepcopy(model), wave, calib, plan=plan)
    if aoti:
        with tempfile.TemporaryDirectory(prefix="sq-pt2e-aoti-") as folder:
            compiled = compile_aot_package(quantized.converted, wave, Path(folder) / "model.pt2", threads=threads,
                                           conv_as_gemm=conv_as_gemm)
    else:
        compiled = compile_inductor(quantized.converted, wave, threads=threads, conv_as_gemm=conv_as_gemm)
    package = "AOTInductor package (C++ wrapper); " if aoti else ""
    convs = "" if conv_as_gemm else "CNN convs as oneDNN convolutions (no GEMM rewrites); "
    report = compiled.report
    return Built(compiled, graph_constant_bytes(quantized.converted), time.perf_counter() - start,
                 report.int8_kernel_count,
                 f"{package}{convs}{report.attention_note}{quantized.bit_widths()}; compiled vs eager int8 cosine "
                 f"{report.cosine:.5f}")


def _executorch(model, wave, calib, plan, threads, *, int8: bool, friendly: bool = True,
                dynamic: bool = False, bits: Bits | None = None) -> Built:
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, lower_to_xnnpack
    from sq_pt2e.framing import LengthRange, cnn_geometry
    from sq_pt2e.pipeline import quantize_model

    start = time.perf_counter()
    lengths = None
    if dynamic:  # any length up to 30 s (or the benchmark's length), timed at the benchmark's length
        lengths = LengthRange.up_to(max(DYNAMIC_MAX_SECONDS * SAMPLE_RATE, wave.shape[-1]), cnn_geometry(model))
        wave, calib = lengths.cut(wave), [lengths.cut(c) for c in calib]
    if bits is not None:  # 4-bit weights: XNNPACK stores the Linear weights packed, two a byte
        plan = with_bits(plan or QuantPlan(), bits)
    if int8:
        program = quantize_model(copy.deepcopy(model), wave, calib, plan=plan, target="xnnpack",
                                 lengths=lengths).converted
    else:
        program = copy.deepcopy(to_ctc_logits(model)).eval()
    data, report = lower_to_xnnpack(program, wave, friendly=friendly, lengths=lengths)
    runner = PteRunner(data, report.input_samples, threads=threads, lengths=lengths)
    lowering = "norms/attention rewritten for XNNPACK" if friendly else "stock lowering"
    if lengths is not None:
        lowering += f"; any length up to {lengths.max_samples / SAMPLE_RATE:.1f} s"
    return Built(runner, report.pte_bytes, time.perf_counter() - start, None,
                 f"{lowering}; {report.summary()}")


VARIANTS: dict[str, Callable[..., Built]] = {
    "fp32-eager": _fp32_eager,
    "fp32-compiled": _fp32_compiled,
    "bf16-compiled": _bf16_compiled,
    "dynamic-int8": _dynamic_int8,
    "x86-default-int8-inductor": _x86_default_int8,
    "stablequant-int8-inductor": _stablequant_int8,
    "stablequant-int8-inductor-convs": functools.partial(_stablequant_int8, conv_as_gemm=False),
    "stablequant-int8-attention-inductor": functools.partial(_stablequant_int8, int8_attention=True),
    "stablequant-int8-aoti": functools.partial(_stablequant_int8, aoti=True),
    "stablequant-int8-attention-aoti": functools.partial(_stablequant_int8, int8_attention=True, aoti=True),
    "executorch-fp32": functools.partial(_executorch, int8=False),
    "executorch-int8": functools.partial(_executorch, int8=True),
    "executorch-int8-dynamic": functools.partial(_executorch, int8=True, dynamic=True),
    "executorch-w4a8": functools.partial(_executorch, int8=True, bits=Bits(4, 8)),
    "executorch-fp32-stock": functools.partial(_executorch, int8=False, friendly=False),
    "executorch-int8-stock": functools.partial(_executorch, int8=True, friendly=False),
}
"""Variant name -> builder ``(model, wave, calibration, plan, threads) -> Built``. A child process
receives the builder pickled by reference, so it must be importable by its module path."""




# ------------------------------------------------------------------ measuring one cell
@dataclass(frozen=True)
class _Inputs:
    """What every cell of one (length, threads) needs; saved to a file for the child processes."""

    model: nn.Module
    wave: torch.Tensor
    calibration: list[torch.Tensor]
    plan: QuantPlan


@dataclass(frozen=True)
class _Measured:
    """One cell in one round: its timed runs and what building it cost."""

    times_ms: tuple[float, ...]
    size_bytes: int
    build_seconds: float
    peak_rss_mib: float | None
    int8_kernels: int | None
    notes: str


def _measure(builder: Callable[..., Built], inputs: _Inputs, threads: int, runs: int) -> _Measured:
    """Build one variant and time it."""
    built = builder(inputs.model, inputs.wave, inputs.calibration, inputs.plan, threads)
    times = timed_runs_ms(built.fn, inputs.wave, runs=runs)
    return _Measured(times, built.size_bytes, built.build_seconds, _peak_rss_mib(), built.int8_kernels, built.notes)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _measure_here(builder: Callable[..., Built], inputs: _Inputs, threads: int, runs: int) -> _Measured | str:
    """One cell in this process; a failure comes back as its description."""
    _reset_peak_rss()
    try:
        return _measure(builder, inputs, threads, runs)
    except Exception as exc:  # one failing variant must not lose the others
        return _describe(exc)
    finally:
        gc.collect()


def _child(path: str, builder: Callable[..., Built], threads: int, runs: int, conn: Connection) -> None:
    """Entry point of a cell's process: load the inputs, build and time one variant, send the outcome."""
    torch.set_num_threads(threads)
    inputs = torch.load(path, weights_only=False)
    try:
        conn.send(_measure(builder, inputs, threads, runs))
    except Exception as exc:  # reported to the parent; a native crash is seen there as the exit code
        conn.send(_describe(exc))
    finally:
        conn.close()


def _death(exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"child process killed by {name} (exit code {exit_code})"
    return f"child process exited with code {exit_code} before reporting"


def _measure_isolated(builder: Callable[..., Built], path: str, threads: int, runs: int) -> _Measured | str:
    """One cell in a fresh spawned process; a failure or a dead child comes back as its description."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(path, builder, threads, runs, writer))
    process.start()
    writer.close()  # the child holds the only write end: its death ends reader.recv()
    try:
        try:
            outcome = reader.recv()
        except EOFError:
            outcome = None
        process.join()
    finally:
        reader.close()
        if process.is_alive():  # interrupted
            process.terminate()
            process.join()
    return _death(process.exitcode) if outcome is None else outcome


# ------------------------------------------------------------------ the benchmark
@dataclass(frozen=True)
class _Setting:
    """The fixed part of the rows of one (length, threads)."""

    model: str
    seconds: float
    batch: int
    threads: int
    fp32_bytes: int

    def label(self) -> str:
        return f"{self.model} {self.seconds:g}s x{self.batch}, {self.threads} thread(s)"


def _rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The variant order of one round: ABC, BCA, CAB, ..."""
    shift = round_index % len(names) if names else 0
    return [*names[shift:], *names[:shift]]


def _median_ms(measured: Sequence[_Measured]) -> float:
    return statistics.median(t for m in measured for t in m.times_ms)


def _row(setting: _Setting, name: str, measured: Sequence[_Measured], eager: float | None,
         compiled: float | None) -> BenchRow:
    latency = _median_ms(measured)
    round_medians = tuple(statistics.median(m.times_ms) for m in measured)
    rss = [m.peak_rss_mib for m in measured if m.peak_rss_mib is not None]
    first = measured[0]
    return BenchRow(
        model=setting.model, variant=name, seconds=setting.seconds, batch=setting.batch, threads=setting.threads,
        latency_ms=latency, real_time_factor=latency / 1000.0 / setting.seconds,
        vs_fp32_eager=None if eager is None else eager / latency,
        vs_fp32_compiled=None if compiled is None else compiled / latency,
        size_bytes=first.size_bytes, size_vs_fp32=first.size_bytes / setting.fp32_bytes,
        build_seconds=max(m.build_seconds for m in measured), peak_rss_mib=max(rss) if rss else None,
        int8_kernels=first.int8_kernels, notes=first.notes,
        round_medians_ms=round_medians, spread=max(round_medians) / min(round_medians),
    )


def _rows(setting: _Setting, measured: dict[str, list[_Measured]]) -> list[BenchRow]:
    """The rows of one (length, threads), ratios against the baselines' medians of the same run."""
    medians = {name: _median_ms(m) for name, m in measured.items() if m}
    eager, compiled = medians.get("fp32-eager"), medians.get("fp32-compiled")
    return [_row(setting, name, m, eager, compiled) for name, m in measured.items() if m]


def _runnable(names: list[str], flags: Sequence[str], skipped: list[str]) -> list[str]:
    """``names`` less the variants this CPU cannot run meaningfully (recorded in ``skipped``)."""
    if "bf16-compiled" in names and not any(f in flags for f in ("amx_bf16", "avx512_bf16")):
        skipped.append("bf16-compiled: this CPU has no native bf16 (AMX/AVX512-BF16); emulated bf16 runs "
                       "30-40x slower than fp32 and is not a meaningful baseline here")
        return [n for n in names if n != "bf16-compiled"]
    return names


def _method(rounds: int, runs: int, isolate: bool) -> str:
    where = "a fresh process per cell and round" if isolate else "all cells in one process (--in-process)"
    return (f"{rounds} round(s), variant order rotated per round, {where}; latency = median of "
            f"{runs} timed runs x {rounds} round(s) after 2 warm-up calls; spread = max/min of the round medians")


def run_benchmark(
    model: nn.Module,
    model_name: str,
    *,
    seconds: Sequence[float] = (10.0,),
    threads: Sequence[int] = (1, 2),
    batch: int = 1,
    runs: int = 10,
    rounds: int = 3,
    isolate: bool = True,
    variants: Sequence[str] = tuple(VARIANTS),
    plan: QuantPlan | None = None,
    calibration_count: int = 2,
    seed: int = 0,
    gemm_ceiling: bool = False,
    progress: Callable[[str], None] = print,
    on_update: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Time every variant of ``model`` at each input length and thread count, in rounds.

    Args:
        model: the float model (weights do not change latency; random weights are fine).
        model_name: label for the rows.
        seconds: input lengths in seconds.
        threads: intra-op thread counts (each compiled variant is compiled per count).
        batch: batch size.
        runs: timed runs per variant and round, after 2 warm-up runs.
        rounds: passes over the variants, the order rotated by one each pass.
        isolate: build and time every cell of every round in a fresh child process
            (``False``: all in this process, for tests and debugging).
        variants: names from :data:`VARIANTS`.
        plan: the StableQuant plan (default :func:`~sq_pt2e.recipes.search_shaped_plan`: W8A8 max
            ranges with the affine grids and CNN input smoothing of a searched plan; latency does not
            depend on the ranges).
        calibration_count: calibration waveforms for the int8 variants.
        seed: seed of the random input waveforms.
        gemm_ceiling: also time one feed-forward block in float32 and int8 per (length, threads)
            (:func:`~sq_pt2e.gemm_ceiling.measure_gemm_ceiling`, in a fresh process when ``isolate``): the
            most int8 can gain on this CPU.
        progress: called with one line per cell and round.
        on_update: called with the result so far after every cell (e.g. to save it), so an
            interrupted run loses nothing already measured.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} (known: {', '.join(VARIANTS)})")
    if rounds < 1 or runs < 1:
        raise ValueError(f"rounds and runs must be at least 1 (got rounds={rounds}, runs={runs})")
    cpu = cpu_info()
    result = BenchResult(cpu.summary(), torch.__version__, method=_method(rounds, runs, isolate))
    model, plan = bench_model_and_plan(model, model_name, plan, batch=batch, seed=seed)
    names = _runnable(list(variants), cpu.flags, result.skipped)
    fp32_bytes = _param_bytes(to_ctc_logits(model))
    generator = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="sq-pt2e-bench-") as folder:
        for n_threads in threads:
            for length in seconds:
                samples = int(length * SAMPLE_RATE)
                wave = torch.randn(batch, samples, generator=generator)
                calibration = [torch.randn(batch, samples, generator=generator) for _ in range(calibration_count)]
                setting = _Setting(model_name, length, batch, n_threads, fp32_bytes)
                _run_setting(setting, _Inputs(model, wave, calibration, plan), names, rounds=rounds, runs=runs,
                             inputs_path=Path(folder) / "inputs.pt" if isolate else None, result=result,
                             progress=progress, on_update=on_update)
                if gemm_ceiling:
                    progress(f"[{setting.label()}] GEMM ceiling ...")
                    frames, hidden, intermediate = feed_forward_shape(model, samples)
                    _add_ceiling(result, setting, (frames * batch, hidden, intermediate), runs, isolate)
                    if on_update is not None:
                        on_update(result)
    return result


def _add_ceiling(result: BenchResult, setting: _Setting, shape: tuple[int, int, int], runs: int,
                 isolate: bool) -> None:
    """Measure the GEMM ceiling of one setting (in a fresh process when ``isolate``) into ``result``."""
    measure = functools.partial(measure_gemm_ceiling, *shape, threads=setting.threads, runs=runs)
    try:
        if isolate:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                ceilings = pool.submit(measure).result()
        else:
            ceilings = measure()
    except Exception as exc:  # a failed ceiling must not lose the measured rows
        result.skipped.append(f"{setting.model} GEMM ceiling {setting.threads}t: {_describe(exc)}")
        return
    result.ceilings += [(setting.model, ceiling) for ceiling in ceilings]


def bench_model_and_plan(model: nn.Module, model_name: str, plan: QuantPlan | None = None, *, batch: int = 1,
                         seed: int = 0) -> tuple[nn.Module, QuantPlan]:
    """The model as the variants get it (weight norm folded, picklable; ``model`` is left as it is) and
    the StableQuant plan (``plan``, else :func:`~sq_pt2e.recipes.search_shaped_plan` on one second of noise).

    Raises:
        ValueError: ``batch`` is below 1.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    model = shippable_model(folded_copy(model)).eval()
    if plan is None:
        one_second = torch.randn(batch, SAMPLE_RATE, generator=torch.Generator().manual_seed(seed))
        plan = search_shaped_plan(model, [one_second], model_name)
    return model, plan


def _run_setting(setting: _Setting, inputs: _Inputs, names: Sequence[str], *, rounds: int, runs: int,
                 inputs_path: Path | None, result: BenchResult, progress: Callable[[str], None],
                 on_update: Callable[[BenchResult], None] | None) -> None:
    """All rounds of one (length, threads); its rows replace their partial versions in ``result`` as they grow."""
    if inputs_path is None:
        torch.set_num_threads(setting.threads)
    else:
        torch.save(inputs, inputs_path)
    earlier = list(result.rows)
    measured: dict[str, list[_Measured]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in _rotated(names, round_index):
            progress(f"[{setting.label()}, round {round_index + 1}/{rounds}] {name} ...")
            if inputs_path is None:
                outcome = _measure_here(VARIANTS[name], inputs, setting.threads, runs)
            else:
                outcome = _measure_isolated(VARIANTS[name], str(inputs_path), setting.threads, runs)
            if isinstance(outcome, str):
                result.skipped.append(f"{setting.model} {name} {setting.seconds:g}s {setting.threads}t "
                                      f"round {round_index + 1}: {outcome}")
            else:
                measured[name].append(outcome)
            result.rows = earlier + _rows(setting, measured)
            if on_update is not None:
                on_update(result)
