"""``sq-pt2e``: quantize, compare, benchmark and export speech models from the command line.

Every verb prints a summary table, writes machine-readable JSON with ``--output-dir``,
and exits 0 on success, 1 when the work failed (the error names the problem) and 2
on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sq_pt2e.errors import SqPt2eError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    from sq_pt2e.models import ARCHITECTURES

    parser.add_argument(
        "--model", default=default, required=default is None,
        help=f"an architecture name ({', '.join(ARCHITECTURES)}; random weights) or a checkpoint folder",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and inputs (default 0)")


def _cmd_bench(args: argparse.Namespace) -> int:
    from sq_pt2e.bench import BenchResult, run_benchmark
    from sq_pt2e.models import build_model
    from sq_pt2e.plots import plot_latency_vs_length

    merged = None

    def combined(result: BenchResult) -> BenchResult:
        if merged is None:
            return result
        return BenchResult(merged.cpu, merged.torch_version, merged.rows + result.rows, merged.skipped + result.skipped)

    def save_partial(result: BenchResult) -> None:
        if args.output_dir is not None:
            combined(result).save(args.output_dir)

    for name in args.models:
        result = run_benchmark(build_model(name, seed=args.seed), name, seconds=args.seconds, threads=args.threads,
                               batch=args.batch, runs=args.runs, variants=args.variants, seed=args.seed,
                               progress=lambda line: print(line, file=sys.stderr, flush=True),
                               on_update=save_partial)
        merged = combined(result)
    assert merged is not None  # argparse requires one model at least
    print(merged.to_markdown())
    if args.output_dir is not None:
        paths = list(merged.save(args.output_dir))
        series: dict[str, list[tuple[float, float]]] = {}
        for row in merged.rows:
            series.setdefault(f"{row.model} {row.variant} ({row.threads}t)", []).append((row.seconds, row.latency_ms))
        plot = plot_latency_vs_length(series, f"Latency vs audio length\n{merged.cpu}",
                                      args.output_dir / "latency_vs_length.png")
        paths += [plot] if plot else []
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return EXIT_OK


def _build_parser() -> argparse.ArgumentParser:
    from sq_pt2e.bench import VARIANTS

    parser = argparse.ArgumentParser(
        prog="sq-pt2e",
        description="StableQuant int8 quantization of wav2vec2 / HuBERT speech models with PyTorch PT2E.",
        epilog="Run `sq-pt2e VERB --help` for the options of a verb.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    bench = verbs.add_parser(
        "bench", help="time float vs int8 variants (inductor, ExecuTorch) of full-size models",
        description="Median latency of float and int8 variants, ratios measured in one process, sizes, build "
                    "time and peak memory. Weights are random: latency does not depend on them.",
    )
    bench.add_argument("--models", nargs="+", default=["wav2vec2-base"], help="architecture names")
    bench.add_argument("--seconds", nargs="+", type=float, default=[10.0], help="audio lengths (a sweep if several)")
    bench.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="intra-op thread counts")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--runs", type=int, default=10, help="timed runs per variant (median; after 2 warm-up runs)")
    bench.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--output-dir", type=Path, default=None, help="write bench.json, bench.md and a plot here")
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sq-pt2e`` command; returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return int(args.run(args))
    except (SqPt2eError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED



if __name__ == "__main__":
    raise SystemExit(main())
