"""Benchmark float vs int8 variants of speech models; writes Markdown, JSON and a plot.

Usage:
    python benchmarks/run_benchmark.py --models wav2vec2-base hubert-large --seconds 10 --threads 1 2
    python benchmarks/run_benchmark.py --models small-wav2vec2 --sweep 1 5 10 20 30 --threads 2

Weights are random (latency does not depend on them). Every ratio is measured in
the same process; the CPU model and ISA flags head the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sq_pt2e.bench import VARIANTS, BenchResult, run_benchmark
from sq_pt2e.models import ARCHITECTURES, build_model


def plot_latency(result: BenchResult, path: Path) -> Path | None:
    """Latency against audio length per variant (one line per model/variant/threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for row in result.rows:
        series.setdefault(f"{row.model} {row.variant} ({row.threads}t)", []).append((row.seconds, row.latency_ms))
    series = {k: sorted(v) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("audio length (s)")
    ax.set_ylabel("latency (ms, median)")
    ax.set_title(f"Latency vs audio length\n{result.cpu}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["wav2vec2-base", "hubert-large"], choices=sorted(ARCHITECTURES))
    parser.add_argument("--seconds", nargs="+", type=float, default=[10.0], help="audio lengths")
    parser.add_argument("--sweep", nargs="+", type=float, default=None, help="lengths for a latency sweep")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    merged: BenchResult | None = None
    for name in args.models:
        result = run_benchmark(build_model(name), name, seconds=args.sweep or args.seconds, threads=args.threads,
                               batch=args.batch, runs=args.runs, variants=args.variants)
        if merged is None:
            merged = result
        else:
            merged.rows += result.rows
            merged.skipped += result.skipped
    assert merged is not None  # argparse requires at least one model
    json_path, md_path = merged.save(args.output_dir)
    plot = plot_latency(merged, args.output_dir / "latency_vs_length.png")
    print(merged.to_markdown())
    print(f"\nwrote {json_path}, {md_path}" + (f", {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
