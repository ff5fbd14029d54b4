"""Where a built variant spends its time: profiler self time per kernel, grouped by kind.

The benchmark says how fast a variant is; this says why. A variant is built as the
benchmark builds it (:data:`sq_pt2e.bench.VARIANTS`), with inductor's per-kernel
profiling switched on, run a few times under ``torch.profiler``, and every event's
self CPU time is put in one of :data:`KINDS`: int8 oneDNN GEMMs and convolutions,
float GEMMs and convolutions, float attention, inductor's fused kernels (norms,
activations, quantize / dequantize, window copies), and the rest. Float kinds next
to int8 ones are the float islands of an int8 graph. Times are per model call. Ops are
recorded on the calling thread and their intra-op threads work inside them, so the self
times add up to about the wall time of a call at any thread count.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["KINDS", "KernelProfile", "KernelTime", "kind_of", "profile_kernels", "profile_variant"]

KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("int8 GEMM / conv (oneDNN)", re.compile(r"^onednn::q|^quantized::|^aten::_int_mm$")),
    ("float attention", re.compile(r"scaled_dot_product|_flash_attention|softmax")),
    ("float GEMM / conv", re.compile(r"^aten::(mm|bmm|addmm|linear|matmul|_convolution|mkldnn_convolution)$"
                                     r"|^mkl::|^mkldnn::|^onednn::(?!q)")),
    ("inductor fused kernels (norms, activations, q/dq, copies)", re.compile(r"cpp_fused")),
    ("framework (dispatch, guards, wrappers)", re.compile(r"^## |TorchDynamo|Torch-Compiled|AOTDispatcher|"
                                                           r"^sq_pt2e::int8_bmm$|"  # its loop; _int_mm does the work
                                                           r"Pregraph|^aten::(empty|view|reshape|as_strided|"
                                                           r"transpose|unsqueeze|squeeze|item|_local_scalar_dense|"
                                                           r"resize_|to|empty_like|empty_strided|permute|expand|"
                                                           r"select)")),
)
"""Kind name and the event-name pattern it claims, tried in order; unmatched events count as "other"."""
OTHER = "other"


def kind_of(event_name: str) -> str:
    """The :data:`KINDS` name an event name falls under (``"other"`` when none)."""
    for kind, pattern in KINDS:
        if pattern.search(event_name):
            return kind
    return OTHER


@dataclass(frozen=True)
class KernelTime:
    """One event name: its kind, self CPU time per model call (ms) and calls per model call."""

    name: str
    kind: str
    ms: float
    calls: float


@dataclass
class KernelProfile:
    """Self CPU time per model call by kind and by kernel, and the wall time of the profiled calls."""

    label: str
    wall_ms: float
    kernels: list[KernelTime] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    def by_kind(self) -> dict[str, float]:
        """Milliseconds per kind, largest first."""
        sums: dict[str, float] = {}
        for kernel in self.kernels:
            sums[kernel.kind] = sums.get(kernel.kind, 0.0) + kernel.ms
        return dict(sorted(sums.items(), key=lambda item: -item[1]))

    def to_markdown(self, top: int = 12) -> str:
        total = self.total_ms or 1.0
        lines = [f"{self.label}: wall {self.wall_ms:.1f} ms per call; profiler self time {self.total_ms:.1f} ms",
                 "", "| kind | ms | share |", "|---|---:|---:|"]
        lines += [f"| {kind} | {ms:.1f} | {100 * ms / total:.1f} % |" for kind, ms in self.by_kind().items()]
        lines += ["", f"Top {top} kernels:", "", "| kernel | kind | ms | calls | share |", "|---|---|---:|---:|---:|"]
        for k in sorted(self.kernels, key=lambda k: -k.ms)[:top]:
            name = k.name if len(k.name) <= 90 else k.name[:45] + "..." + k.name[-42:]  # keep the kernel index
            lines.append(f"| `{name}` | {k.kind} | {k.ms:.1f} | {k.calls:g} | {100 * k.ms / total:.1f} % |")
        return "\n".join(lines)


def profile_kernels(fn: Callable[[torch.Tensor], object], wave: torch.Tensor, *, runs: int = 3,
                    label: str = "") -> KernelProfile:
    """Profile ``runs`` calls of ``fn(wave)`` (after one warm-up call) and group the self time by kind.

    Inductor kernels appear by name only when the model was compiled with
    ``torch._inductor.config.cpp.enable_kernel_profile = True``; otherwise their time
    lands in the graph wrapper's event ("framework").
    """
    from torch.profiler import ProfilerActivity, profile

    if runs < 1:
        raise ValueError(f"runs={runs} (expected >= 1)")
    with torch.no_grad():
        fn(wave)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                fn(wave)
            wall = (time.perf_counter() - start) / runs
    kernels = [KernelTime(e.key, kind_of(e.key), e.self_cpu_time_total / 1000.0 / runs, e.count / runs)
               for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return KernelProfile(label, wall * 1000.0, kernels)


def profile_variant(model: torch.nn.Module, model_name: str, variant: str, *, seconds: float = 10.0,
                    threads: int = 2, runs: int = 3, seed: int = 0, batch: int = 1) -> KernelProfile:
    """Build ``variant`` of ``model`` as the benchmark does (random input of ``batch`` x ``seconds``,
    two random calibration batches, its default plan) with inductor kernel names on, and profile it."""
    import torch._inductor.config as inductor_config

    from sq_pt2e.bench import SAMPLE_RATE, VARIANTS, bench_model_and_plan

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    torch.set_num_threads(threads)
    model, plan = bench_model_and_plan(model, model_name, batch=batch, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    wave, *calibration = (torch.randn(batch, int(seconds * SAMPLE_RATE), generator=generator) for _ in range(3))
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        built = VARIANTS[variant](model, wave, calibration, plan, threads)
        return profile_kernels(built.fn, wave, runs=runs,
                               label=f"{model_name} {variant}, {seconds:g} s x{batch}, {threads} thread(s)")
