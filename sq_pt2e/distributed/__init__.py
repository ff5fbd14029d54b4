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

from sq_pt2e.distributed.cli import add_cli_verbs
from sq_pt2e.distributed.runners import (
    ProcessPoolRunner,
    RayRunner,
    Runner,
    SerialRunner,
    Shared,
    TaskFailure,
    make_runner,
    shard_bounds,
    shippable_model,
)
from sq_pt2e.distributed.search import DistributedEvaluator, collect_statistics_distributed
from sq_pt2e.distributed.transcription import TranscriptionJob, TranscriptionSummary, transcribe_manifest

__all__ = [
    "DistributedEvaluator",
    "ProcessPoolRunner",
    "RayRunner",
    "Runner",
    "SerialRunner",
    "Shared",
    "TaskFailure",
    "TranscriptionJob",
    "TranscriptionSummary",
    "add_cli_verbs",
    "collect_statistics_distributed",
    "make_runner",
    "shard_bounds",
    "shippable_model",
    "transcribe_manifest",
]
