"""Scale out: the StableQuant search and batch transcription on Ray or a process pool.

The work is cut into independent tasks and run by a :class:`Runner`:

- :class:`RayRunner`: Ray tasks, on a local Ray instance (``ray.init()``) or on a
  cluster (``address="ray://head:10001"`` or ``"auto"``). Large inputs (the model,
  the dev shards) go into the object store once (:meth:`Runner.share`) and each
  worker process deserializes them once. A worker killed mid-task is retried by Ray
  (``retries``).
- :class:`ProcessPoolRunner`: a ``concurrent.futures`` process pool on this machine,
  no Ray needed. Shared inputs are pickled once to a temporary file that every worker
  reads once. When a worker dies, the pool is rebuilt and the tasks that were in
  flight are run again (up to ``retries`` times).
- :class:`SerialRunner`: the same tasks in this process (for debugging and tests).

On top of a runner:

- :class:`DistributedEvaluator` scores candidate plans as (candidate x dev shard)
  tasks and merges the per-utterance results in utterance order
  (:class:`~sq_pt2e.stablequant.UtteranceScores`), so every score, and hence the plan,
  is identical to the single-process :class:`~sq_pt2e.stablequant.Evaluator` (with
  the same intra-op thread count: float results can depend on it).
- :func:`collect_statistics_distributed` collects calibration histograms per shard and
  merges them exactly (:func:`~sq_pt2e.simulate.merge_statistics`).
- :func:`transcribe_manifest` transcribes a manifest with the int8 model compiled by
  inductor once per worker, writes results in manifest order to a JSONL file, skips
  files finished by an earlier run, and reports failed files without losing the rest.

Ray is an optional dependency (``pip install sq-pt2e[ray]``); it is imported only
inside the functions that use it, so ``import sq_pt2e`` never imports it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import itertools
import json
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sq_pt2e.atomic import atomic_write_bytes, atomic_write_text
from sq_pt2e.errors import WorkerError
from sq_pt2e.observers import AbsHistogram
from sq_pt2e.stablequant import (
    Candidate,
    Evaluator,
    Score,
    UtteranceScores,
    float_log_probs,
    score_utterances,
)

__all__ = [
    "DistributedEvaluator",
    "ProcessPoolRunner",
    "RayRunner",
    "Runner",
    "SerialRunner",
    "Shared",
    "TaskFailure",
    "TranscriptionSummary",
    "add_cli_verbs",
    "collect_statistics_distributed",
    "make_runner",
    "shard_bounds",
    "shippable_model",
    "transcribe_manifest",
]

RunnerKind = Literal["auto", "ray", "process", "serial"]


# --------------------------------------------------------------------------- runners


@dataclass(frozen=True)
class Shared:
    """A handle to a value shipped once to the workers; tasks receive the value itself.

    Attributes:
        key: unique id (the worker-side cache key).
        kind: ``"value"`` (in this process), ``"file"`` (a pickle file) or ``"ray"`` (an ObjectRef).
        ref: the value, the file path or the ObjectRef.
    """

    key: str
    kind: Literal["value", "file", "ray"]
    ref: Any


@dataclass(frozen=True)
class TaskFailure:
    """A task that did not return: it raised (``"error"``) or its worker died too often (``"crashed"``)."""

    index: int
    kind: Literal["error", "crashed"]
    message: str


_WORKER_CACHE: dict[str, object] = {}  # per worker process: resolved Shared values, compiled models


def _resolve(arg: object) -> object:
    if not isinstance(arg, Shared):
        return arg
    if arg.kind == "value":
        return arg.ref
    if arg.key not in _WORKER_CACHE:
        if arg.kind == "file":
            with open(arg.ref, "rb") as handle:
                _WORKER_CACHE[arg.key] = pickle.load(handle)
        else:
            import ray

            _WORKER_CACHE[arg.key] = ray.get(arg.ref)
    return _WORKER_CACHE[arg.key]


def _invoke(threads: int, fn: Callable[..., object], args: tuple[object, ...]) -> object:
    """Run one task in a worker: fix the thread count, resolve shared inputs, call ``fn``."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*(_resolve(a) for a in args))


class Runner:
    """Runs independent tasks ``fn(*args)``; see the module docstring for the kinds.

    Attributes:
        workers: how many tasks run at the same time.
        threads: torch intra-op threads of each task.
        retries: how often a task whose worker died is run again.
    """

    workers: int = 1
    threads: int = 1
    retries: int = 0

    def share(self, value: object) -> Shared:
        """Ship ``value`` to the workers once; pass the handle in task arguments."""
        raise NotImplementedError

    def run(self, fn: Callable[..., object], calls: Iterable[tuple[object, ...]], *,
            window: int | None = None) -> Iterator[tuple[int, object]]:
        """Run ``fn(*args)`` for every ``args`` in ``calls``.

        Args:
            fn: a module-level (picklable) function.
            calls: argument tuples; :class:`Shared` arguments arrive as their values.
            window: most tasks in flight at once (default: twice the workers), which
                bounds the memory of pending arguments and results.

        Yields:
            ``(index into calls, result or TaskFailure)`` in completion order.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the workers (and a Ray instance this runner started)."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """A short description for logs and reports."""
        return f"{type(self).__name__}(workers={self.workers}, threads={self.threads})"


class SerialRunner(Runner):
    """Tasks in this process, one after the other (same code path as the workers)."""

    def __init__(self, *, threads: int | None = None) -> None:
        self.threads = threads or torch.get_num_threads()

    def share(self, value: object) -> Shared:
        return Shared(uuid.uuid4().hex, "value", value)

    def run(self, fn: Callable[..., object], calls: Iterable[tuple[object, ...]], *,
            window: int | None = None) -> Iterator[tuple[int, object]]:
        before = torch.get_num_threads()
        try:
            for index, args in enumerate(calls):
                try:
                    result = _invoke(self.threads, fn, args)
                except Exception as exc:  # reported like a worker's failure
                    result = TaskFailure(index, "error", f"{type(exc).__name__}: {exc}")
                yield index, result
        finally:
            torch.set_num_threads(before)


def _init_pool_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class ProcessPoolRunner(Runner):
    """A local process pool (``concurrent.futures``, spawn context by default).

    Args:
        workers: worker processes (default: CPU count // threads).
        threads: torch intra-op threads per worker.
        retries: how often tasks in flight when a worker died are run again.
        context: multiprocessing start method (``"spawn"`` is safe with torch; ``"fork"``
            starts faster but must not follow OpenMP use in this process).
    """

    def __init__(self, workers: int | None = None, *, threads: int = 1, retries: int = 2,
                 context: str = "spawn") -> None:
        self.threads = threads
        self.workers = workers or max(1, (os.cpu_count() or 1) // threads)
        self.retries = retries
        self._context = multiprocessing.get_context(context)
        self._folder = Path(tempfile.mkdtemp(prefix="sq-pt2e-shared-"))
        self._executor: futures.ProcessPoolExecutor | None = None
        self._count = itertools.count()
        self.restarts = 0

    def share(self, value: object) -> Shared:
        key = f"{self._folder.name}-{next(self._count)}"
        path = self._folder / f"{key}.pkl"
        atomic_write_bytes(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        return Shared(key, "file", str(path))

    def _pool(self) -> futures.ProcessPoolExecutor:
        if self._executor is None:
            self._executor = futures.ProcessPoolExecutor(self.workers, mp_context=self._context,
                                                         initializer=_init_pool_worker, initargs=(self.threads,))
        return self._executor

    def _restart(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        self.restarts += 1

    def run(self, fn: Callable[..., object], calls: Iterable[tuple[object, ...]], *,
            window: int | None = None) -> Iterator[tuple[int, object]]:
        window = window or 2 * self.workers
        source = enumerate(calls)
        requeued: deque[tuple[int, tuple[object, ...]]] = deque()
        attempts: dict[int, int] = {}
        flight: dict[futures.Future[object], tuple[int, tuple[object, ...]]] = {}
        exhausted = False
        while True:
            while len(flight) < window:
                if requeued:
                    index, args = requeued.popleft()
                elif not exhausted:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        continue
                    index, args = item
                else:
                    break
                flight[self._pool().submit(_invoke, self.threads, fn, args)] = (index, args)
            if not flight:
                return
            done, _ = futures.wait(flight, return_when=futures.FIRST_COMPLETED)
            broken = False
            for future in done:
                index, args = flight.pop(future)
                try:
                    yield index, future.result()
                except BrokenProcessPool:
                    broken = True
                    flight[future] = (index, args)  # handled with the others below
                except Exception as exc:  # the task raised in its worker
                    yield index, TaskFailure(index, "error", f"{type(exc).__name__}: {exc}")
            if broken:  # a worker died: every task in flight is lost; run them again
                lost = sorted(flight.values(), key=lambda item: item[0])
                flight.clear()
                self._restart()
                for index, args in lost:
                    attempts[index] = attempts.get(index, 0) + 1
                    if attempts[index] > self.retries:
                        yield index, TaskFailure(index, "crashed",
                                                 f"its worker process died {attempts[index]} time(s)")
                    else:
                        requeued.append((index, args))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        shutil.rmtree(self._folder, ignore_errors=True)

    def describe(self) -> str:
        return f"process pool ({self.workers} workers x {self.threads} thread(s), {self._context.get_start_method()})"


_RAY_INVOKE: object | None = None


def _ray_invoke() -> Any:
    global _RAY_INVOKE
    if _RAY_INVOKE is None:
        import ray

        _RAY_INVOKE = ray.remote(_invoke)
    return _RAY_INVOKE


class RayRunner(Runner):
    """Ray tasks on a local Ray instance or a cluster.

    Every node needs the same sq-pt2e and torch installed (or a ``runtime_env`` that
    installs them); transcription workers read audio by path, so the audio must be on
    a file system every node sees.

    Args:
        address: None starts (or joins) a local instance; ``"auto"`` or
            ``"ray://HOST:10001"`` connects to a cluster.
        workers: with a local instance, the CPUs it gets (default: all); on a
            cluster, how many tasks to keep in flight (default: the cluster's CPUs).
        threads: CPUs (torch intra-op threads) per task.
        retries: Ray ``max_retries``: how often a task whose worker died is run again.
        runtime_env: passed to ``ray.init`` (e.g. ``{"env_vars": {...}}`` or ``{"pip": [...]}``).

    Raises:
        ImportError: Ray is not installed (``pip install 'sq-pt2e[ray]'``).
    """

    def __init__(self, address: str | None = None, workers: int | None = None, *, threads: int = 1,
                 retries: int = 3, runtime_env: dict[str, object] | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ImportError("Ray is not installed: pip install 'sq-pt2e[ray]' (or use the process pool, "
                              "--backend process)") from exc
        self.threads, self.retries, self.address = threads, retries, address
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict[str, object] = {"include_dashboard": False, "log_to_driver": False,
                                         "configure_logging": False}
            if runtime_env is not None:
                kwargs["runtime_env"] = runtime_env
            if address is None and workers is not None:
                kwargs["num_cpus"] = workers * threads
            ray.init(address=address, **kwargs)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus // threads)

    def share(self, value: object) -> Shared:
        import ray

        ref = ray.put(value)
        return Shared(ref.hex(), "ray", ref)

    def run(self, fn: Callable[..., object], calls: Iterable[tuple[object, ...]], *,
            window: int | None = None) -> Iterator[tuple[int, object]]:
        import ray
        from ray.exceptions import RayError, RayTaskError

        remote = _ray_invoke().options(num_cpus=self.threads, max_retries=self.retries, retry_exceptions=False)
        window = window or 2 * self.workers
        source = enumerate(calls)
        flight: dict[object, int] = {}
        while True:
            while len(flight) < window:
                item = next(source, None)
                if item is None:
                    break
                index, args = item
                flight[remote.remote(self.threads, fn, args)] = index
            if not flight:
                return
            done, _ = ray.wait(list(flight), num_returns=1)
            for ref in done:
                index = flight.pop(ref)
                try:
                    yield index, ray.get(ref)
                except RayTaskError as exc:  # the task raised: no retry, deterministic
                    cause = exc.cause if exc.cause is not None else exc
                    yield index, TaskFailure(index, "error", f"{type(cause).__name__}: {cause}")
                except RayError as exc:  # worker or node died more often than retried
                    yield index, TaskFailure(index, "crashed", f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self._owns:
            import ray

            ray.shutdown()

    def describe(self) -> str:
        where = self.address or "local Ray"
        return f"Ray at {where} ({self.workers} workers x {self.threads} thread(s))"


def make_runner(kind: RunnerKind = "auto", *, address: str | None = None, workers: int | None = None,
                threads: int = 1, retries: int = 3) -> Runner:
    """A runner by name.

    Args:
        kind: ``"ray"``, ``"process"``, ``"serial"``, or ``"auto"``: Ray when an address
            is given or Ray is installed, else a process pool.
        address: Ray cluster address (implies Ray).
        workers: parallel tasks (see the runner classes).
        threads: torch threads per task.
        retries: re-runs of a task whose worker died.
    """
    if kind == "auto":
        import importlib.util

        kind = "ray" if address is not None or importlib.util.find_spec("ray") is not None else "process"
    if kind == "ray":
        return RayRunner(address, workers, threads=threads, retries=retries)
    if address is not None:
        raise ValueError(f"a Ray address ({address!r}) needs the Ray runner, not {kind!r}")
    if kind == "process":
        return ProcessPoolRunner(workers, threads=threads, retries=retries)
    if kind == "serial":
        return SerialRunner(threads=threads)
    raise ValueError(f"unknown runner {kind!r} (expected auto, ray, process or serial)")


def shard_bounds(lengths: Sequence[int], shards: int) -> list[tuple[int, int]]:
    """Cut items with ``lengths`` into at most ``shards`` consecutive runs of similar total length.

    Returns:
        ``(start, stop)`` index pairs covering ``range(len(lengths))`` in order, none empty.
    """
    if shards < 1:
        raise ValueError(f"shards={shards} (expected >= 1)")
    total = float(sum(lengths))
    bounds, start, running = [], 0, 0.0
    for i, length in enumerate(lengths):
        running += length
        target = total * (len(bounds) + 1) / shards
        if running >= target and i + 1 < len(lengths) and len(bounds) + 1 < shards:
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(lengths)))
    return [b for b in bounds if b[1] > b[0]]


def shippable_model(model: nn.Module) -> nn.Module:
    """``model`` ready to pickle: weight norm folded in place, its stale load hook dropped.

    ``torch.nn.utils.parametrizations.weight_norm`` registers a local-function
    load-state-dict hook that converts old ``weight_g``/``weight_v`` keys; after folding
    it no longer applies, and it cannot be pickled.
    """
    from torch.nn.utils import parametrize

    from sq_pt2e.models.build import to_ctc_logits
    from sq_pt2e.passes.fold_weight_norm import fold_weight_norm

    fold_weight_norm(to_ctc_logits(model))
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            continue
        hooks = module._load_state_dict_pre_hooks  # noqa: SLF001 (no public API removes a hook by function)
        for key in [k for k, h in hooks.items()
                    if getattr(getattr(h, "hook", h), "__name__", "") == "_weight_norm_compat_hook"]:
            del hooks[key]
    return model


def _check_results(results: Iterator[tuple[int, object]], what: Callable[[int], str]) -> Iterator[tuple[int, object]]:
    for index, result in results:
        if isinstance(result, TaskFailure):
            raise WorkerError(f"{what(index)} failed ({result.kind}): {result.message}")
        yield index, result


# --------------------------------------------------------------------------- search


def _float_task(model: nn.Module, shard: tuple[list[torch.Tensor], list[str] | None],
                decode: Callable[[torch.Tensor], str]) -> tuple[list[torch.Tensor], UtteranceScores]:
    waves, references = shard
    log_probs = float_log_probs(model, waves)
    return log_probs, score_utterances(model, waves, log_probs, references, decode, None)


def _score_task(model: nn.Module, shard: tuple[list[torch.Tensor], list[str] | None],
                log_probs: list[torch.Tensor], decode: Callable[[torch.Tensor], str],
                layers: Candidate) -> UtteranceScores:
    waves, references = shard
    return score_utterances(model, waves, log_probs, references, decode, layers)


class DistributedEvaluator(Evaluator):
    """An :class:`~sq_pt2e.stablequant.Evaluator` whose candidates run as (candidate x shard) tasks.

    The model and each dev shard are shipped once (:meth:`Runner.share`); the float
    model's log-probabilities are computed per shard by tasks and shipped once too.
    Each task returns per-utterance results; they are concatenated in utterance order,
    so scores equal the single-process ones exactly (given the same threads per task).

    Args:
        model: the float model.
        waves: dev waveforms.
        references: transcripts (None: KL only).
        decode: logits -> text (must be picklable: a module-level function).
        runner: where tasks run.
        shards: dev shards (default: the runner's workers); more shards balance uneven
            workers better, fewer cost less per-task setup.
        cache: score-cache file, shared with the single-process evaluator (same context).

    Raises:
        WorkerError: a task failed in its worker or its worker died too often.
    """

    def __init__(self, model: nn.Module, waves: Sequence[torch.Tensor], references: Sequence[str] | None = None,
                 decode: Callable[[torch.Tensor], str] | None = None, *, runner: Runner,
                 shards: int | None = None, cache: str | os.PathLike[str] | None = None) -> None:
        self.runner = runner
        self.bounds = shard_bounds([int(w.shape[-1]) for w in waves], shards or runner.workers) if waves else []
        super().__init__(model, waves, references, decode, cache=cache)

    def _prepare(self) -> Score:
        refs = self.references
        self._model_ref = self.runner.share(shippable_model(self.model))
        self._shard_refs = [self.runner.share((self.waves[a:b], refs[a:b] if refs is not None else None))
                            for a, b in self.bounds]
        calls = [(self._model_ref, shard, self.decode) for shard in self._shard_refs]
        parts: dict[int, tuple[list[torch.Tensor], UtteranceScores]] = {}
        for index, result in _check_results(self.runner.run(_float_task, calls),
                                            lambda i: f"float evaluation of dev shard {self.bounds[i]}"):
            parts[index] = result  # type: ignore[assignment]
        self._log_prob_refs = [self.runner.share(parts[i][0]) for i in range(len(self.bounds))]
        self.float_log_probs = [lp for i in range(len(self.bounds)) for lp in parts[i][0]]
        return UtteranceScores.concat([parts[i][1] for i in range(len(self.bounds))]).score()

    def _score_uncached(self, candidates: Sequence[Candidate]) -> Iterator[tuple[int, Score]]:
        shards = len(self.bounds)
        calls = ((self._model_ref, self._shard_refs[s], self._log_prob_refs[s], self.decode, layers)
                 for layers in candidates for s in range(shards))
        parts: dict[int, dict[int, UtteranceScores]] = {}
        results = _check_results(self.runner.run(_score_task, calls),
                                 lambda i: f"candidate {i // shards} on dev shard {self.bounds[i % shards]}")
        for index, result in results:
            candidate, shard = divmod(index, shards)
            parts.setdefault(candidate, {})[shard] = result  # type: ignore[assignment]
            if len(parts[candidate]) == shards:
                done = parts.pop(candidate)
                yield candidate, UtteranceScores.concat([done[s] for s in range(shards)]).score()


def _statistics_task(model: nn.Module, waves: list[torch.Tensor]) -> dict[str, AbsHistogram]:
    from sq_pt2e.simulate import collect_statistics

    return collect_statistics(model, waves)


def collect_statistics_distributed(model: nn.Module, waves: Sequence[torch.Tensor], runner: Runner,
                                   shards: int | None = None) -> dict[str, AbsHistogram]:
    """:func:`~sq_pt2e.simulate.collect_statistics` over calibration shards, merged exactly.

    Raises:
        ValueError: no waveforms.
        WorkerError: a shard's task failed.
    """
    from sq_pt2e.simulate import merge_statistics

    if not waves:
        raise ValueError("no calibration waveforms")
    shippable_model(model)
    bounds = shard_bounds([int(w.shape[-1]) for w in waves], shards or runner.workers)
    model_ref = runner.share(model)
    calls = [(model_ref, list(waves[a:b])) for a, b in bounds]
    parts = dict(_check_results(runner.run(_statistics_task, calls),
                                lambda i: f"calibration shard {bounds[i]}"))
    return merge_statistics([parts[i] for i in range(len(bounds))])  # type: ignore[misc]


# --------------------------------------------------------------------------- transcription


@dataclass(frozen=True)
class TranscriptionJob:
    """What every transcription worker needs, shipped once.

    Attributes:
        model: the float model (weight norm folded).
        plan: the int8 plan (None: transcribe with the float model).
        calibration: waveforms for observers of layers without a fixed range.
        window: samples per model call; audio is cut into windows, the last zero-padded.
        engine: ``"inductor"`` (int8 compiled once per worker) or ``"eager"`` (the
            converted int8 graph, uncompiled).
        fit_to_cpu: narrow W8A8 to W7A8 on CPUs without VNNI (as the inductor backend needs).
    """

    model: nn.Module
    plan: Any
    calibration: tuple[torch.Tensor, ...]
    window: int
    engine: Literal["inductor", "eager"] = "inductor"
    fit_to_cpu: bool = True


def _build_forward(job: TranscriptionJob) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model of ``job`` for inputs of exactly ``job.window`` samples (compiled once)."""
    from sq_pt2e.models.build import to_ctc_logits

    if job.plan is None:
        wrapper = to_ctc_logits(job.model).eval()
        return lambda wave: wrapper(wave)
    from sq_pt2e.pipeline import quantize_model

    example = torch.randn(1, job.window, generator=torch.Generator().manual_seed(0))
    calibration = list(job.calibration) or [example]
    converted = quantize_model(job.model, example, calibration, plan=job.plan, fit_to_cpu=job.fit_to_cpu).converted
    if job.engine == "eager":
        return lambda wave: converted(wave)
    from sq_pt2e.backends.inductor import compile_inductor

    return compile_inductor(converted, example, threads=torch.get_num_threads())


def _frames(model: nn.Module, samples: int) -> int:
    lengths = model._get_feat_extract_output_lengths(torch.tensor([samples]))  # noqa: SLF001 (HF API)
    return max(0, int(lengths[0]))


@torch.no_grad()
def _transcribe_wave(forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, wave: torch.Tensor,
                     window: int) -> str:
    from sq_pt2e.asr import ctc_greedy_decode

    samples = int(wave.shape[-1])
    pieces = []
    for start in range(0, max(samples, 1), window):
        chunk = wave[..., start : start + window]
        real = int(chunk.shape[-1])
        if real < window:
            chunk = torch.nn.functional.pad(chunk, (0, window - real))
        logits = forward(chunk)[0]
        pieces.append(logits[: _frames(model, real)] if real < window else logits)
    return ctc_greedy_decode(torch.cat(pieces))[0]


def _transcribe_task(job: TranscriptionJob, job_key: str, utt_id: str, path: str) -> dict[str, str]:
    """Transcribe one file in a worker; the model is built (and compiled) on the worker's first call only."""
    key = f"forward:{job_key}"
    if key not in _WORKER_CACHE:  # errors here (e.g. compilation) fail the task, not a file
        _WORKER_CACHE[key] = _build_forward(job)
    forward = _WORKER_CACHE[key]
    row = {"id": utt_id, "path": path}
    try:
        from sq_pt2e.data import Utterance
        from sq_pt2e.inputs import load_utterances

        wave = load_utterances([Utterance(utt_id, Path(path))])[0].wave
        row["text"] = _transcribe_wave(forward, job.model, wave, job.window)  # type: ignore[arg-type]
    except Exception as exc:  # a bad file is reported, the others go on
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


@dataclass
class TranscriptionSummary:
    """How a batch transcription went.

    Attributes:
        output: the JSONL file (one row per manifest file, in manifest order).
        total: files in the manifest.
        transcribed: files transcribed by this run.
        skipped: files already finished by an earlier run.
        failed: ``{path: error}`` of files that failed (they are retried by the next run).
        seconds: wall time of this run.
        runner: where it ran.
    """

    output: Path
    total: int
    transcribed: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    runner: str = ""


def _read_journal(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an earlier run by id (last row wins); a torn last line is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # interrupted mid-line: drop the torn row
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as handle:
            handle.truncate(len(data))
    rows: dict[str, dict[str, str]] = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkerError(f"{path}:{number}: not a transcription row ({exc}); move the file away") from exc
            rows[row["id"]] = row
    return rows


def transcribe_manifest(
    model: nn.Module,
    plan: object | None,
    utterances: Sequence[Any],
    output: str | os.PathLike[str],
    runner: Runner,
    *,
    window_seconds: float = 10.0,
    engine: Literal["inductor", "eager"] = "inductor",
    calibration: Sequence[torch.Tensor] = (),
    block: int = 64,
    fit_to_cpu: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TranscriptionSummary:
    """Transcribe every file of a manifest on ``runner``'s workers.

    Each worker builds the int8 model (``plan``; float without one) once and, with
    ``engine="inductor"``, compiles it once for inputs of ``window_seconds``; audio is
    cut into such windows (the last zero-padded, its padded frames dropped) and the
    logits of a file are decoded together. Files go out in blocks of ``block``; the
    rows of a block are appended to ``output`` (JSONL: ``id``, ``path`` and ``text`` or
    ``error``) in manifest order, so memory stays bounded and an interrupted run loses
    at most one block. A rerun skips files with a ``text`` row and retries failed ones;
    the file is then rewritten atomically in manifest order, one row per file.

    Args:
        model: the float model.
        plan: a ``QuantPlan`` or None.
        utterances: ``sq_pt2e.data.Utterance`` records (ids unique).
        output: the JSONL file.
        runner: where tasks run.
        window_seconds: model input length in seconds at 16 kHz.
        engine: ``"inductor"`` or ``"eager"``.
        calibration: calibration waveforms, needed when plan layers have no fixed range.
        block: files per block.
        fit_to_cpu: see :class:`TranscriptionJob`.
        progress: called with a line per block.

    Returns:
        The summary; ``failed`` lists files that could not be transcribed.

    Raises:
        WorkerError: the model could not be built in a worker (every file would fail).
    """
    start = time.perf_counter()
    out = Path(output)
    ids = [u.id for u in utterances]
    if len(set(ids)) != len(ids):
        raise ValueError("utterance ids in the manifest are not unique")
    if block < 1:
        raise ValueError(f"block={block} (expected >= 1)")
    shippable_model(model)
    previous = _read_journal(out)
    todo = [u for u in utterances if "text" not in previous.get(u.id, {})]
    summary = TranscriptionSummary(out, len(utterances), skipped=len(utterances) - len(todo),
                                   runner=runner.describe())
    window = int(round(window_seconds * 16000))
    if window < 400:
        raise ValueError(f"window_seconds={window_seconds}: the CNN encoder needs at least 400 samples (0.025 s)")
    job = runner.share(TranscriptionJob(model, plan, tuple(calibration), window, engine, fit_to_cpu))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as journal:
        for first in range(0, len(todo), block):
            chunk = todo[first : first + block]
            rows: dict[int, dict[str, str]] = {}
            calls = [(job, job.key, u.id, str(u.path)) for u in chunk]
            for index, result in runner.run(_transcribe_task, calls):
                if isinstance(result, TaskFailure):
                    if result.kind == "error":  # the task itself failed: the model, not a file
                        raise WorkerError(f"transcription worker failed on {chunk[index].path}: {result.message}")
                    result = {"id": chunk[index].id, "path": str(chunk[index].path),
                              "error": f"worker died: {result.message}"}
                rows[index] = result  # type: ignore[assignment]
            for index in range(len(chunk)):
                row = rows[index]
                journal.write(json.dumps(row, ensure_ascii=False) + "\n")
                if "error" in row:
                    summary.failed[row["path"]] = row["error"]
                else:
                    summary.transcribed += 1
            journal.flush()
            os.fsync(journal.fileno())
            if progress is not None:
                progress(f"{summary.skipped + first + len(chunk)}/{len(utterances)} files "
                         f"({len(summary.failed)} failed)")
    _compact_journal(out, ids)
    summary.seconds = time.perf_counter() - start
    return summary


def _compact_journal(path: Path, ids: Sequence[str]) -> None:
    """Rewrite the rows in manifest order, one per file, atomically (if needed)."""
    text = path.read_text(encoding="utf-8")
    rows = _read_journal(path)
    ordered = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in ids if i in rows)
    if ordered != text:
        atomic_write_text(path, ordered)


# --------------------------------------------------------------------------- command line


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
    return make_runner(args.backend, address=args.ray_address, workers=args.workers,
                       threads=args.threads_per_worker, retries=args.retries)


def _cmd_quantize_distributed(args: argparse.Namespace) -> int:
    from sq_pt2e.baselines import Bits
    from sq_pt2e.inputs import load_source
    from sq_pt2e.models import load_model
    from sq_pt2e.stablequant import SearchConfig, search_plan

    bits = Bits.parse(args.bits)
    model = load_model(args.model, seed=args.seed)
    calibration = load_source(args.calibration, limit=args.max_calibration)
    if args.dev is not None:
        dev = load_source(args.dev, limit=args.max_dev)
    else:
        held_out = max(1, len(calibration) // 4)
        calibration, dev = calibration[:-held_out], calibration[-held_out:]
    references = [u.text for u in dev] if all(u.text for u in dev) else None
    criterion = args.criterion or ("wer" if references is not None else "kl")
    if criterion == "wer" and references is None:
        raise ValueError(f"--criterion wer needs transcripts: {args.dev or 'the calibration audio'} has none")
    config = SearchConfig(gamma=args.gamma, percentiles=tuple(args.percentiles), granularity=args.granularity,
                          criterion=criterion, weight_bits=bits.weight, act_bits=bits.act)
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    with _runner_from(args) as runner:
        say(f"running on {runner.describe()}: calibrating on {len(calibration)}, searching on {len(dev)} ...")
        statistics = collect_statistics_distributed(model, [u.wave for u in calibration], runner)
        cache = args.score_cache or args.output_dir / "scores.json"
        evaluator = DistributedEvaluator(model, [u.wave for u in dev], references if criterion == "wer" else None,
                                         runner=runner, shards=args.shards, cache=cache)
        plan, report = search_plan(model, statistics, evaluator, config, model_name=args.model, progress=say,
                                   progress_bar=False if args.no_progress else None)
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
    from sq_pt2e.plan import QuantPlan

    model = load_model(args.model, seed=args.seed)
    plan = QuantPlan.load(args.plan) if args.plan is not None else None
    needs_calibration = plan is not None and (not plan.layers or any(la.act_range is None for la in plan.layers))
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
    from sq_pt2e.stablequant import DEFAULT_PERCENTILES

    quantize = verbs.add_parser(
        "quantize-distributed", help="the StableQuant search as parallel tasks (Ray or a process pool), resumable",
        description="Same search and plan as `quantize`, with calibration shards and (candidate x dev shard) "
                    "evaluations run as tasks. Scores are stored in --score-cache as they arrive, so a rerun "
                    "after an interruption skips what was scored and writes the same plan byte for byte.",
    )
    quantize.add_argument("--model", required=True, help="an architecture name or a checkpoint folder")
    quantize.add_argument("--seed", type=int, default=0)
    quantize.add_argument("--calibration", default=None, help="calibration audio (default: shipped LibriSpeech)")
    quantize.add_argument("--dev", default=None, help="dev audio (default: a held-out part of the calibration audio)")
    quantize.add_argument("--criterion", choices=["wer", "kl"], default=None)
    quantize.add_argument("--bits", default="W8A8")
    quantize.add_argument("--granularity", choices=["block", "layer"], default="block")
    quantize.add_argument("--gamma", type=float, default=0.25)
    quantize.add_argument("--percentiles", type=float, nargs="+", default=list(DEFAULT_PERCENTILES))
    quantize.add_argument("--max-calibration", type=int, default=32)
    quantize.add_argument("--max-dev", type=int, default=100)
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
