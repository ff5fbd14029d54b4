"""The StableQuant search's candidate scoring and calibration as (work item x shard) tasks."""

from __future__ import annotations

import os
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from sq_pt2e.distributed.runners import Runner, raise_failures, shard_bounds, shippable_model
from sq_pt2e.observers import AbsHistogram
from sq_pt2e.replay import DEFAULT_CACHE_BYTES, StageCache
from sq_pt2e.stablequant import (
    Candidate,
    Evaluator,
    Score,
    UtteranceScores,
    float_log_probs,
    new_stage_cache,
    score_utterances,
)

__all__ = ["DistributedEvaluator", "collect_statistics_distributed"]


# This worker process's stage caches, one per dev shard it has scored (the most recently used last).
_SHARD_STAGE_CACHES: OrderedDict[str, StageCache] = OrderedDict()


def _shard_stage_cache(model: nn.Module, shard_key: str, shards: int) -> StageCache:
    """The worker's stage cache of one dev shard, kept across tasks. A worker keeps at most ``shards``
    caches (those of other evaluators go first), each ``1 / shards`` of the default budget."""
    cache = _SHARD_STAGE_CACHES.pop(shard_key, None)
    if cache is None:
        cache = new_stage_cache(model, DEFAULT_CACHE_BYTES // shards)
    _SHARD_STAGE_CACHES[shard_key] = cache
    while len(_SHARD_STAGE_CACHES) > shards:
        _SHARD_STAGE_CACHES.popitem(last=False)
    return cache


def _drop_shard_stage_caches(instance: str) -> None:
    for key in [k for k in _SHARD_STAGE_CACHES if k.startswith(f"{instance}:")]:
        del _SHARD_STAGE_CACHES[key]


def _float_task(model: nn.Module, shard: tuple[list[torch.Tensor], list[str] | None],
                decode: Callable[[torch.Tensor], str], shard_key: str,
                shards: int) -> tuple[list[torch.Tensor], UtteranceScores]:
    waves, references = shard
    log_probs = float_log_probs(model, waves)
    stage_cache = _shard_stage_cache(model, shard_key, shards)
    return log_probs, score_utterances(model, waves, log_probs, references, decode, None, stage_cache)


def _score_task(model: nn.Module, shard: tuple[list[torch.Tensor], list[str] | None],
                log_probs: list[torch.Tensor], decode: Callable[[torch.Tensor], str],
                layers: Candidate, shard_key: str, shards: int) -> UtteranceScores:
    waves, references = shard
    stage_cache = _shard_stage_cache(model, shard_key, shards)
    return score_utterances(model, waves, log_probs, references, decode, layers, stage_cache)


class DistributedEvaluator(Evaluator):
    """An :class:`~sq_pt2e.stablequant.Evaluator` whose candidates run as (candidate x shard) tasks.

    The model and each dev shard are shipped once (:meth:`Runner.share`); the float
    model's log-probabilities are computed per shard by tasks and shipped once too.
    Each task returns per-utterance results; they are concatenated in utterance order,
    so scores equal the single-process ones exactly (given the same threads per task).
    Each worker process keeps a stage cache per dev shard it scores (so a candidate
    replays what an earlier one on that worker and shard recorded); replays do not change scores.

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
        self._instance = uuid.uuid4().hex  # names this evaluator's shard stage caches in the workers
        # Where tasks run in this process (SerialRunner), its caches go with the evaluator.
        weakref.finalize(self, _drop_shard_stage_caches, self._instance)
        super().__init__(model, waves, references, decode, cache=cache)

    def _new_stage_cache(self) -> StageCache | None:
        return None  # the workers keep theirs (one per shard)

    def _shard_key(self, shard: int) -> str:
        return f"{self._instance}:{shard}"

    def _prepare(self) -> Score:
        refs = self.references
        self._model_ref = self.runner.share(shippable_model(self.model))
        self._shard_refs = [self.runner.share((self.waves[a:b], refs[a:b] if refs is not None else None))
                            for a, b in self.bounds]
        calls = [(self._model_ref, shard, self.decode, self._shard_key(s), len(self.bounds))
                 for s, shard in enumerate(self._shard_refs)]
        parts: dict[int, tuple[list[torch.Tensor], UtteranceScores]] = {}
        for index, result in raise_failures(self.runner.run(_float_task, calls),
                                            lambda i: f"float evaluation of dev shard {self.bounds[i]}"):
            parts[index] = result  # type: ignore[assignment]
        self._log_prob_refs = [self.runner.share(parts[i][0]) for i in range(len(self.bounds))]
        self.float_log_probs = [lp for i in range(len(self.bounds)) for lp in parts[i][0]]
        return UtteranceScores.concat([parts[i][1] for i in range(len(self.bounds))]).score()

    def _score_uncached(self, candidates: Sequence[Candidate]) -> Iterator[tuple[int, Score]]:
        shards = len(self.bounds)
        calls = ((self._model_ref, self._shard_refs[s], self._log_prob_refs[s], self.decode, layers,
                  self._shard_key(s), shards) for layers in candidates for s in range(shards))
        parts: dict[int, dict[int, UtteranceScores]] = {}
        results = raise_failures(self.runner.run(_score_task, calls),
                                 lambda i: f"candidate {i // shards} on dev shard {self.bounds[i % shards]}")
        for index, result in results:
            candidate, shard = divmod(index, shards)
            parts.setdefault(candidate, {})[shard] = result  # type: ignore[assignment]
            if len(parts[candidate]) == shards:
                done = parts.pop(candidate)
                yield candidate, UtteranceScores.concat([done[s] for s in range(shards)]).score()


def _statistics_task(model: nn.Module, waves: list[torch.Tensor],
                     input_scales: dict[str, tuple[float, ...]]) -> dict[str, AbsHistogram]:
    from sq_pt2e.simulate import collect_statistics

    return collect_statistics(model, waves, input_scales=input_scales)


def collect_statistics_distributed(model: nn.Module, waves: Sequence[torch.Tensor], runner: Runner,
                                   shards: int | None = None,
                                   input_scales: dict[str, tuple[float, ...]] | None = None) -> dict[str, AbsHistogram]:
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
    calls = [(model_ref, list(waves[a:b]), dict(input_scales or {})) for a, b in bounds]
    parts = dict(raise_failures(runner.run(_statistics_task, calls),
                                lambda i: f"calibration shard {bounds[i]}"))
    return merge_statistics([parts[i] for i in range(len(bounds))])  # type: ignore[misc]
