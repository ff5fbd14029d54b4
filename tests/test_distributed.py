"""Distributed search and batch transcription: the same plan on Ray, a process pool and one process;
exact histogram merges; resumable search and transcription; killed workers retried; failed files reported."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import gc
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sq_pt2e.data import Utterance, write_manifest
from sq_pt2e.distributed import (
    DistributedEvaluator,
    ProcessPoolRunner,
    RayRunner,
    SerialRunner,
    add_cli_verbs,
    collect_statistics_distributed,
    shard_bounds,
    transcribe_manifest,
)
from sq_pt2e.errors import SearchStateError, WorkerError
from sq_pt2e.models import build_model
from sq_pt2e.observers import AbsHistogram, AbsHistogramObserver
from sq_pt2e.observers import merge_histograms
from sq_pt2e.simulate import LayerQuant, collect_statistics
from sq_pt2e.stablequant import Candidate, Evaluator, Score, SearchConfig, candidate_key, search_plan

TESTS = Path(__file__).resolve().parent
PLANTED = "wav2vec2.feature_extractor.conv_layers.1.conv"
# A short grid: fast tests.
KL = SearchConfig(criterion="kl", percentiles=(100.0, 99.9, 99.0), smooth_alpha=0.0, refit_ops=())


def _waves(seed: int, count: int, samples: int = 16000) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, samples, generator=generator) for _ in range(count)]


def _dying_decode(marker: str, logits: torch.Tensor) -> str:
    """Greedy decoding, but the first call anywhere kills its process (a worker dying mid-task)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    from sq_pt2e.asr import ctc_greedy_decode

    return ctc_greedy_decode(logits)[0]


def _decode_failing_beyond(frames: int, logits: torch.Tensor) -> str:
    """Greedy decoding that breaks on logits longer than ``frames``."""
    if logits.shape[-2] > frames:
        raise RuntimeError("decoder broke")
    return "A"


@pytest.fixture(scope="module")
def planted_model() -> torch.nn.Module:
    """tiny-wav2vec2 with rare huge spikes at conv_layers.1's input (as in test_stablequant)."""
    torch.set_num_threads(1)  # workers run one thread: the same float arithmetic
    model = build_model("tiny-wav2vec2", seed=0)
    layers = model.wav2vec2.feature_extractor.conv_layers
    with torch.no_grad():
        layers[0].layer_norm.weight[5] = 50.0
        layers[0].layer_norm.bias[5] = -100.0
        layers[1].conv.weight[:, 5, :] = 0.0
    return model


@pytest.fixture(scope="module")
def statistics(planted_model: torch.nn.Module) -> dict[str, AbsHistogram]:
    return collect_statistics(planted_model, _waves(1, 4))


@pytest.fixture(scope="module")
def reference(planted_model: torch.nn.Module, statistics: dict[str, AbsHistogram]):
    """The single-process plan and report."""
    return search_plan(planted_model, statistics, Evaluator(planted_model, _waves(2, 3)), KL, model_name="t")


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolRunner]:
    with ProcessPoolRunner(2, threads=1, retries=2) as runner:
        yield runner


@pytest.fixture(scope="module")
def ray_runner() -> Iterator[RayRunner]:
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'sq-pt2e[ray]'")
    runner = RayRunner(workers=2, threads=1, retries=2,
                       runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})  # workers import this module
    yield runner
    runner.close()


def _runner(request: pytest.FixtureRequest, name: str):
    return request.getfixturevalue({"ray": "ray_runner", "process": "pool"}[name])


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_distributed_search_gives_the_single_process_plan_byte_for_byte(
        request: pytest.FixtureRequest, backend: str, planted_model, statistics, reference) -> None:
    runner = _runner(request, backend)
    evaluator = DistributedEvaluator(planted_model, _waves(2, 3), runner=runner, shards=2)
    plan, report = search_plan(planted_model, statistics, evaluator, KL, model_name="t")
    assert report.sensitive_groups == [PLANTED]  # the search did real work
    assert plan.to_json() == reference[0].to_json()
    assert report.sensitivity == reference[1].sensitivity
    assert report.final_score == reference[1].final_score


def test_distributed_search_for_xnnpack_gives_the_single_process_plan(pool: ProcessPoolRunner, planted_model,
                                                                     statistics) -> None:
    """Candidates carry their output grids to the workers (``SearchConfig.target="xnnpack"``)."""
    config, calibration = dataclasses.replace(KL, target="xnnpack"), _waves(1, 4)
    single = search_plan(planted_model, statistics, Evaluator(planted_model, _waves(2, 3)), config,
                         calibration=calibration)
    evaluator = DistributedEvaluator(planted_model, _waves(2, 3), runner=pool, shards=2)
    plan, report = search_plan(planted_model, statistics, evaluator, config, calibration=calibration)
    assert plan.scored_for == "xnnpack" and plan.to_json() == single[0].to_json()
    assert report.final_score == single[1].final_score


def test_scores_do_not_depend_on_the_sharding(planted_model, statistics) -> None:
    candidate = {PLANTED: LayerQuant(statistics[PLANTED].max_abs, 8, 8)}
    single = Evaluator(planted_model, _waves(2, 3))
    for shards in (1, 2, 3):
        sharded = DistributedEvaluator(planted_model, _waves(2, 3), runner=SerialRunner(threads=1), shards=shards)
        assert len(sharded.bounds) == shards
        assert sharded.float_score == single.float_score
        assert sharded(candidate) == single(candidate)


def test_workers_replay_stages_per_shard_with_the_same_scores(planted_model, statistics) -> None:
    from sq_pt2e.distributed import search as distributed_search

    full = {name: LayerQuant(hist.max_abs, 8, 8) for name, hist in statistics.items()}
    late = list(full)[-1]  # candidates differing only in the head share every stage before it
    candidates = [full] + [{**full, late: LayerQuant(full[late].act_range / k, 8, 8)} for k in (2, 4)]
    recomputing = Evaluator(planted_model, _waves(2, 3))
    recomputing.stage_cache = None
    sharded = DistributedEvaluator(planted_model, _waves(2, 3), runner=SerialRunner(threads=1), shards=2)
    assert sharded.stage_cache is None  # the driver runs no candidate
    assert sharded.score_many(candidates) == recomputing.score_many(candidates)
    caches = [distributed_search._SHARD_STAGE_CACHES[sharded._shard_key(s)] for s in range(2)]
    assert all(cache.replayed > 0 for cache in caches)
    # Another evaluator's shards take the worker's room; an evaluator's caches in this process go with it.
    other = DistributedEvaluator(planted_model, _waves(2, 3), runner=SerialRunner(threads=1), shards=1)
    assert list(distributed_search._SHARD_STAGE_CACHES) == [other._shard_key(0)]
    del other
    gc.collect()
    assert not distributed_search._SHARD_STAGE_CACHES


def test_shard_bounds_cover_every_item_in_order_by_length() -> None:
    assert shard_bounds([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert shard_bounds([30, 10, 10, 10], 2) == [(0, 1), (1, 4)]
    assert shard_bounds([5, 5], 4) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="shards"):
        shard_bounds([1], 0)


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_calibration_shards_merge_into_the_single_pass_histograms(
        request: pytest.FixtureRequest, backend: str, planted_model, statistics) -> None:
    merged = collect_statistics_distributed(planted_model, _waves(1, 4), _runner(request, backend), shards=3)
    assert list(merged) == list(statistics)
    for name, hist in statistics.items():
        np.testing.assert_array_equal(merged[name].counts, hist.counts)
        assert (merged[name].upper, merged[name].max_abs) == (hist.upper, hist.max_abs)


def test_merge_histograms_rebins_finer_grids_exactly() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(1000) * scale for scale in (0.01, 1.0, 30.0)] + [np.zeros(5)]
    whole = AbsHistogramObserver(bins=64)
    observers = []
    for part in parts:
        whole(torch.from_numpy(part))
        observers.append(AbsHistogramObserver(bins=64))
        observers[-1](torch.from_numpy(part))
    merged = merge_histograms([o.histogram() for o in observers])
    expected = whole.histogram()
    np.testing.assert_array_equal(merged.counts, expected.counts)
    assert (merged.upper, merged.max_abs) == (expected.upper, expected.max_abs)
    with pytest.raises(ValueError, match="bin counts"):
        merge_histograms([AbsHistogram(np.ones(4), 1.0, 1.0), AbsHistogram(np.ones(8), 1.0, 1.0)])


class _Interrupted(Evaluator):
    """Stops (like Ctrl-C) after ``budget`` simulated candidates."""

    budget = 4

    def _score_uncached(self, candidates: Sequence[Candidate]) -> Iterator[tuple[int, Score]]:
        for item in super()._score_uncached(candidates):
            if self.evaluations >= self.budget:
                raise KeyboardInterrupt
            yield item


def test_interrupted_search_resumes_from_the_score_cache_with_the_same_plan(
        tmp_path: Path, planted_model, statistics, reference) -> None:
    cache = tmp_path / "scores.json"
    with pytest.raises(KeyboardInterrupt):
        search_plan(planted_model, statistics, _Interrupted(planted_model, _waves(2, 3), cache=cache), KL)
    assert len(json.loads(cache.read_text())["scores"]) == _Interrupted.budget
    plan, report = search_plan(planted_model, statistics, Evaluator(planted_model, _waves(2, 3), cache=cache), KL,
                               model_name="t")
    assert report.cached_evaluations == _Interrupted.budget
    assert report.evaluations == reference[1].evaluations - _Interrupted.budget
    assert plan.to_json() == reference[0].to_json()
    again, rerun = search_plan(planted_model, statistics, Evaluator(planted_model, _waves(2, 3), cache=cache), KL,
                               model_name="t")
    assert rerun.evaluations == 0 and again.to_json() == reference[0].to_json()


def test_score_cache_of_another_dev_set_is_refused(tmp_path: Path, planted_model, statistics) -> None:
    cache = tmp_path / "scores.json"
    Evaluator(planted_model, _waves(2, 1), cache=cache)({PLANTED: LayerQuant(1.0, 8, 8)})
    with pytest.raises(SearchStateError, match="another model, dev set"):
        Evaluator(planted_model, _waves(5, 1), cache=cache)
    cache.write_text("{not json")
    with pytest.raises(SearchStateError, match="unreadable"):
        Evaluator(planted_model, _waves(2, 1), cache=cache)


def test_candidate_key_is_stable_and_exact() -> None:
    a = {"x": LayerQuant(1.5, 8, 8), "y": LayerQuant(0.25, 8, 7)}
    assert candidate_key(a) == candidate_key(dict(reversed(list(a.items()))))
    assert candidate_key(a) == "aa5efc2ecf2666395455b7829a09d9ce0ce28df137904ad3ff43f1d9425082fb"  # across runs
    nudged = {**a, "x": LayerQuant(float(np.nextafter(1.5, 2.0)), 8, 8)}
    assert candidate_key(nudged) != candidate_key(a)
    assert candidate_key({**a, "y": LayerQuant(0.25, 8, 8)}) != candidate_key(a)


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_worker_killed_mid_task_is_retried(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                                           planted_model) -> None:
    runner = _runner(request, backend)
    restarts = getattr(runner, "restarts", 0)
    references = ["HELLO", "WORLD THERE"]
    decode = functools.partial(_dying_decode, str(tmp_path / "died"))
    evaluator = DistributedEvaluator(planted_model, _waves(2, 2), references, decode, runner=runner, shards=2)
    assert (tmp_path / "died").exists()  # a worker really died
    if isinstance(runner, ProcessPoolRunner):
        assert runner.restarts == restarts + 1
    single = Evaluator(planted_model, _waves(2, 2), references)
    candidate = {PLANTED: LayerQuant(3.0, 8, 8)}
    assert evaluator.float_score == single.float_score and evaluator(candidate) == single(candidate)


def test_failing_task_is_an_error_naming_the_shard(pool: ProcessPoolRunner, planted_model) -> None:
    short, long = _waves(2, 1)[0], torch.randn(1, 24000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        short_frames = planted_model(short).logits.shape[1]
    decode = functools.partial(_decode_failing_beyond, short_frames)  # only the long utterance's shard fails
    with pytest.raises(WorkerError, match=r"dev shard \(0, 1\) failed \(error\): RuntimeError: decoder broke"):
        DistributedEvaluator(planted_model, [long, short], ["A", "B"], decode, runner=pool, shards=2)


def _manifest(folder: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(0)
    utterances = []
    for i in range(count):
        path = folder / f"utt{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal(4000 + 1500 * i)).astype(np.float32), 16000)
        utterances.append(Utterance(path.stem, path))
    broken = folder / "broken.wav"
    broken.write_bytes(b"RIFF not really audio")
    utterances.insert(2, Utterance("broken", broken))
    return write_manifest(folder / "manifest.tsv", utterances)


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("backend", "int8"), [("process", True), ("ray", False)])  # one int8 build per worker
def test_batch_transcription_is_ordered_resumable_and_reports_failed_files(
        request: pytest.FixtureRequest, backend: str, int8: bool, tmp_path: Path, planted_model, reference) -> None:
    from sq_pt2e.data import read_manifest

    utterances = read_manifest(_manifest(tmp_path))
    out = tmp_path / "out" / "transcripts.jsonl"
    runner = _runner(request, backend)
    plan = reference[0] if int8 else None
    kwargs = {"window_seconds": 0.25, "engine": "eager", "block": 2}
    summary = transcribe_manifest(planted_model, plan, utterances, out, runner, **kwargs)
    rows = _rows(out)
    assert [r["id"] for r in rows] == [u.id for u in utterances]
    assert (summary.transcribed, summary.skipped, list(summary.failed)) == (4, 0, [str(utterances[2].path)])
    assert "error" in rows[2] and all("text" in r for i, r in enumerate(rows) if i != 2)
    serial = transcribe_manifest(planted_model, plan, utterances, tmp_path / "serial.jsonl",
                                 SerialRunner(threads=1), **kwargs)
    assert serial.transcribed == 4 and _rows(tmp_path / "serial.jsonl") == rows  # same texts as one process
    # Interrupted run: the last finished row is lost and the file ends mid-line.
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + '{"id": "utt3", "pa')
    resumed = transcribe_manifest(planted_model, plan, utterances, out, runner, **kwargs)
    assert (resumed.skipped, resumed.transcribed, len(resumed.failed)) == (2, 2, 1)
    assert _rows(out) == rows  # ordered again, one row per file


def test_cli_verbs_run_the_distributed_search_and_batch_transcription(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="sq-pt2e")
    add_cli_verbs(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["quantize-distributed", "--model", "tiny-wav2vec2", "--max-calibration", "3",
                              "--criterion", "kl", "--percentiles", "100", "99.9", "--backend", "serial",
                              "--no-progress", "--output-dir", str(tmp_path / "q")])
    assert args.run(args) == 0
    plan_text = (tmp_path / "q" / "plan.json").read_text()
    assert json.loads((tmp_path / "q" / "scores.json").read_text())["scores"]
    assert args.run(args) == 0 and (tmp_path / "q" / "plan.json").read_text() == plan_text  # resumed, same plan
    manifest = _manifest(tmp_path, count=2)
    args = parser.parse_args(["transcribe-batch", str(manifest), "--model", "tiny-wav2vec2", "--plan",
                              str(tmp_path / "q" / "plan.json"), "--engine", "eager", "--window-seconds", "0.25",
                              "--backend", "serial", "--output", str(tmp_path / "t.jsonl")])
    assert args.run(args) == 1  # the broken file failed and is reported
    assert [("text" in r) for r in _rows(tmp_path / "t.jsonl")] == [True, True, False]
    with pytest.raises(SystemExit):
        parser.parse_args(["transcribe-batch", str(manifest), "--model", "m", "--output", "o", "--backend", "x"])


def test_no_module_imports_ray_at_import_time() -> None:
    """Ray is optional: only function bodies may import it (``import sq_pt2e`` must work without it)."""
    package = TESTS.parent / "sq_pt2e"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "ray"]
    assert offenders == []
    assert "import ray" in (package / "distributed" / "runners.py").read_text()  # the check reads the right files


@pytest.mark.slow
def test_batch_transcription_with_inductor_compiles_once_per_worker(tmp_path: Path, planted_model, reference) -> None:
    from sq_pt2e.data import read_manifest
    from sq_pt2e.distributed.runners import WORKER_CACHE

    utterances = read_manifest(_manifest(tmp_path, count=2))
    before = {k for k in WORKER_CACHE if k.startswith("forward:")}
    summary = transcribe_manifest(planted_model, reference[0], utterances, tmp_path / "t.jsonl",
                                  SerialRunner(threads=1), window_seconds=0.25, engine="inductor")
    assert summary.transcribed == 2 and len(summary.failed) == 1
    built = {k for k in WORKER_CACHE if k.startswith("forward:")} - before
    assert len(built) == 1  # one compiled model served every file
    eager = transcribe_manifest(planted_model, reference[0], utterances, tmp_path / "e.jsonl",
                                SerialRunner(threads=1), window_seconds=0.25, engine="eager")
    assert eager.transcribed == 2
