"""Float vs int8 side by side: agreement, size and latency of every backend, one process.

Used by ``make demo`` (examples/quantize_and_compare.py). All ratios are measured in
the same run on the same machine; the CPU model and ISA flags are reported with them.
"""

from __future__ import annotations

import dataclasses

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from sq_pt2e.hardware import cpu_info
from sq_pt2e.plan import QuantPlan

__all__ = ["ComparisonRow", "Comparison", "compare_backends", "graph_constant_bytes", "median_latency_ms",
           "timed_runs_ms"]


@dataclass(frozen=True)
class ComparisonRow:
    """One variant of the model: how close to float, how big, how fast."""

    variant: str
    latency_ms: float
    speedup_vs_float: float
    size_bytes: int
    size_ratio: float
    cosine_vs_float: float
    frame_agreement: float  # share of frames whose argmax token equals float's
    int8_kernels: int | None = None
    notes: str = ""


@dataclass
class Comparison:
    """Rows plus the context needed to read them."""

    rows: list[ComparisonRow]
    cpu: str
    threads: int
    input_seconds: float
    utterances: int
    float_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}

    def to_markdown(self) -> str:
        lines = [
            f"CPU: {self.cpu}; threads: {self.threads}; input: {self.input_seconds:.1f} s, "
            f"batch 1; agreement over {self.utterances} utterance(s)",
            "",
            "| variant | latency (ms) | speed-up vs float eager | size (MiB) | size vs float | cosine vs float | "
            "frame agreement | int8 kernels |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            kernels = "" if r.int8_kernels is None else str(r.int8_kernels)
            lines.append(
                f"| {r.variant} | {r.latency_ms:.1f} | {r.speedup_vs_float:.2f}x | {r.size_bytes / 2**20:.2f} | "
                f"{r.size_ratio:.3f} | {r.cosine_vs_float:.5f} | {r.frame_agreement:.4f} | {kernels} |"
            )
        if self.float_layers:
            lines += ["", "Kept in float: " + "; ".join(self.float_layers)]
        return "\n".join(lines)


def timed_runs_ms(fn: Callable[[torch.Tensor], torch.Tensor], wave: torch.Tensor, *, runs: int = 10,
                  warmup: int = 2) -> tuple[float, ...]:
    """Wall time of each of ``runs`` calls ``fn(wave)`` after ``warmup`` calls, in milliseconds."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(wave)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(wave)
            times.append((time.perf_counter() - start) * 1000.0)
    return tuple(times)


def median_latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], wave: torch.Tensor, *, runs: int = 10,
                      warmup: int = 2) -> float:
    """Median wall time of ``fn(wave)`` in milliseconds over ``runs`` calls after ``warmup``."""
    return statistics.median(timed_runs_ms(fn, wave, runs=runs, warmup=warmup))


def graph_constant_bytes(gm: GraphModule) -> int:
    """Bytes of the tensors a graph reads (its ``get_attr`` constants), each counted once.

    A converted PT2E module's ``state_dict()`` still holds the float weights; what the
    int8 model really needs is what its graph reads.
    """
    seen: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                seen[id(value)] = value.numel() * value.element_size()
    return sum(seen.values())


def _agreement(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> tuple[float, float]:
    from sq_pt2e.backends.inductor import compare_outputs

    cosines, same, total = [], 0, 0
    for ref, out in zip(reference, outputs, strict=True):
        cosines.append(compare_outputs(ref, out)[0])
        same += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += ref.shape[0] * ref.shape[1]
    return min(cosines), same / max(total, 1)


def compare_backends(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    evaluation: Sequence[torch.Tensor],
    *,
    plan: QuantPlan,
    threads: int = 1,
    runs: int = 10,
    executorch: bool = True,
    int8_attention: bool = False,
    progress: Callable[[str], None] = print,
) -> Comparison:
    """Quantize ``model`` with ``plan`` and compare float eager, int8 inductor and int8 .pte.

    All waveforms must have the same length (the exported programs are fixed-length).
    ``int8_attention`` adds a row for inductor with int8 attention too (7-bit ``k`` and ``v``
    on CPUs without VNNI: :func:`sq_pt2e.backends.inductor.fit_plan_to_cpu`).
    """
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, check_pte, lower_to_xnnpack
    from sq_pt2e.backends.inductor import compile_inductor
    from sq_pt2e.models.build import to_ctc_logits
    from sq_pt2e.pipeline import quantize_model

    torch.set_num_threads(threads)
    example = evaluation[0]
    wrapper = to_ctc_logits(model).eval()
    float_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    with torch.no_grad():
        reference = [wrapper(w) for w in evaluation]
    rows = [ComparisonRow("float32 eager", median_latency_ms(wrapper, example, runs=runs), 1.0, float_bytes, 1.0,
                          1.0, 1.0)]
    base_ms = rows[0].latency_ms

    def inductor_row(label: str, converted: GraphModule, size: int) -> ComparisonRow:
        compiled = compile_inductor(converted, example, threads=threads)
        with torch.no_grad():
            cosine, agree = _agreement(reference, [compiled(w) for w in evaluation])
        ms = median_latency_ms(compiled, example, runs=runs)
        rep = compiled.report
        return ComparisonRow(
            label, ms, base_ms / ms, size, size / float_bytes, cosine, agree,
            rep.int8_kernel_count + rep.int8_attention_kernels,
            f"{rep.attention_note}{x86.bit_widths()}; compiled vs eager int8 cosine {rep.cosine:.6f}, "
            f"compile {rep.compile_seconds:.0f} s",
        )

    progress("quantizing for x86 (inductor) ...")
    x86 = quantize_model(model, example, calibration, plan=plan, target="x86_inductor")
    x86_bytes = graph_constant_bytes(x86.converted)
    with torch.no_grad():
        eager_cos, eager_agree = _agreement(reference, [x86.converted(w) for w in evaluation])
    eager_ms = median_latency_ms(x86.converted, example, runs=max(3, runs // 3))
    rows.append(ComparisonRow("int8 eager (q/dq reference)", eager_ms, base_ms / eager_ms, x86_bytes,
                              x86_bytes / float_bytes, eager_cos, eager_agree))
    progress("compiling int8 with inductor ...")
    rows.append(inductor_row("int8 inductor", x86.converted, x86_bytes))
    if int8_attention:
        progress("compiling int8 with int8 attention ...")
        attention = quantize_model(model, example, calibration, plan=dataclasses.replace(plan, attention="int8"))
        rows.append(inductor_row("int8 inductor, int8 attention", attention.converted, x86_bytes))
    if executorch:
        progress("lowering int8 to ExecuTorch/XNNPACK ...")
        xnn = quantize_model(model, example, calibration, plan=plan, target="xnnpack")
        data, report = lower_to_xnnpack(xnn.converted, example)
        runner = PteRunner(data, int(example.shape[-1]), threads=threads)
        report = check_pte(runner, xnn.converted(example), example, report)
        cosine, agree = _agreement(reference, [runner(w) for w in evaluation])
        pte_ms = median_latency_ms(runner, example, runs=runs)
        rows.append(ComparisonRow(
            "int8 ExecuTorch .pte (XNNPACK)", pte_ms, base_ms / pte_ms, report.pte_bytes,
            report.pte_bytes / float_bytes, cosine, agree, None,
            f"{xnn.bit_widths()}; {report.summary()}",
        ))
    float_layers = [f"{s.name} ({s.reason})" for s in x86.layer_status if s.status == "float"]
    return Comparison(rows, cpu_info().summary(), threads, example.shape[-1] / 16000.0, len(evaluation), float_layers)
