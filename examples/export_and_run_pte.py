"""Export an int8 ExecuTorch program (.pte, XNNPACK) and run it from Python.

Quantizes the shipped reference model for XNNPACK (int8 storage), lowers it with the
XNNPACK-friendly rewrites, writes the .pte atomically, loads it with the ExecuTorch
runtime and transcribes shipped LibriSpeech files, next to eager int8 and float.

Usage:
    python examples/export_and_run_pte.py --seconds 10 --output model.pte
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sq_pt2e import QuantPlan, default_plan, quantize_model
from sq_pt2e.asr import ctc_greedy_decode
from sq_pt2e.assets import reference_model
from sq_pt2e.backends.executorch_xnnpack import PteRunner, check_pte, lower_to_xnnpack, save_pte
from sq_pt2e.inputs import fixed_length, load_source
from sq_pt2e.models import load_model
from sq_pt2e.models.build import to_ctc_logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(reference_model("ref-wav2vec2") or "small-wav2vec2"))
    parser.add_argument("--plan", type=Path, default=None, help="plan.json (default: W8A8, max calibration)")
    parser.add_argument("--seconds", type=float, default=6.0, help="the program's (fixed) input length")
    parser.add_argument("--files", type=int, default=2, help="shipped test-clean files to transcribe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("out/model_int8.pte"))
    args = parser.parse_args(argv)

    model = load_model(args.model)
    plan = QuantPlan.load(args.plan) if args.plan else default_plan(model=args.model)
    samples = int(args.seconds * 16000)
    calibration = [fixed_length(u.wave, samples) for u in load_source(None, limit=8)]
    quantized = quantize_model(model, calibration[0], calibration, plan=plan, target="xnnpack")
    data, report = lower_to_xnnpack(quantized.converted, calibration[0])
    path = save_pte(data, args.output)
    runner = PteRunner(path, samples, threads=args.threads)
    with torch.no_grad():
        report = check_pte(runner, quantized.converted(calibration[0]), calibration[0], report)
    print(f"wrote {path}: {report.pte_bytes / 2**20:.1f} MiB, {report.summary()}; "
          f".pte vs eager int8 cosine {report.cosine:.5f}")

    float_model = to_ctc_logits(model).eval()
    for utt in load_source(None, shipped="test-clean", limit=args.files):
        wave = fixed_length(utt.wave, samples)
        with torch.no_grad():
            texts = {"float32": float_model(wave), "eager int8": quantized.converted(wave), ".pte": runner(wave)}
        print(f"\n{utt.id} (reference: {utt.text})")
        for name, logits in texts.items():
            print(f"  {name:>10}: {ctc_greedy_decode(logits[0])[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
