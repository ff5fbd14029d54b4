"""Quantize a Hugging Face wav2vec2 / HuBERT checkpoint folder with the PT2E API, step by step.

torch.export -> prepare_pt2e(StableQuantQuantizer(plan)) -> calibrate -> convert_pt2e,
then check that every planned layer runs in int8 and how close the int8 logits are to
float, and save the int8 program (``torch.export``, loadable with
``sq_pt2e.pipeline.load_program``).

Usage:
    python examples/quantize_hf_checkpoint.py                        # the shipped ref-hubert folder
    python examples/quantize_hf_checkpoint.py --checkpoint facebook-hubert-large-ls960-ft/ --plan plan.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from sq_pt2e import QuantPlan, StableQuantQuantizer, default_plan, export_speech_model
from sq_pt2e.assets import reference_model
from sq_pt2e.inputs import fixed_length, load_source
from sq_pt2e.models.checkpoint import load_checkpoint
from sq_pt2e.passes.verify_quantization import summarize_quantized_graph


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=reference_model("ref-hubert"),
                        help="Hugging Face model folder (default: the shipped ref-hubert)")
    parser.add_argument("--plan", type=Path, default=None, help="plan.json (default: W8A8, max calibration)")
    parser.add_argument("--seconds", type=float, default=4.0, help="fixed input length of the program")
    parser.add_argument("--calibration", type=int, default=8, help="shipped LibriSpeech files to calibrate on")
    parser.add_argument("--output-dir", type=Path, default=Path("out"))
    args = parser.parse_args(argv)

    model = load_checkpoint(args.checkpoint).eval()
    plan = QuantPlan.load(args.plan) if args.plan else default_plan(model=str(args.checkpoint))
    samples = int(args.seconds * 16000)
    waves = [fixed_length(u.wave, samples) for u in load_source(None, limit=args.calibration)]

    with torch.no_grad():
        float_logits = model(waves[0]).logits
    exported = export_speech_model(model, waves[0])  # torch.export.export, weight norm folded
    quantizer = StableQuantQuantizer(plan, target="x86_inductor")
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for wave in waves:  # calibration
            prepared(wave)
    int8_model = convert_pt2e(prepared)

    summary = summarize_quantized_graph(int8_model)
    float_layers = [s.name for s in quantizer.layer_status if s.status != "int8"]
    with torch.no_grad():
        int8_logits = int8_model(waves[0])
    cosine = torch.nn.functional.cosine_similarity(float_logits.flatten(), int8_logits.flatten(), dim=0)
    print(f"{len(summary.int8_layers)} int8 layers, float: {float_layers or 'none'}; "
          f"int8 vs float logit cosine {float(cosine):.4f}")

    program = torch.export.export(int8_model, (waves[0],))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "model_int8.pt2"
    torch.export.save(program, path)
    print(f"wrote {path} (inputs of exactly {samples} samples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
