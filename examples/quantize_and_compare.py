"""Quantize a speech model to int8 and compare float vs int8 on every backend.

Runs the whole PT2E path: export -> StableQuantQuantizer(plan) -> calibrate on
shipped LibriSpeech calibration audio -> convert -> inductor (x86 int8 kernels) and
ExecuTorch (.pte, XNNPACK), then prints agreement with float, size and latency.

Usage:
    python examples/quantize_and_compare.py                  # shipped defaults
    python examples/quantize_and_compare.py --model small-hubert --seconds 4 --output-dir out/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sq_pt2e.assets import calibration_files, librispeech_manifest
from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.audio import load_audio, normalize_waveform
from sq_pt2e.compare import compare_backends
from sq_pt2e.models import ARCHITECTURES, load_model
from sq_pt2e.recipes import default_plan


def fixed_length(path: Path, samples: int) -> torch.Tensor:
    """Load, normalise and crop / zero-pad one file to ``samples`` (the exported length)."""
    wave = normalize_waveform(load_audio(path).waveform)[:samples]
    out = torch.zeros(1, samples)
    out[0, : len(wave)] = torch.from_numpy(wave)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small-wav2vec2",
                        help=f"architecture ({', '.join(ARCHITECTURES)}) or a checkpoint folder")
    parser.add_argument("--seconds", type=float, default=4.0, help="fixed input length of the exported programs")
    parser.add_argument("--calibration", type=int, default=8, help="calibration utterances")
    parser.add_argument("--utterances", type=int, default=4, help="evaluation utterances (LibriSpeech test-other)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per variant (median)")
    parser.add_argument("--no-executorch", action="store_true", help="skip the ExecuTorch .pte")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None, help="write comparison.json/.md and plan.json here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    samples = int(args.seconds * 16000)
    model = load_model(args.model, seed=args.seed)
    calibration = [fixed_length(p, samples) for p in calibration_files()[: args.calibration]]
    evaluation = [fixed_length(u.path, samples) for u in librispeech_manifest("test-other")[: args.utterances]]
    plan = default_plan(model=args.model)
    result = compare_backends(model, calibration, evaluation, plan=plan, threads=args.threads, runs=args.runs,
                              executorch=not args.no_executorch)
    table = result.to_markdown()
    print(f"\nmodel: {args.model}\n{table}")
    if args.output_dir is not None:
        atomic_write_text(args.output_dir / "comparison.json", json.dumps(result.to_dict(), indent=2) + "\n")
        atomic_write_text(args.output_dir / "comparison.md", table + "\n")
        plan.save(args.output_dir / "plan.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
