"""Hand-edit a quantization plan and re-apply it, without searching again.

A plan is JSON. This script writes one, edits the file the way you would in an
editor (keep the first CNN layer in float with a reason, put every Transformer
Linear at 4-bit weights, clip one layer's input at a percentile), loads it back (the
edit is validated: a misspelt layer name or 9-bit weights is an error naming the
layer) and quantizes the model with it, printing what each layer became.

Usage:
    python examples/edit_plan.py --plan out/plan.json      # edit a searched plan
    python examples/edit_plan.py                           # start from W8A8 max ranges
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sq_pt2e import QuantPlan, default_plan, quantize_model
from sq_pt2e.assets import reference_model
from sq_pt2e.inputs import fixed_length, load_source
from sq_pt2e.models import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(reference_model("ref-hubert") or "small-hubert"))
    parser.add_argument("--plan", type=Path, default=None, help="plan.json to start from (default: W8A8 max)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--output-dir", type=Path, default=Path("out"))
    args = parser.parse_args(argv)

    model = load_model(args.model)
    path = (QuantPlan.load(args.plan) if args.plan else default_plan(model=args.model)).save(
        args.output_dir / "plan_edited.json")

    edited = json.loads(path.read_text())  # what a text editor would do
    layers = {layer["name"]: layer for layer in edited["layers"]}
    first_cnn = next(n for n, m in model.named_modules() if n.endswith("conv_layers.0.conv"))
    layers[first_cnn] = {"name": first_cnn, "op": "conv1d", "skip": True, "reason": "kept float by hand (raw audio in)"}
    proj = next(n for n, m in model.named_modules() if n.endswith("feature_projection.projection"))
    layers[proj] = {"name": proj, "op": "linear", "calibration": "percentile", "clip_percentile": 99.9,
                    "reason": "clip input outliers"}
    edited["layers"] = list(layers.values())
    edited["op_defaults"] = [{"name": "*", "op": "linear", "weight_bits": 4, "act_bits": 8}]
    path.write_text(json.dumps(edited, indent=2) + "\n")

    plan = QuantPlan.load(path)  # validated here, before any work
    samples = int(args.seconds * 16000)
    waves = [fixed_length(u.wave, samples) for u in load_source(None, limit=4)]
    quantized = quantize_model(model, waves[0], waves, plan=plan, fit_to_cpu=False)
    print(f"{path}: {len(plan.layers)} explicit layer(s), every other Linear W4A8\n")
    print("| layer | op | became | bits | reason |\n|---|---|---|---|---|")
    for status in quantized.layer_status:
        bits = f"W{status.weight_bits}A{status.act_bits}" if status.status == "int8" else ""
        print(f"| {status.name} | {status.op} | {status.status} | {bits} | {status.reason} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
