"""``sq-pt2e``: quantize, compare, benchmark and export speech models from the command line.

Every verb prints a summary table, writes machine-readable JSON with ``--output-dir``,
and exits 0 on success, 1 when the work failed (the error names the problem) and 2
on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sq_pt2e.errors import SqPt2eError

if TYPE_CHECKING:
    from sq_pt2e.beam import BeamSearchDecoder
    from sq_pt2e.plan import QuantPlan

__all__ = ["load_plan_for_model", "main", "search_inputs"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    from sq_pt2e.models import ARCHITECTURES

    parser.add_argument(
        "--model", default=default, required=default is None,
        help=f"a shipped reference model (ref-wav2vec2, ref-hubert), an architecture name "
             f"({', '.join(ARCHITECTURES)}; random weights) or a checkpoint folder",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and inputs (default 0)")


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's; use 1 per run when several runs share a machine)")


def _add_decoder_arguments(parser: argparse.ArgumentParser, also: str = "") -> None:
    from sq_pt2e.beam import DEFAULT_LM_WEIGHT, DEFAULT_WORD_SCORE

    parser.add_argument("--lm", default=None, metavar="ARPA",
                        help="decode by beam search over the words of this word n-gram language model (ARPA, "
                             "plain or .gz); 'shipped': the LJ Speech 3-gram the reference models were measured "
                             "with (default: greedy CTC decoding)" + (f"; {also}" if also else ""))
    parser.add_argument("--lm-weight", type=float, default=DEFAULT_LM_WEIGHT, help="with --lm: the LM's weight")
    parser.add_argument("--word-score", type=float, default=DEFAULT_WORD_SCORE,
                        help="with --lm: score added per word")
    parser.add_argument("--beam-size", type=int, default=100, help="with --lm: hypotheses kept per frame")


def _decoder(args: argparse.Namespace) -> BeamSearchDecoder | None:
    """The ``--lm`` beam search decoder, or None for greedy decoding."""
    if args.lm is None:
        return None
    from sq_pt2e.assets import language_model
    from sq_pt2e.beam import BeamSearchDecoder
    from sq_pt2e.lm import NgramLM

    lm = NgramLM.load(language_model() if args.lm == "shipped" else args.lm)
    return BeamSearchDecoder(lm, lm_weight=args.lm_weight, word_score=args.word_score, beam_size=args.beam_size)


def _set_threads(threads: int | None) -> None:
    """Honour ``--threads`` (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from sq_pt2e.atomic import atomic_write_text
    from sq_pt2e.hardware import cpu_info
    from sq_pt2e.kernel_profile import profile_variant
    from sq_pt2e.models import build_model

    result = profile_variant(build_model(args.model, seed=args.seed), args.model, args.variant, seconds=args.seconds,
                             threads=args.threads, runs=args.runs, seed=args.seed, batch=args.batch)
    text = f"CPU: {cpu_info().summary()}; torch {torch.__version__}\n\n" + result.to_markdown(top=args.top)
    print(text)
    if args.output is not None:
        atomic_write_text(args.output, text + "\n")
        print(f"wrote {args.output}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from sq_pt2e.bench import BenchResult, run_benchmark
    from sq_pt2e.models import load_model
    from sq_pt2e.plots import plot_latency_vs_length

    if args.plan is not None and len(args.models) != 1:
        raise ValueError(f"--plan {args.plan} belongs to one model; got --models {' '.join(args.models)}")
    plan = load_plan_for_model(args.plan, args.models[0])
    merged = None

    def combined(result: BenchResult) -> BenchResult:
        if merged is None:
            return result
        return BenchResult(merged.cpu, merged.torch_version, merged.rows + result.rows,
                           merged.skipped + result.skipped, result.method, merged.ceilings + result.ceilings)

    def save_partial(result: BenchResult) -> None:
        if args.output_dir is not None:
            combined(result).save(args.output_dir)

    for name in args.models:
        result = run_benchmark(load_model(name, seed=args.seed), name, seconds=args.seconds, threads=args.threads,
                               batch=args.batch, runs=args.runs, rounds=args.rounds, isolate=not args.in_process,
                               variants=args.variants, seed=args.seed, plan=plan, gemm_ceiling=args.gemm_ceiling,
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


def _add_sensitivity_arguments(parser: argparse.ArgumentParser) -> None:
    """``--gamma`` and ``--kl-share``: when a layer group counts as sensitive (step 1 of the search)."""
    from sq_pt2e.stablequant import SearchConfig

    parser.add_argument("--gamma", type=float, default=SearchConfig.gamma,
                        help="under the WER criterion: a group is sensitive when quantizing it alone (max ranges) "
                             f"raises dev WER by more than this many points (default {SearchConfig.gamma})")
    parser.add_argument("--kl-share", type=float, default=SearchConfig.kl_share,
                        help="under the logit-KL criterion (the default): a group is sensitive when quantizing it "
                             "alone (max ranges) costs more than this share of the logit KL of quantizing every "
                             f"layer (default {SearchConfig.kl_share})")


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The audio and ``SearchConfig`` arguments of a search verb (read by :func:`search_inputs`)."""
    from sq_pt2e.plan import TARGETS
    from sq_pt2e.stablequant import DEFAULT_PERCENTILES, SearchConfig

    parser.add_argument("--calibration", default=None,
                        help="folder or .tsv manifest of calibration audio (default: shipped LibriSpeech audio)")
    parser.add_argument("--dev", default=None,
                        help="folder or manifest to score candidates on; with transcripts the search uses WER "
                             "(default: a held-out part of the calibration audio, scored by logit KL)")
    parser.add_argument("--criterion", choices=["wer", "kl"], default=None,
                        help="what candidates are scored by: kl (default; logit KL against float, WER is still "
                             "reported when the dev set has transcripts) or wer (the paper's; needs transcripts)")
    parser.add_argument("--bits", default="W8A8", help="weight/activation bits, e.g. W8A8, W6A6, W4A8")
    parser.add_argument("--granularity", choices=["block", "layer"], default="block")
    parser.add_argument("--reading", choices=["mse-rest", "mse-all"], default="mse-rest")
    parser.add_argument("--act-scheme", choices=["affine", "symmetric"], default="affine",
                        help="affine: one-sided layer inputs (after GELU) get their grid over [min, range] "
                             "(default); symmetric: [-range, range] everywhere")
    parser.add_argument("--start", choices=["mse", "max"], default="mse",
                        help="ranges of sensitive groups before their percentile search; mse (default) also lets "
                             "the MSE range win over every percentile")
    parser.add_argument("--smooth-alpha", type=float, nargs="+", default=list(SearchConfig.smooth_alphas),
                        help="SmoothQuant strength for the CNN encoder's conv inputs: per-channel factors folded into "
                             "the weights; several values: the search calibrates at each and keeps the one whose "
                             "all-MSE plan scores best on dev (default "
                             f"{' '.join(f'{a:g}' for a in SearchConfig.smooth_alphas)}; 0: off)")
    parser.add_argument("--passes", type=int, default=SearchConfig.passes,
                        help="passes of the percentile search over the sensitive groups; each pass after the first "
                             "revisits every group with the others at their chosen ranges, and the search stops "
                             f"when a pass changes nothing (default {SearchConfig.passes}; "
                             "1: the paper's greedy order)")
    parser.add_argument("--promote-bits", type=int, default=None,
                        help="mixed precision: give the groups whose weights gain most at this width (e.g. 8) these "
                             "weight bits, within --promote-share of the weights (default: off)")
    parser.add_argument("--promote-share", type=float, default=SearchConfig.promote_share,
                        help="with --promote-bits: the largest share of the weights promoted; with --target "
                             "xnnpack, of the Linear weights the .pte packs (4 bits or fewer), promoting any other "
                             f"layer costs no bytes there and is free (default {SearchConfig.promote_share})")
    parser.add_argument("--float-share", type=float, default=SearchConfig.float_share,
                        help="float fallback: keep in float the groups whose int8 error costs most per FLOP, "
                             "within this share of the searched layers' FLOPs (e.g. 0.3; default "
                             f"{SearchConfig.float_share}: every searched layer int8)")
    parser.add_argument("--split-percentiles", type=float, nargs="*",
                        default=list(SearchConfig.split_percentiles),
                        help="outlier split: for each group of CNN convs (--split-scope), try each of these "
                             "percentiles as the range of its inputs, with what lies above computed by a second int8 "
                             "conv (same weights, twice the multiply-adds); kept when it lowers the dev KL by "
                             f"--split-gain (default {' '.join(f'{p:g}' for p in SearchConfig.split_percentiles)}; "
                             "no values: off)")
    parser.add_argument("--split-scope", choices=("all", "sensitive"), default=SearchConfig.split_scope,
                        help="which groups the outlier split is tried for: every group of CNN convs, or the "
                             "sensitive ones (a split also makes the main grid finer where rounding, not outliers, "
                             f"costs most; default {SearchConfig.split_scope})")
    parser.add_argument("--split-gain", type=float, default=SearchConfig.split_gain,
                        help="with --split-percentiles: the share of the dev logit KL a split must save to be kept "
                             f"(default {SearchConfig.split_gain})")
    parser.add_argument("--split-max-flops", type=float, default=SearchConfig.split_max_flops,
                        help="with --split-percentiles: the most all splits together may add, as a share of the "
                             "searched layers' FLOPs (each split runs its convs twice; e.g. 0.1 keeps the int8 model "
                             f"fast; default {SearchConfig.split_max_flops:g}: no limit)")
    parser.add_argument("--no-refit", action="store_true",
                        help="keep every layer's own weights (default: the quantized CNN convs get weights refit by "
                             "least squares to their int8 inputs; at 6 weight bits or fewer the search also tries "
                             "every conv and Linear layer refit and GPTQ-rounded; each kept when it lowers the dev "
                             "score)")
    parser.add_argument("--target", choices=TARGETS, default=SearchConfig.target,
                        help="the backend candidates are scored for: xnnpack (an ExecuTorch .pte) also rounds every "
                             "int8 layer's output to int8 and its bias to the int32 grid, as XNNPACK's kernels do; a "
                             "plan scored for one target can "
                             f"be worse on the other (default {SearchConfig.target})")
    _add_sensitivity_arguments(parser)
    parser.add_argument("--percentiles", type=float, nargs="+", default=list(DEFAULT_PERCENTILES),
                        help="clip percentiles tried for sensitive groups, in order")
    parser.add_argument("--max-calibration", type=int, default=32, help="calibration utterances to use")
    parser.add_argument("--max-dev", type=int, default=100, help="dev utterances to use")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                        help="skip: leave out (and list) unreadable calibration/dev files instead of stopping")


def load_plan_for_model(path: str | Path | None, model: str) -> QuantPlan | None:
    """The plan at ``path`` (None: no plan), refused when it records another model than ``model``."""
    from sq_pt2e.plan import QuantPlan

    if path is None:
        return None
    plan = QuantPlan.load(path)
    plan.check_model(model, source=str(path))
    return plan


def calibration_waves(source: str | None, limit: int) -> list:
    """At most ``limit`` waveforms of a ``--calibration`` source (None: the shipped calibration audio)."""
    from sq_pt2e.inputs import load_source

    return [u.wave for u in load_source(source, limit=limit)]


def search_inputs(args: argparse.Namespace) -> tuple[object, object, object]:
    """The model, the calibration/dev sets and the ``SearchConfig`` a search verb's arguments name.

    Shared by ``quantize`` and ``quantize-distributed``.
    """
    from sq_pt2e.baselines import Bits
    from sq_pt2e.inputs import search_sets
    from sq_pt2e.models import load_model
    from sq_pt2e.stablequant import SearchConfig

    bits = Bits.parse(args.bits)
    model = load_model(args.model, seed=args.seed)
    sets = search_sets(args.calibration, args.dev, max_calibration=args.max_calibration, max_dev=args.max_dev,
                       criterion=args.criterion, on_error=args.on_error)
    config = SearchConfig(gamma=args.gamma, kl_share=args.kl_share, percentiles=tuple(args.percentiles),
                          granularity=args.granularity, reading=args.reading, criterion=sets.criterion,
                          weight_bits=bits.weight, act_bits=bits.act,
                          act_scheme=args.act_scheme, start=args.start, smooth_alpha=args.smooth_alpha[0],
                          smooth_alphas=tuple(args.smooth_alpha),
                          passes=args.passes, promote_weight_bits=args.promote_bits, promote_share=args.promote_share,
                          float_share=args.float_share, split_percentiles=tuple(args.split_percentiles),
                          split_scope=args.split_scope, split_gain=args.split_gain, target=args.target,
                          split_max_flops=args.split_max_flops,
                          refit_ops=() if args.no_refit else SearchConfig.refit_ops)
    return model, sets, config


def _cmd_quantize(args: argparse.Namespace) -> int:
    from sq_pt2e.atomic import atomic_write_text
    from sq_pt2e.plan import refit_file
    from sq_pt2e.report import write_report
    from sq_pt2e.stablequant import Evaluator, run_search
    from sq_pt2e.stats_file import save_statistics

    _set_threads(args.threads)
    model, sets, config = search_inputs(args)
    calibration, dev, references, criterion = sets.calibration, sets.dev, sets.references, sets.criterion
    print(f"calibrating on {len(calibration)} utterance(s), searching on {len(dev)} ({criterion}) ...",
          file=sys.stderr, flush=True)
    evaluator = Evaluator(model, [u.wave for u in dev], references)  # WER is reported with either criterion
    plan, report, calibrated = run_search(model, [u.wave for u in calibration], evaluator, config,
                                          model_name=args.model,
                                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    statistics = calibrated.statistics
    if args.int8_attention:  # its q/k/v scales fixed from the calibration audio, as the searched layer ranges are
        from sq_pt2e.backends.inductor_buckets import pin_attention_scales

        plan = pin_attention_scales(model, dataclasses.replace(plan, attention="int8"), [u.wave for u in calibration])
    out = args.output_dir
    written = [plan.save(out / "plan.json"), *([refit_file(out / "plan.json")] if plan.refits else []),
               save_statistics(out / "statistics.npz", statistics),
               atomic_write_text(out / "search_report.json",
                                 json.dumps(report.to_dict(), indent=2, default=float) + "\n")]
    if args.program_seconds > 0:
        written.append(_write_program(model, plan, calibration, args.program_seconds, out / "model_int8.pt2"))
    written += write_report(out, plan, statistics=statistics, search_path=out / "search_report.json")
    print(_search_summary(report, criterion))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def _write_program(model: object, plan: object, calibration: list, seconds: float, path: Path) -> Path:
    """Convert ``model`` with ``plan`` for x86/inductor at a fixed length and save the program."""
    from sq_pt2e.inputs import fixed_length
    from sq_pt2e.pipeline import quantize_model, save_program

    samples = int(seconds * 16000)
    waves = [fixed_length(u.wave, samples) for u in calibration[:4]]
    print(f"converting to int8 for x86/inductor at {seconds:g} s ...", file=sys.stderr, flush=True)
    return save_program(quantize_model(model, waves[0], waves, plan=plan), waves[0], path)


def _beside(plan_path: Path, given: Path | None, name: str) -> Path | None:
    """``given``, else ``name`` in the plan's folder when it exists there."""
    if given is not None:
        return given
    candidate = plan_path.parent / name
    return candidate if candidate.exists() else None


def _cmd_report(args: argparse.Namespace) -> int:
    from sq_pt2e.plan import QuantPlan
    from sq_pt2e.report import write_report
    from sq_pt2e.stats_file import load_statistics

    plan = QuantPlan.load(args.plan)
    statistics_path = _beside(args.plan, args.statistics, "statistics.npz")
    written = write_report(
        args.output_dir or args.plan.parent, plan,
        statistics=load_statistics(statistics_path) if statistics_path else None,
        search_path=_beside(args.plan, args.search_report, "search_report.json"),
        accuracy_path=args.accuracy, bench_path=args.bench,
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def _cmd_accuracy(args: argparse.Namespace) -> int:
    from sq_pt2e.accuracy import build_accuracy_table
    from sq_pt2e.atomic import atomic_write_text
    from sq_pt2e.baselines import Bits
    from sq_pt2e.inputs import load_source
    from sq_pt2e.models import load_model
    from sq_pt2e.stablequant import SearchConfig

    _set_threads(args.threads)
    model = load_model(args.model, seed=args.seed)
    calibration = load_source(args.calibration, limit=args.max_calibration, on_error=args.on_error)
    dev = load_source(args.dev, limit=args.max_dev, on_error=args.on_error)
    eval_sets = _eval_sets(args.eval, args.max_eval, args.on_error)
    table = build_accuracy_table(
        model, args.model, calibration, dev, eval_sets, bit_widths=[Bits.parse(b) for b in args.bits],
        methods=args.methods, search=SearchConfig(gamma=args.gamma, kl_share=args.kl_share),
        decoders={} if args.lm is None else {f"LM {args.lm}": _decoder(args)},
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.update is not None:
        from sq_pt2e.accuracy import AccuracyTable

        table = AccuracyTable.from_json(args.update.read_text()).updated_with(table)
    print(table.to_markdown())
    out = args.output_dir or (args.update.parent if args.update is not None else None)
    if out is not None:
        atomic_write_text(out / "accuracy.json", table.to_json())
        atomic_write_text(out / "accuracy.md", table.to_markdown() + "\n")
        print(f"wrote {out / 'accuracy.json'}, {out / 'accuracy.md'}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, check_pte, lower_to_xnnpack, save_pte
    from sq_pt2e.framing import LengthRange, cnn_geometry
    from sq_pt2e.models import load_model
    from sq_pt2e.pipeline import quantize_model
    from sq_pt2e.inputs import fixed_length

    import torch

    if args.format == "aoti" and args.dynamic:
        raise ValueError("--dynamic: an AOTInductor package takes one input length (inductor's int8 convolutions "
                         "do not compile with dynamic shapes in torch 2.13); `sq-pt2e transcribe --backend inductor` "
                         "runs any length through packages per length bucket")
    model = load_model(args.model, seed=args.seed)
    plan = load_plan_for_model(args.plan, args.model)
    samples = int(args.seconds * 16000)
    if args.format == "aoti":
        return _export_aoti(args, model, plan, samples)
    lengths = LengthRange.up_to(samples, cnn_geometry(model)) if args.dynamic else None
    if lengths is not None:
        samples = lengths.max_samples
    calibration = [fixed_length(wave, samples) for wave in calibration_waves(args.calibration, args.max_calibration)]
    example = calibration[0]
    quantized = quantize_model(model, example, calibration, plan=plan, target="xnnpack", lengths=lengths)
    data, report = lower_to_xnnpack(quantized.converted, example, lengths=lengths)
    runner = PteRunner(data, samples, threads=args.threads, lengths=lengths)
    checks = [example] if lengths is None else [lengths.cut(example[:, :n]) for n in (samples, samples // 3)]
    with torch.no_grad():  # the worst of the checked lengths goes in the report
        report = min((check_pte(runner, quantized.converted(w), w, report) for w in checks), key=lambda r: r.cosine)
    path = save_pte(data, args.output)
    accepted = (f"exactly {samples} samples ({args.seconds:g} s at 16 kHz)" if lengths is None else
                f"{lengths.min_samples} to {lengths.max_samples} samples ({lengths.max_samples / 16000:g} s at most; "
                f"longer audio in chunks)")
    print(f"wrote {path} ({report.pte_bytes / 2**20:.1f} MiB) for inputs of {accepted}: "
          f"{report.summary()} {report.portable_ops or ''}; .pte vs eager int8 cosine {report.cosine:.5f}")
    return EXIT_OK


def _export_aoti(args: argparse.Namespace, model: object, plan: object, samples: int) -> int:
    """``sq-pt2e export --format aoti``: quantize for x86 and compile a verified AOTInductor package."""
    from sq_pt2e.backends.inductor import compile_aot_package
    from sq_pt2e.inputs import fixed_length
    from sq_pt2e.pipeline import quantize_model

    calibration = [fixed_length(wave, samples) for wave in calibration_waves(args.calibration, args.max_calibration)]
    quantized = quantize_model(model, calibration[0], calibration, plan=plan)
    compiled = compile_aot_package(quantized.converted, calibration[0], args.output, threads=args.threads)
    report = compiled.report
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB) for inputs of exactly {samples} "
          f"samples ({args.seconds:g} s at 16 kHz), {report.threads} thread(s), {report.cpu}: "
          f"{report.int8_kernel_count} oneDNN int8 kernel calls for {report.int8_layers_in_graph} int8 layers; "
          f"compiled vs eager int8 cosine {report.cosine:.5f}; {quantized.bit_widths()}")
    if report.int8_attention_in_graph:
        print(f"{report.int8_attention_kernels} attention blocks on int8 kernels: the package calls the custom op "
              "sq_pt2e::int8_bmm, so it runs in Python with sq_pt2e imported (load_aot_package), not from the C++ "
              "loader")
    return EXIT_OK


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from sq_pt2e.data import Utterance
    from sq_pt2e.models import load_model
    from sq_pt2e.transcriber import Transcriber, transcribe_dataset

    model = load_model(args.model, seed=args.seed)
    plan = load_plan_for_model(args.plan, args.model)
    if args.backend == "inductor":
        return _transcribe_inductor(args, model, plan)
    calibration = None
    if plan is not None and plan.needs_calibration():
        calibration = calibration_waves(args.calibration, 16)
    records = [Utterance(str(p), Path(p)) for p in dict.fromkeys(args.audio)]
    with Transcriber(model, plan, calibration=calibration, chunk_seconds=args.chunk_seconds,
                     overlap_seconds=args.overlap_seconds, decoder=_decoder(args)) as transcriber:
        results = transcribe_dataset(transcriber, records, checkpoint=args.checkpoint, on_error=args.on_error)
    return _print_transcripts(args, [(r.path, r.text, r.error) for r in results])


def _transcribe_inductor(args: argparse.Namespace, model: object, plan: object) -> int:
    """Transcribe with compiled int8 (inductor), one compile per length bucket."""
    import torch

    from sq_pt2e.asr import greedy_transcript
    from sq_pt2e.audio import load_audio, normalize_waveform
    from sq_pt2e.backends.inductor_buckets import BucketedInt8Model
    from sq_pt2e.errors import AudioError

    if args.checkpoint is not None:
        raise ValueError("--checkpoint is supported with --backend simulate only")
    runner = BucketedInt8Model(model, plan, calibration_waves(args.calibration, 16),
                               buckets=args.buckets, threads=args.threads, cache_dir=args.cache_dir,
                               cache_max_bytes=int(args.cache_max_gb * 2**30),
                               overlap_seconds=1.0 if args.overlap_seconds is None else args.overlap_seconds)
    decode = _decoder(args) or greedy_transcript
    rows = []
    for path in dict.fromkeys(args.audio):
        try:
            wave = torch.from_numpy(normalize_waveform(load_audio(path).waveform))
            rows.append((path, decode(runner(wave)[0]), None))
        except AudioError as exc:
            if args.on_error == "raise":
                raise
            rows.append((path, "", str(exc)))
    return _print_transcripts(args, rows)


def _print_transcripts(args: argparse.Namespace, results: list[tuple[str, str, str | None]]) -> int:
    rows = [{"file": path, "text": text} | ({"error": error} if error else {}) for path, text, error in results]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(f"{r['file']}\t{r['text']}" for r in rows if "error" not in r))
    for row in rows:
        if "error" in row:
            print(f"skipped {row['file']}: {row['error']}", file=sys.stderr)
    return EXIT_FAILED if any("error" in r for r in rows) else EXIT_OK


def _eval_sets(specs: Sequence[str], limit: int | None, on_error: str = "raise") -> dict[str, list]:
    """Load each ``NAME[=SOURCE]`` evaluation set (transcripts required); bad files skipped when asked."""
    from sq_pt2e.inputs import load_source

    shipped = ("synthetic-test", "synthetic-dev", "test-other", "test-clean")
    sets = {}
    for spec in specs:
        name, _, source = spec.partition("=")
        if not source and name not in shipped:
            raise ValueError(f"--eval {spec!r}: expected NAME=FOLDER_OR_MANIFEST or a shipped set {shipped}")
        sets[name] = load_source(source or None, shipped=name, limit=limit, on_error=on_error)
        for skipped in getattr(sets[name], "skipped", []):
            print(f"--eval {name}: skipped {skipped.path}: {skipped.problem}", file=sys.stderr)
        if not all(u.text for u in sets[name]):
            raise ValueError(f"--eval {name}: every utterance needs a transcript for WER")
    return sets


def _cmd_eval(args: argparse.Namespace) -> int:
    from sq_pt2e.accuracy import transcribe
    from sq_pt2e.asr import cer, paired_bootstrap_delta, wer
    from sq_pt2e.atomic import atomic_write_text
    from sq_pt2e.baselines import build_method
    from sq_pt2e.models import load_model
    from sq_pt2e.simulate import collect_statistics

    _set_threads(args.threads)
    model = load_model(args.model, seed=args.seed)
    eval_sets = _eval_sets(args.eval, args.max_eval, args.on_error)
    float_forward = build_method("float32", model, [], {})
    decode = _decoder(args)
    int8_forward = None
    if args.plan is not None:
        plan = load_plan_for_model(args.plan, args.model)
        needs_statistics = plan.with_float_attention().needs_calibration()  # the layers' statistics
        needs_audio = plan.needs_calibration() or args.target == "xnnpack"
        waves = calibration_waves(args.calibration, 32) if needs_audio else []
        statistics = collect_statistics(model, waves, input_scales=plan.input_scales()) if needs_statistics else {}
        int8_forward = build_method("stablequant", model, waves, statistics, plan=plan, target=args.target)
    lines = ["| set | utterances | float32 WER | float32 CER |" + (" int8 WER | int8 CER | difference [95% CI] |"
                                                                   if int8_forward else ""),
             "|---|---:|---:|---:|" + ("---:|---:|---:|" if int8_forward else "")]
    results = {}
    for name, utts in eval_sets.items():
        refs = [u.text for u in utts]
        float_texts, _ = transcribe(float_forward, utts, keep_logits=False, decode=decode)
        row = {"utterances": len(utts), "decoding": "greedy" if decode is None else f"lm:{args.lm}",
               "float_wer": wer(refs, float_texts), "float_cer": cer(refs, float_texts)}
        line = f"| {name} | {len(utts)} | {row['float_wer']:.2f} | {row['float_cer']:.2f} |"
        if int8_forward is not None:
            int8_texts, _ = transcribe(int8_forward, utts, keep_logits=False, decode=decode)
            delta = paired_bootstrap_delta(refs, float_texts, int8_texts)
            row |= {"int8_wer": wer(refs, int8_texts), "int8_cer": cer(refs, int8_texts), "delta": delta.delta,
                    "low": delta.low, "high": delta.high}
            line += f" {row['int8_wer']:.2f} | {row['int8_cer']:.2f} | {delta} |"
        row["transcripts"] = [{"id": u.id, "reference": ref, "float32": text} for u, ref, text
                              in zip(utts, refs, float_texts, strict=True)]
        if int8_forward is not None:
            for entry, text in zip(row["transcripts"], int8_texts, strict=True):
                entry["int8"] = text
        results[name] = row
        lines.append(line)
    decoding = "greedy CTC" if decode is None else f"beam search with the word LM {args.lm}"
    print(f"model: {args.model}; decoding: {decoding}\n" + "\n".join(lines))
    if args.output_dir is not None:
        atomic_write_text(args.output_dir / "eval.json", json.dumps(results, indent=2) + "\n")
    return EXIT_OK


def _search_summary(report: object, criterion: str) -> str:
    from sq_pt2e.report import reconstruction_trials
    from sq_pt2e.stablequant import promoted_share_unit

    def fmt(score: object) -> str:
        return fmt_dict(score.as_dict())

    def fmt_dict(score: dict[str, float]) -> str:
        wer = "" if score.get("wer") is None else f"WER {score['wer']:.2f}%, "
        return f"{wer}KL {score['kl']:.3g}"

    lines = [
        "| group | sensitivity | sensitive | clip percentile |",
        "|---|---:|:---:|---:|",
    ]
    for group, values in report.sensitivity.items():
        value = values.get("delta_wer") if criterion == "wer" else values["kl"]
        sensitive = group in report.sensitive_groups
        chosen = report.chosen_percentiles.get(group)
        clip = "MSE range" if group in report.kept_mse else "" if chosen is None else f"{chosen:g}"
        if group in report.split_groups:
            clip = f"{report.split_groups[group]:g}, outliers split"
        lines.append(f"| {group} | {value:.4g} | {'yes' if sensitive else ''} | {clip} |")
    lines += [
        "",
        f"float: {fmt(report.float_score)}; all layers max: {fmt(report.all_max_score)}; "
        f"StableQuant plan: {fmt(report.final_score)}",
        f"search: {report.evaluations} model evaluations in {report.seconds:.1f} s; "
        f"{len(report.refinements)} choice(s) changed by passes after the first",
    ]
    if report.promotion_trials:
        lines.append(f"mixed precision: {', '.join(report.promoted_groups) or 'no group'} promoted "
                     f"({report.promoted_share:.0%} of {promoted_share_unit(str(report.config.get('target')))})")
    if report.float_trials:
        lines.append(f"float fallback: {', '.join(report.float_groups) or 'no group'} kept float "
                     f"({report.kept_float_share:.0%} of the FLOPs)")
    if report.split_groups:
        lines.append(f"outlier split: {', '.join(report.split_groups)}, adding {report.split_flops_share:.0%} of the "
                     "searched layers' FLOPs (--split-max-flops limits it)")
    if report.smoothing_trials:
        lines.append("smoothing strength: " + ", ".join(f"alpha {a}: {fmt_dict(t)}"
                                                         for a, t in report.smoothing_trials.items())
                     + f"; chose {report.config['smooth_alpha']:g}")
    for trial in reconstruction_trials(report.to_dict()):
        lines.append(f"{trial.label} of {len(trial.layers)} layer(s) in {trial.seconds:.1f} s: "
                     f"{fmt_dict(trial.before)} -> {fmt_dict(trial.after)}, {trial.outcome}")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    from sq_pt2e.bench import VARIANTS
    from sq_pt2e.plan import TARGETS

    parser = argparse.ArgumentParser(
        prog="sq-pt2e",
        description="StableQuant int8 quantization of wav2vec2 / HuBERT speech models with PyTorch PT2E.",
        epilog="Run `sq-pt2e VERB --help` for the options of a verb.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    bench = verbs.add_parser(
        "bench", help="time float vs int8 variants (inductor, ExecuTorch) of full-size models",
        description="Median latency of float and int8 variants, each built and timed in a fresh process, in "
                    "rounds with the variant order rotated; the spread of the round medians says whether a ratio "
                    "is trustworthy. Also sizes, build time and peak memory. Architecture names get random "
                    "weights: latency does not depend on them.",
    )
    bench.add_argument("--models", nargs="+", default=["wav2vec2-base"],
                       help="architecture names (random weights), reference models or checkpoint folders")
    bench.add_argument("--seconds", nargs="+", type=float, default=[10.0], help="audio lengths (a sweep if several)")
    bench.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="intra-op thread counts")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--runs", type=int, default=10,
                       help="timed runs per variant and round (after 2 warm-up runs; median over all rounds)")
    bench.add_argument("--rounds", type=int, default=3,
                       help="passes over the variants, order rotated per pass, a fresh process per cell (default 3)")
    bench.add_argument("--in-process", action="store_true",
                       help="build and time every variant in this process (debugging; numbers can interfere)")
    bench.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--plan", type=Path, default=None,
                       help="time the StableQuant variants with this plan (one model only; default: the graph a "
                            "W8A8 search produces, with max ranges), e.g. to see what a float fallback costs")
    bench.add_argument("--gemm-ceiling", action="store_true",
                       help="also time one feed-forward block in fp32 and int8 (inductor, XNNPACK) at the model's "
                            "shapes: how much faster int8 GEMMs are than fp32 on this CPU, the most int8 can gain")
    bench.add_argument("--output-dir", type=Path, default=None, help="write bench.json, bench.md and a plot here")
    bench.set_defaults(run=_cmd_bench)

    profile = verbs.add_parser(
        "profile", help="where one benchmark variant spends its time: profiler self time by kernel kind",
        description="Build one variant as `sq-pt2e bench` does, run it under torch.profiler with inductor's "
                    "kernel names on, and group the self CPU time: int8 oneDNN kernels, float GEMMs and convs, "
                    "float attention, inductor's fused kernels, framework overhead. The float kinds of an int8 "
                    "variant are its float islands.",
    )
    profile.add_argument("--model", default="wav2vec2-base", help="architecture name (random weights)")
    profile.add_argument("--variant", default="stablequant-int8-inductor", choices=list(VARIANTS))
    profile.add_argument("--seconds", type=float, default=10.0)
    profile.add_argument("--threads", type=int, default=2)
    profile.add_argument("--batch", type=int, default=1, help="clips per call")
    profile.add_argument("--runs", type=int, default=3, help="profiled calls (after one warm-up call)")
    profile.add_argument("--top", type=int, default=12, help="kernels listed")
    profile.add_argument("--seed", type=int, default=0)
    profile.add_argument("--output", type=Path, default=None, help="also write the tables to this Markdown file")
    profile.set_defaults(run=_cmd_profile)

    quantize = verbs.add_parser(
        "quantize", help="search a StableQuant plan for a model (writes plan.json and the search report)",
        description="Calibrate once, find the layer groups sensitive to quantization, clip their activation "
                    "outliers at the best percentile, give every other layer its MSE-optimal range. The plan "
                    "is JSON: inspect it, edit it, apply it with StableQuantQuantizer(QuantPlan.load(...)).",
    )
    _add_model_argument(quantize)
    add_search_arguments(quantize)
    quantize.add_argument("--program-seconds", type=float, default=10.0,
                          help="input length of the saved int8 program model_int8.pt2 (torch.export; x86/inductor "
                               "target; 0: do not write it)")
    quantize.add_argument("--int8-attention", action="store_true",
                          help="also quantize the attention matmuls (plan attention='int8'): inductor runs them as "
                               "int8 GEMMs or torchao's fused int8 attention kernel (AMX-INT8 CPUs); its q/k/v "
                               "scales are fixed in the plan from the calibration audio; on CPUs without VNNI k "
                               "and v take 7-bit grids when the plan is used")
    _add_threads_argument(quantize)
    quantize.add_argument("--output-dir", type=Path, required=True)
    quantize.set_defaults(run=_cmd_quantize)

    report = verbs.add_parser(
        "report", help="plan (+ search, accuracy, bench results) -> report.md with per-layer table and plots",
        description="Markdown report of a plan: per-layer bits, calibration, range, clip ratio, share clipped, "
                    "activation SQNR and sensitivity; plots of sensitivity, activation histograms with the chosen "
                    "range, WER against bit width and latency against audio length. search_report.json and "
                    "statistics.npz beside the plan are used when present.",
    )
    report.add_argument("--plan", type=Path, required=True, help="plan.json (from `sq-pt2e quantize` or hand-edited)")
    report.add_argument("--search-report", type=Path, default=None,
                        help="search_report.json (default: beside the plan)")
    report.add_argument("--statistics", type=Path, default=None, help="statistics.npz (default: beside the plan)")
    report.add_argument("--accuracy", type=Path, default=None, help="accuracy.json from `sq-pt2e accuracy`")
    report.add_argument("--bench", type=Path, default=None, help="bench.json from `sq-pt2e bench`")
    report.add_argument("--output-dir", type=Path, default=None, help="default: the plan's folder")
    report.set_defaults(run=_cmd_report)

    accuracy = verbs.add_parser(
        "accuracy", help="WER of every method at every bit width (the accuracy table)",
        description="Rows: float32, uniform max / percentile / MSE / entropy, CNN0-2 float, stock quantizers, "
                    "StableQuant (searched on --dev). Columns: bit widths. Cells: WER, difference to float with a "
                    "paired bootstrap 95%% interval, agreement with the float transcripts.",
    )
    _add_model_argument(accuracy)
    accuracy.add_argument("--calibration", default=None, help="calibration audio (default: shipped LibriSpeech)")
    accuracy.add_argument("--dev", required=True, help="folder or manifest (with transcripts) for the search")
    accuracy.add_argument("--eval", nargs="+", required=True, metavar="NAME=SOURCE",
                          help="evaluation sets with transcripts, e.g. synthetic=corpus/test.tsv")
    accuracy.add_argument("--bits", nargs="+", default=["W8A8", "W6A6", "W4A8", "W4A4"])
    accuracy.add_argument("--methods", nargs="+",
                          default=["max", "percentile-99.99", "mse", "entropy", "cnn0-2-float", "x86-inductor-default",
                                   "xnnpack-default", "dynamic-int8", "stablequant-paper", "stablequant",
                                   "stablequant-mixed", "stablequant-fallback"])
    _add_sensitivity_arguments(accuracy)
    accuracy.add_argument("--max-calibration", type=int, default=32)
    accuracy.add_argument("--max-dev", type=int, default=100)
    accuracy.add_argument("--max-eval", type=int, default=None)
    accuracy.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                          help="skip: leave out (and list) unreadable files instead of stopping")
    accuracy.add_argument("--update", type=Path, default=None, metavar="ACCURACY_JSON",
                          help="an earlier accuracy.json of the same model and evaluation sets: keep its cells, "
                               "replacing those this run measures again (e.g. one method after a change), and "
                               "write the merged table back to its folder (unless --output-dir names another)")
    _add_threads_argument(accuracy)
    accuracy.add_argument("--output-dir", type=Path, default=None,
                          help="write accuracy.json and accuracy.md here (default: with --update, that file's folder; "
                               "else only print the table)")
    _add_decoder_arguments(accuracy, also="each evaluation set is also scored as 'NAME, LM ARPA', decoded from the "
                                          "same logits")
    accuracy.set_defaults(run=_cmd_accuracy)

    export = verbs.add_parser(
        "export", help="quantize with a plan and write an ExecuTorch .pte (XNNPACK) or an x86 AOTInductor package",
        description="Export at a fixed input length (a .pte only accepts that length) or, with --dynamic, any "
                    "length up to it; lower to XNNPACK with norms and attention rewritten into delegated ops; "
                    "check the .pte against eager int8. --format aoti compiles the int8 model ahead of time for "
                    "this x86 CPU and thread count instead (oneDNN int8 kernels, checked against eager int8), "
                    "into a .pt2 package that torch._inductor.aoti_load_package or the C++ "
                    "AOTIModelPackageLoader runs without compiling.",
    )
    _add_model_argument(export)
    export.add_argument("--plan", default=None, help="plan.json (default: W8A8, max calibration)")
    export.add_argument("--seconds", type=float, default=10.0, help="the program's input length (its maximum with "
                        "--dynamic)")
    export.add_argument("--dynamic", action="store_true",
                        help="accept every length up to --seconds (int8 CNN convs run as int8 GEMMs over windows)")
    export.add_argument("--calibration", default=None, help="calibration audio (default: shipped LibriSpeech)")
    export.add_argument("--max-calibration", type=int, default=16)
    export.add_argument("--threads", type=int, default=2)
    export.add_argument("--format", choices=["pte", "aoti"], default="pte",
                        help="pte: ExecuTorch/XNNPACK program (phones, any CPU); aoti: AOTInductor .pt2 package for "
                             "this x86 CPU and --threads (default pte)")
    export.add_argument("--output", type=Path, required=True, help="the .pte / .pt2 to write (atomically)")
    export.set_defaults(run=_cmd_export)

    transcribe = verbs.add_parser(
        "transcribe", help="audio files -> text, float or int8 (with --plan; simulated int8, exact to convert_pt2e)",
    )
    _add_model_argument(transcribe)
    transcribe.add_argument("audio", nargs="+", help="audio files (any rate / channels; resampled to 16 kHz mono)")
    transcribe.add_argument("--plan", default=None, help="plan.json: transcribe with the int8 model")
    transcribe.add_argument("--json", action="store_true", help="print JSON")
    transcribe.add_argument("--calibration", default=None,
                            help="calibration audio for plans without fixed ranges (default: shipped LibriSpeech)")
    transcribe.add_argument("--chunk-seconds", type=float, default=30.0,
                            help="long files are transcribed in chunks of this length (bounded memory)")
    transcribe.add_argument("--overlap-seconds", type=float, default=None,
                            help="context each chunk window takes from its neighbours (default: a quarter of a "
                                 "chunk, at most 1 s; with --backend inductor: 1 s)")
    transcribe.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                            help="skip: report a bad file, go on with the others, exit 1 at the end")
    transcribe.add_argument("--checkpoint", type=Path, default=None,
                            help="JSONL of finished files; a rerun with it skips them (resumable)")
    transcribe.add_argument("--backend", choices=["simulate", "inductor"], default="simulate",
                            help="simulate: eager int8 arithmetic (exact to convert_pt2e); inductor: compiled int8, "
                                 "one compile per length bucket (padding masked)")
    transcribe.add_argument("--buckets", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0, 30.0],
                            help="with --backend inductor: bucket lengths in seconds (longer audio is chunked)")
    transcribe.add_argument("--threads", type=int, default=None, help="with --backend inductor: compile threads")
    transcribe.add_argument("--cache-dir", type=Path, default=None,
                            help="with --backend inductor: folder of the compiled buckets (AOTInductor packages, "
                                 "loaded by later runs instead of compiling; default ~/.cache/sq-pt2e/inductor)")
    transcribe.add_argument("--cache-max-gb", type=float, default=4.0,
                            help="with --backend inductor: delete the least recently used compiled buckets beyond "
                                 "this size (default 4)")
    _add_decoder_arguments(transcribe)
    transcribe.set_defaults(run=_cmd_transcribe)

    evaluate = verbs.add_parser(
        "eval", help="WER / CER of the float model (and of its int8 model with --plan) on evaluation sets",
    )
    _add_model_argument(evaluate)
    evaluate.add_argument("--eval", nargs="+", default=["synthetic-test", "test-other", "test-clean"],
                          metavar="NAME[=SOURCE]", help="shipped set names or NAME=FOLDER_OR_MANIFEST")
    evaluate.add_argument("--plan", default=None, help="plan.json: also evaluate the int8 model")
    evaluate.add_argument("--target", choices=TARGETS, default=TARGETS[0],
                          help="the int8 arithmetic to evaluate: inductor's, or an ExecuTorch .pte's (XNNPACK: "
                               "every int8 layer's output rounded to int8 too, grids observed on --calibration)")
    evaluate.add_argument("--calibration", default=None,
                          help="calibration audio for plans without fixed ranges (and --target xnnpack)")
    evaluate.add_argument("--max-eval", type=int, default=None)
    evaluate.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                          help="skip: leave out (and list) unreadable files instead of stopping")
    _add_decoder_arguments(evaluate)
    _add_threads_argument(evaluate)
    evaluate.add_argument("--output-dir", type=Path, default=None,
                          help="write eval.json here: WER / CER per set and every utterance's transcripts")
    evaluate.set_defaults(run=_cmd_eval)

    from sq_pt2e.distributed.cli import add_cli_verbs

    add_cli_verbs(verbs)  # quantize-distributed, transcribe-batch (Ray or a process pool)
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
