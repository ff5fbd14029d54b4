"""Runners: independent tasks on Ray, a local process pool, or this process.

A task is ``fn(*args)`` with a module-level ``fn``. Inputs shared by many tasks are
shipped once (:meth:`Runner.share`) and resolved once per worker process; results come
back in completion order with their index. A task whose worker died is run again
(``retries``); one that raised comes back as a :class:`TaskFailure`.
"""

from __future__ import annotations

import concurrent.futures as futures
import itertools
import multiprocessing
import os
import pickle
import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sq_pt2e.atomic import atomic_write_bytes
from sq_pt2e.errors import WorkerError

__all__ = [
    "ProcessPoolRunner",
    "RayRunner",
    "Runner",
    "RunnerKind",
    "SerialRunner",
    "Shared",
    "TaskFailure",
    "make_runner",
    "raise_failures",
    "shard_bounds",
    "shippable_model",
    "WORKER_CACHE",
]

RunnerKind = Literal["auto", "ray", "process", "serial"]


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


WORKER_CACHE: dict[str, object] = {}
"""Per worker process: resolved :class:`Shared` values and built models, by key."""


def _resolve(arg: object) -> object:
    if not isinstance(arg, Shared):
        return arg
    if arg.kind == "value":
        return arg.ref
    if arg.key not in WORKER_CACHE:
        if arg.kind == "file":
            with open(arg.ref, "rb") as handle:
                WORKER_CACHE[arg.key] = pickle.load(handle)
        else:
            import ray

            WORKER_CACHE[arg.key] = ray.get(arg.ref)
    return WORKER_CACHE[arg.key]


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
        # No more in flight than CPU slots: a task resolving a shared value (ray.get) counts as blocked,
        # and queued tasks would make Ray start extra worker processes for them (each importing torch).
        window = min(window or self.workers, self.workers)
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


def raise_failures(results: Iterator[tuple[int, object]], what: Callable[[int], str]) -> Iterator[tuple[int, object]]:
    """Pass results through; a :class:`TaskFailure` becomes a ``WorkerError`` naming ``what(index)``."""
    for index, result in results:
        if isinstance(result, TaskFailure):
            raise WorkerError(f"{what(index)} failed ({result.kind}): {result.message}")
        yield index, result
