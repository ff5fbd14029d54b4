"""Transcribe audio files with the int8 model, from several threads at once.

``Transcriber`` holds a private copy of the model with the plan's int8 arithmetic
(the same as the eager ``convert_pt2e`` graph), decodes long files in chunks, and is
safe to call from many threads.

Usage:
    python examples/transcribe_int8.py audio1.flac audio2.wav --plan out/plan.json
    python examples/transcribe_int8.py            # two shipped LibriSpeech files, W8A8 max ranges
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sq_pt2e import QuantPlan, default_plan
from sq_pt2e.asr import wer
from sq_pt2e.assets import librispeech_manifest, reference_model
from sq_pt2e.inputs import load_source
from sq_pt2e.models import load_model
from sq_pt2e.transcriber import Transcriber


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", nargs="*", type=Path, help="audio files (default: shipped test-clean files)")
    parser.add_argument("--model", default=str(reference_model("ref-wav2vec2") or "small-wav2vec2"))
    parser.add_argument("--plan", type=Path, default=None, help="plan.json (default: W8A8, max calibration)")
    parser.add_argument("--threads", type=int, default=2, help="concurrent callers")
    args = parser.parse_args(argv)

    shipped = {u.path: u.text for u in librispeech_manifest("test-clean")[:2]}
    files = args.audio or list(shipped)
    model = load_model(args.model)
    plan = QuantPlan.load(args.plan) if args.plan else default_plan(model=args.model)
    calibration = [u.wave for u in load_source(None, limit=8)]
    with Transcriber(model, plan, calibration=calibration) as int8, Transcriber(model) as float32:
        with ThreadPoolExecutor(args.threads) as pool:
            int8_texts = list(pool.map(int8.transcribe, files))
            float_texts = list(pool.map(float32.transcribe, files))
    for path, text, reference in zip(files, int8_texts, float_texts, strict=True):
        print(f"{path}\n  int8:    {text}\n  float32: {reference}")
    if not args.audio:
        refs = [shipped[p] for p in files]
        print(f"\nWER vs reference: int8 {wer(refs, int8_texts):.1f}%, float32 {wer(refs, float_texts):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
