"""``sq-pt2e quantize-distributed`` and ``sq-pt2e transcribe-batch``: registered by :func:`add_cli_verbs`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.distributed.runners import Runner, make_runner
from sq_pt2e.distributed.search import DistributedEvaluator, collect_statistics_distributed
from sq_pt2e.distributed.transcription import transcribe_manifest

__all__ = ["add_cli_verbs"]


def _add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["auto", "ray", "process", "serial"], default="auto",
                        help="where tasks run: Ray, a local process pool, or this process "
                             "(default: Ray if installed, else a process pool)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster address ('auto' or ray://HOST:10001; default: a local Ray instance)")
    parser.add_argument("--workers", type=int, default=None, help="parallel tasks (default: one per CPU)")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="torch threads of each task (default 1)")
    parser.add_argument("--retries", type=int, default=3, help="re-runs of a task whose worker died")


def _runner_from(args: argparse.Namespace) -> Runner:
    try:
        return make_runner(args.backend, address=args.ray_address, workers=args.workers,
                           threads=args.threads_per_worker, retries=args.retries)
    except ImportError as exc:  # --backend ray without Ray: a failed run with the fix in the message
        raise ValueError(str(exc)) from exc


def _cmd_quantize_distributed(args: argparse.Namespace) -> int:
    from sq_pt2e.cli import search_inputs
    from sq_pt2e.stablequant import run_search

    model, sets, config = search_inputs(args)
    calibration, dev, references = sets.calibration, sets.dev, sets.references
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    with _runner_from(args) as runner:
        say(f"running on {runner.describe()}: calibrating on {len(calibration)}, searching on {len(dev)} ...")
        waves = [u.wave for u in calibration]
        cache = args.score_cache or args.output_dir / "scores.json"
        evaluator = DistributedEvaluator(model, [u.wave for u in dev], references,
                                         runner=runner, shards=args.shards, cache=cache)
        bar = False if args.no_progress else None
        plan, report, _ = run_search(
            model, waves, evaluator, config, model_name=args.model, progress=say, progress_bar=bar,
            collect=lambda m, w, scales: collect_statistics_distributed(m, w, runner, input_scales=scales))
    plan.save(args.output_dir / "plan.json")
    atomic_write_text(args.output_dir / "search_report.json",
                      json.dumps({**report.to_dict(), "runner": runner.describe()}, indent=2, default=float) + "\n")
    print(f"sensitive groups: {report.sensitive_groups or 'none'}; clip percentiles: {report.chosen_percentiles}")
    print(f"search: {report.evaluations} candidates simulated, {report.cached_evaluations} from {cache}, "
          f"{report.seconds:.1f} s on {runner.describe()}")
    print(f"wrote {args.output_dir / 'plan.json'}, {args.output_dir / 'search_report.json'}")
    return 0


def _cmd_transcribe_batch(args: argparse.Namespace) -> int:
    from sq_pt2e.data import read_manifest
    from sq_pt2e.inputs import load_source
    from sq_pt2e.models import load_model
    from sq_pt2e.cli import load_plan_for_model

    model = load_model(args.model, seed=args.seed)
    plan = load_plan_for_model(args.plan, args.model)
    needs_calibration = plan is not None and plan.needs_calibration()
    calibration = [u.wave for u in load_source(args.calibration, limit=8)] if needs_calibration else []
    utterances = read_manifest(args.manifest)
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    with _runner_from(args) as runner:
        summary = transcribe_manifest(model, plan, utterances, args.output, runner,
                                      window_seconds=args.window_seconds, engine=args.engine,
                                      calibration=calibration, block=args.block, progress=say)
    print(f"{summary.transcribed} transcribed, {summary.skipped} already done, {len(summary.failed)} failed "
          f"of {summary.total} in {summary.seconds:.1f} s on {summary.runner}; wrote {summary.output}")
    for path, error in summary.failed.items():
        print(f"failed: {path}: {error}", file=sys.stderr)
    return 1 if summary.failed else 0


def add_cli_verbs(verbs: argparse._SubParsersAction) -> None:
    """Register ``quantize-distributed`` and ``transcribe-batch`` on the ``sq-pt2e`` parser.

    Each verb sets ``run=`` to a function taking the parsed namespace and returning
    the exit code (0 done, 1 the work failed, 2 usage error through argparse).
    """
    from sq_pt2e.cli import add_search_arguments

    quantize = verbs.add_parser(
        "quantize-distributed", help="the StableQuant search as parallel tasks (Ray or a process pool), resumable",
        description="Same search and plan as `quantize`, with calibration shards and (candidate x dev shard) "
                    "evaluations run as tasks. Scores are stored in --score-cache as they arrive, so a rerun "
                    "after an interruption skips what was scored and writes the same plan byte for byte.",
    )
    quantize.add_argument("--model", required=True, help="an architecture name or a checkpoint folder")
    quantize.add_argument("--seed", type=int, default=0)
    add_search_arguments(quantize)
    quantize.add_argument("--shards", type=int, default=None, help="dev shards (default: one per worker)")
    quantize.add_argument("--score-cache", type=Path, default=None, help="default: OUTPUT_DIR/scores.json")
    quantize.add_argument("--no-progress", action="store_true", help="no progress bars")
    quantize.add_argument("--output-dir", type=Path, required=True)
    _add_runner_arguments(quantize)
    quantize.set_defaults(run=_cmd_quantize_distributed)

    batch = verbs.add_parser(
        "transcribe-batch", help="transcribe a manifest with the int8 model on many workers (resumable)",
        description="Each worker compiles the int8 model once (inductor) and transcribes files read by path. "
                    "Rows go to --output (JSONL) in manifest order; a rerun skips finished files and retries "
                    "failed ones. Exit code 1 when any file failed (they are listed).",
    )
    batch.add_argument("manifest", help="a .tsv manifest (path<TAB>transcript or LibriSpeech layout)")
    batch.add_argument("--model", required=True, help="an architecture name or a checkpoint folder")
    batch.add_argument("--seed", type=int, default=0)
    batch.add_argument("--plan", default=None, help="plan.json (default: the float model)")
    batch.add_argument("--output", type=Path, required=True, help="the JSONL file to write (and resume)")
    batch.add_argument("--engine", choices=["inductor", "eager"], default="inductor")
    batch.add_argument("--window-seconds", type=float, default=10.0, help="model input length (default 10)")
    batch.add_argument("--block", type=int, default=64, help="files per block written together (default 64)")
    batch.add_argument("--calibration", default=None, help="calibration audio for plans without fixed ranges")
    _add_runner_arguments(batch)
    batch.set_defaults(run=_cmd_transcribe_batch)
