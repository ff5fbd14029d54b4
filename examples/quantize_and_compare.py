"""The main job: StableQuant a speech model, measure WER, run int8 on inductor and ExecuTorch.

1. Load the shipped reference model (or any architecture / checkpoint with --model).
2. Calibrate on shipped LibriSpeech audio; search the StableQuant plan on the shipped
   synthetic dev set (WER; logit KL when the dev set has no transcripts).
3. WER of float32 vs the StableQuant int8 model (eager int8, which compiled int8 is
   checked against; and in the .pte's arithmetic, where every int8 layer's output is int8
   too) on the shipped synthetic test set and real LibriSpeech test-other, decoded
   greedily and by beam search with the shipped word 3-gram LM.
4. Compile int8 with inductor and lower it to an ExecuTorch .pte (XNNPACK); compare
   agreement, size and latency with float, all measured in this run; also with int8
   attention (int8 GEMMs, or torchao's fused kernel on AMX; 7-bit k and v without VNNI).

Usage:
    python examples/quantize_and_compare.py
    python examples/quantize_and_compare.py --model small-hubert --bits W8A8 --output-dir out/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from sq_pt2e.accuracy import transcribe
from sq_pt2e.asr import paired_bootstrap_delta, wer
from sq_pt2e.assets import language_model, reference_model
from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.backends.inductor import fit_plan_to_cpu
from sq_pt2e.beam import BeamSearchDecoder
from sq_pt2e.graph import group_channels
from sq_pt2e.baselines import Bits, build_method
from sq_pt2e.compare import compare_backends
from sq_pt2e.inputs import fixed_length, load_source
from sq_pt2e.lm import NgramLM
from sq_pt2e.models import load_model
from sq_pt2e.stablequant import Evaluator, SearchConfig, run_search


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ref-wav2vec2" if reference_model("ref-wav2vec2") else "small-wav2vec2",
                        help="checkpoint folder or architecture name (default: the shipped ref-wav2vec2)")
    parser.add_argument("--bits", default="W8A8", help="weight/activation bits of the plan, e.g. W8A8, W6A6")
    parser.add_argument("--seconds", type=float, default=4.0, help="fixed input length of the compiled programs")
    parser.add_argument("--calibration", type=int, default=16, help="calibration utterances")
    parser.add_argument("--dev", type=int, default=30, help="dev utterances the search scores candidates on")
    parser.add_argument("--test", type=int, default=60, help="utterances per evaluation set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per variant (median)")
    parser.add_argument("--no-executorch", action="store_true", help="skip the ExecuTorch .pte")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None, help="write plan.json and results.json here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    bits = Bits.parse(args.bits)
    model = load_model(args.model, seed=args.seed)
    calibration = load_source(None, limit=args.calibration)
    dev = load_source(None, shipped="synthetic-dev", limit=args.dev)
    eval_sets = {name: load_source(None, shipped=name, limit=args.test) for name in ("synthetic-test", "test-other")}

    print(f"model: {args.model}\nsearching the StableQuant {bits} plan on {len(dev)} synthetic dev utterances ...")
    config = SearchConfig(weight_bits=bits.weight, act_bits=bits.act)
    plan, report, calibrated = run_search(model, [u.wave for u in calibration],
                                          Evaluator(model, [u.wave for u in dev], [u.text for u in dev]), config,
                                          model_name=args.model)
    statistics = calibrated.statistics
    print(f"  {report.evaluations} evaluations in {report.seconds:.0f} s; sensitive groups: "
          f"{report.sensitive_groups or 'none'}; clip percentiles: {report.chosen_percentiles or '-'}")

    variants = {f"StableQuant {bits}": (plan, "x86_inductor")}
    fitted, changed = fit_plan_to_cpu(plan, group_channels=group_channels(model))
    if changed:  # what inductor really runs on this CPU (no VNNI: 7-bit weights; AMX: small-group convs float)
        variants["StableQuant as compiled on this CPU"] = (fitted, "x86_inductor")
    int8_attention = bits.act == 8  # attention is quantized to 8 bits only
    if int8_attention:
        with_attention, _ = fit_plan_to_cpu(dataclasses.replace(fitted, attention="int8"))  # narrows k and v
        variants["StableQuant + int8 attention"] = (with_attention, "x86_inductor")
    if not args.no_executorch:  # the .pte's arithmetic: XNNPACK rounds every int8 layer's output to int8 too
        variants[f"StableQuant {bits} as a .pte (XNNPACK)"] = (plan, "xnnpack")
    calibration_waves = [u.wave for u in calibration]
    float_forward = build_method("float32", model, [], statistics)
    beam = BeamSearchDecoder(NgramLM.load(language_model()))
    lines = ["| evaluation set | utterances | model | WER % | difference to float [95% CI] | WER % with LM | "
             "difference with LM |", "|---|---:|---|---:|---:|---:|---:|"]
    accuracy: dict[str, dict[str, object]] = {}
    for name, utts in eval_sets.items():
        refs = [u.text for u in utts]
        float_texts, float_logits = transcribe(float_forward, utts)
        float_lm_texts = [beam(x) for x in float_logits]
        accuracy[name] = {"utterances": len(utts), "float32": wer(refs, float_texts),
                          "float32 with LM": wer(refs, float_lm_texts)}
        lines.append(f"| {name} | {len(utts)} | float32 | {accuracy[name]['float32']:.2f} | | "
                     f"{accuracy[name]['float32 with LM']:.2f} | |")
        for label, (variant_plan, target) in variants.items():
            forward = build_method("stablequant", model, calibration_waves, statistics, plan=variant_plan,
                                   target=target)
            texts, logits = transcribe(forward, utts)
            lm_texts = [beam(x) for x in logits]
            delta = paired_bootstrap_delta(refs, float_texts, texts)
            lm_delta = paired_bootstrap_delta(refs, float_lm_texts, lm_texts)
            accuracy[name][label] = {"wer": wer(refs, texts), "delta": delta.delta, "low": delta.low,
                                     "high": delta.high, "wer with LM": wer(refs, lm_texts),
                                     "delta with LM": lm_delta.delta, "low with LM": lm_delta.low,
                                     "high with LM": lm_delta.high}
            lines.append(f"| {name} | {len(utts)} | {label} | {wer(refs, texts):.2f} | {delta} | "
                         f"{wer(refs, lm_texts):.2f} | {lm_delta} |")
    print("\n" + "\n".join(lines))

    samples = int(args.seconds * 16000)
    evaluation = [fixed_length(u.wave, samples) for u in eval_sets["test-other"][:4]]
    result = compare_backends(model, [fixed_length(u.wave, samples) for u in calibration[:8]], evaluation, plan=plan,
                              threads=args.threads, runs=args.runs, executorch=not args.no_executorch,
                              int8_attention=int8_attention)
    print("\n" + result.to_markdown())
    if args.output_dir is not None:
        plan.save(args.output_dir / "plan.json")
        atomic_write_text(args.output_dir / "results.json", json.dumps(
            {"model": args.model, "bits": str(bits), "accuracy": accuracy, "backends": result.to_dict(),
             "search": report.to_dict()}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
