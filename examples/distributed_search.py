"""Run the StableQuant search in one process, on a process pool and on Ray; time them, compare plans.

Each backend runs the same search (same calibration, dev set and config); the plans
must be identical byte for byte. Printed per backend: wall time of calibration and
search, candidates simulated, tasks, and the cost of one (candidate x shard) task.

    python examples/distributed_search.py                       # shipped ref-hubert, 4 dev utterances
    python examples/distributed_search.py --max-dev 16 --workers 2 --output-dir out/dist
    python examples/distributed_search.py --backends ray --ray-address auto   # on a cluster
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sq_pt2e import assets
from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.distributed import DistributedEvaluator, collect_statistics_distributed, make_runner, shippable_model
from sq_pt2e.inputs import load_source
from sq_pt2e.models import load_model
from sq_pt2e.stablequant import (
    DEFAULT_PERCENTILES,
    Evaluator,
    SearchConfig,
    search_input_scales,
    search_plan,
    search_statistics,
)


def _default_model() -> str:
    folder = assets.reference_model("ref-hubert")
    return str(folder) if folder is not None else "tiny-hubert"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=_default_model(), help="checkpoint folder or architecture name")
    parser.add_argument("--dev", default=None, help="dev manifest (default: shipped synthetic dev set)")
    parser.add_argument("--max-dev", type=int, default=4)
    parser.add_argument("--max-calibration", type=int, default=4)
    parser.add_argument("--criterion", choices=["wer", "kl"], default="wer")
    parser.add_argument("--percentiles", type=float, nargs="+", default=list(DEFAULT_PERCENTILES))
    parser.add_argument("--backends", nargs="+", choices=["serial", "process", "ray"], default=["serial", "process"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=None, help="dev shards (default: one per worker)")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--output-dir", type=Path, default=None, help="write timings.json and one plan per backend")
    parser.add_argument("--task-cost", default=None, metavar="ARCH",
                        help="instead: time one task (float and all-layers-quantized) of architecture ARCH "
                             "(random weights, e.g. hubert-large) on --task-seconds of audio")
    parser.add_argument("--task-seconds", type=float, default=10.0)
    return parser.parse_args(argv)


def _task_cost(arch: str, seconds: float) -> dict[str, float]:
    """Seconds of one task's parts: shipping (pickle round trip), float pass, quantized pass, setup."""
    import pickle

    from sq_pt2e.models import build_model
    from sq_pt2e.simulate import LayerQuant, quantizable_modules
    from sq_pt2e.stablequant import float_log_probs, score_utterances

    model = shippable_model(build_model(arch))
    wave = torch.randn(1, int(seconds * 16000), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model = pickle.loads(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))
    shipped = time.perf_counter()
    log_probs = float_log_probs(model, [wave])
    floated = time.perf_counter()
    candidate = {m.name: LayerQuant(4.0, 8, 8) for m in quantizable_modules(model)}
    score_utterances(model, [wave], log_probs, None, str, candidate)
    quantized = time.perf_counter()
    score_utterances(model, [], [], None, str, candidate)  # no audio: the per-task setup alone
    setup = time.perf_counter()
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "audio_s": seconds,
            "unpickle_s": shipped - start, "float_pass_s": floated - shipped, "quantized_task_s": quantized - floated,
            "setup_s": setup - quantized}


def _run(backend: str, args: argparse.Namespace, calibration: list, dev: list) -> dict[str, object]:
    model = load_model(args.model)
    config = SearchConfig(criterion=args.criterion, percentiles=tuple(args.percentiles))
    references = [u.text for u in dev] if args.criterion == "wer" else None
    waves = [u.wave for u in dev]
    start = time.perf_counter()
    if backend == "serial":
        statistics, input_scales = search_statistics(model, [u.wave for u in calibration], config)
        calibrated = time.perf_counter()
        evaluator: Evaluator = Evaluator(model, waves, references)
        shards, describe = 1, "one process, 1 thread"
        plan, report = search_plan(model, statistics, evaluator, config, model_name=args.model, progress_bar=False,
                                   input_scales=input_scales, calibration=[u.wave for u in calibration])
    else:
        with make_runner(backend, address=args.ray_address, workers=args.workers, threads=1) as runner:
            input_scales = search_input_scales(model, [u.wave for u in calibration], config)
            statistics = collect_statistics_distributed(model, [u.wave for u in calibration], runner,
                                                        input_scales=input_scales)
            calibrated = time.perf_counter()
            evaluator = DistributedEvaluator(model, waves, references, runner=runner, shards=args.shards)
            shards, describe = len(evaluator.bounds), runner.describe()
            plan, report = search_plan(model, statistics, evaluator, config, model_name=args.model,
                                       progress_bar=False, input_scales=input_scales,
                                       calibration=[u.wave for u in calibration])
    total = time.perf_counter() - start
    search = total - (calibrated - start)
    return {
        "backend": backend, "runner": describe, "plan": plan.to_json(), "calibration_s": calibrated - start,
        "search_s": search, "total_s": total, "candidates": report.evaluations, "shards": shards,
        "tasks": (report.evaluations + 1) * shards,  # + the float reference
        "sensitive_groups": report.sensitive_groups, "chosen_percentiles": report.chosen_percentiles,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)  # the single-process run uses one thread, as every worker does
    if args.task_cost is not None:
        cost = _task_cost(args.task_cost, args.task_seconds)
        print(json.dumps(cost, indent=2))
        if args.output_dir is not None:
            atomic_write_text(args.output_dir / "task_cost.json", json.dumps(cost, indent=2) + "\n")
        return 0
    calibration = load_source(None, limit=args.max_calibration)
    dev = load_source(args.dev, limit=args.max_dev, shipped="synthetic-dev")
    audio_s = sum(u.wave.shape[-1] for u in dev) / 16000
    print(f"model {args.model}; {len(calibration)} calibration and {len(dev)} dev utterances ({audio_s:.1f} s)")
    rows = []
    for backend in args.backends:
        row = _run(backend, args, calibration, dev)
        rows.append(row)
        per_candidate = row["search_s"] / (row["candidates"] + 1)
        print(f"{backend:8s} {row['runner']}: calibration {row['calibration_s']:.1f} s, search {row['search_s']:.1f} s "
              f"({row['candidates']} candidates + float, {row['tasks']} tasks; {per_candidate:.2f} s wall per "
              f"candidate, {per_candidate / (audio_s):.3f} s per dev second); sensitive {row['sensitive_groups']}")
    identical = len({r["plan"] for r in rows}) == 1
    print("plans identical byte for byte: " + ("yes" if identical else "NO"))
    if args.output_dir is not None:
        for row in rows:
            atomic_write_text(args.output_dir / f"plan_{row['backend']}.json", str(row["plan"]))
        summary = [{k: v for k, v in r.items() if k != "plan"} | {"dev_audio_s": audio_s} for r in rows]
        atomic_write_text(args.output_dir / "timings.json", json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.output_dir / 'timings.json'}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
