"""torch.compile benchmark: float32 eager, float32 compiled and int8 compiled, ratios from one process.

The int8 model is the shipped reference model's W8A8 plan (max calibration) converted
with PT2E and compiled with inductor (freezing on, oneDNN int8 kernels);
``compile_inductor`` raises if the generated code has fewer int8 kernels than int8
layers or if compiled int8 disagrees with eager int8. For the full benchmark
(more variants, lengths, ExecuTorch) use ``sq-pt2e bench``.

Usage:
    python examples/compile_benchmark.py --model wav2vec2-base --seconds 10 --threads 2
"""

from __future__ import annotations

import argparse

import torch

from sq_pt2e import default_plan, quantize_model
from sq_pt2e.backends.inductor import compile_inductor
from sq_pt2e.compare import median_latency_ms
from sq_pt2e.hardware import cpu_info
from sq_pt2e.models import load_model
from sq_pt2e.models.build import to_ctc_logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small-wav2vec2", help="architecture name or checkpoint folder")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # before compiling: inductor bakes the thread count in
    model = load_model(args.model)
    wave = torch.randn(1, int(args.seconds * 16000))
    float_model = to_ctc_logits(model).eval()
    with torch.no_grad():
        float_compiled = torch.compile(float_model)
        float_compiled(wave)
    int8 = quantize_model(model, wave, [wave], plan=default_plan(model=args.model))
    compiled = compile_inductor(int8.converted, wave, threads=args.threads)

    timings = {
        "float32 eager": median_latency_ms(float_model, wave, runs=args.runs),
        "float32 torch.compile": median_latency_ms(float_compiled, wave, runs=args.runs),
        f"int8 ({int8.bit_widths()}) inductor": median_latency_ms(compiled, wave, runs=args.runs),
    }
    print(f"CPU: {cpu_info().summary()}\n{args.model}, {args.seconds:g} s audio, batch 1, {args.threads} thread(s), "
          f"median of {args.runs} runs\n")
    print("| variant | latency (ms) | vs float32 eager | vs float32 compiled |\n|---|---:|---:|---:|")
    base, base_compiled = timings["float32 eager"], timings["float32 torch.compile"]
    for name, ms in timings.items():
        print(f"| {name} | {ms:.1f} | {base / ms:.2f}x | {base_compiled / ms:.2f}x |")
    report = compiled.report
    print(f"\n{report.int8_kernel_count} int8 kernels for {report.int8_layers_in_graph} int8 layers; compiled vs "
          f"eager int8 cosine {report.cosine:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
