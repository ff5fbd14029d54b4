"""Benchmark float vs int8 variants of speech models (the `sq-pt2e bench` verb).

Usage:
    python benchmarks/run_benchmark.py --models wav2vec2-base hubert-large --seconds 10 --threads 1 2 \
        --output-dir benchmarks/results
    python benchmarks/run_benchmark.py --models small-wav2vec2 --seconds 1 5 10 20 30 --threads 2

Weights are random (latency does not depend on them). Every cell (variant, length,
threads) is built and timed in a fresh process, in rounds with the variant order
rotated; ratios are taken between medians of the same run, each row shows the spread
of its round medians, and the CPU model and ISA flags head the table.
"""

from __future__ import annotations

import sys

from sq_pt2e.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
