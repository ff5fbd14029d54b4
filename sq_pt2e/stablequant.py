"""The StableQuant search: layer-adaptive activation ranges for speech models.

Two phases, as in NNCF: statistics are collected once (:func:`collect_statistics`,
one |x| histogram per layer input), then candidates are scored from those stored
histograms, by fake-quantized simulation on the float model, never recalibrating.

Our reading of the paper (arXiv 2504.14915), each choice configurable in
:class:`SearchConfig`:

1. Sensitivity: quantize one layer group at a time with max ranges, the rest
   float; a group whose WER rises more than ``gamma`` points is *sensitive*.
   Logit KL against the float model is recorded as a proxy, and can drive the
   search instead of WER (``criterion="kl"``, our default: see :class:`SearchConfig`).
2. Outlier removal: for each sensitive group in network order, try each clip
   percentile of its input histograms; keep the one giving the whole quantized
   model the lowest WER (ties: lower KL). Our reading (``start="mse"``, default):
   groups not searched yet sit at their MSE ranges, so each choice is made in a
   model close to the final one, and the group's MSE range competes with the
   percentiles (kept when none beats it), so the plan is never worse on the dev
   set than MSE ranges everywhere. ``start="max"``: not-yet-searched sensitive
   groups sit at max ranges and a percentile is always chosen.
3. Scale: every other layer gets the MSE-optimal range of its histogram
   (``reading="mse-rest"``); or every layer gets the MSE-optimal range inside its
   clipped histogram (``reading="mse-all"``).
   Ours: with ``act_scheme="affine"`` (default) a layer whose inputs are one-sided
   (GELU outputs, >= -0.17, feed the CNN encoder's convolutions 1-6 and every
   feed-forward output layer) gets the same levels over ``[min x, range]`` instead of
   ``[-range, range]``; ranges, MSE error model and simulation all use that grid.
   Ours, optional (``smooth_alpha > 0``): before calibrating, the inputs of the
   ``smooth_ops`` layers (default the CNN encoder's convolutions, whose inputs are
   heavy-tailed) are divided per channel by SmoothQuant factors folded into the
   weights (:mod:`sq_pt2e.smoothing`); every candidate and the plan carry them.
   Ours: layers matching ``keep_float`` (default the CNN encoder's first conv, which
   reads the waveform) are left in float.
   Ours (``split_percentiles``): after step 2, the groups of CNN convs (``split_scope``:
   all of them, or the sensitive ones) may take an outlier split instead of a clip
   (:mod:`sq_pt2e.passes.split_outliers`): their inputs above the p-th percentile are not
   clipped but computed by a second int8 conv with the same weights, so the main grid can
   be small and fine. Tried at each percentile of the grid for all those groups together,
   then for each in network order; kept where it lowers the dev score by a margin
   (``split_gain``), since it costs compute.
   Ours, last (``refit_ops``, default the CNN convolutions): the quantized layers of
   those kinds get reconstructed weights, fitted by least squares in network order to
   reproduce the float model's outputs from their int8 inputs (:mod:`sq_pt2e.reconstruct`);
   kept only when that lowers the dev score.
4. The result is a :class:`~sq_pt2e.plan.QuantPlan` with fixed ranges, applied
   through ``StableQuantQuantizer`` -> ``prepare_pt2e`` / ``convert_pt2e``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from sq_pt2e.asr import greedy_transcript
from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.digest import hash_tensor
from sq_pt2e.errors import SearchStateError
from sq_pt2e.layer_cost import layer_flops
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.observers import AbsHistogram, act_floor, range_max, range_mse, range_percentile
from sq_pt2e.output_grids import OutputGridCalibrator
from sq_pt2e.passes.fold_weight_norm import fold_weight_norm
from sq_pt2e.passes.int4_linear_weights import packs_as_int4
from sq_pt2e.plan import TARGETS, LayerPlan, OpKind, QuantPlan, Target
from sq_pt2e.reconstruct import RefitWeights, reconstruct_layers
from sq_pt2e.replay import DEFAULT_CACHE_BYTES, StageCache
from sq_pt2e.simulate import LayerQuant, QuantizableModule, collect_statistics, fake_quantized, quantizable_modules

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_SPLIT_PERCENTILES",
    "Candidate",
    "Evaluator",
    "Score",
    "ScoreCache",
    "SearchConfig",
    "SearchReport",
    "UtteranceScores",
    "candidate_key",
    "clip_histogram",
    "collect_statistics",
    "float_log_probs",
    "layer_groups",
    "layer_key",
    "new_stage_cache",
    "promoted_share_unit",
    "promotion_costs",
    "score_utterances",
    "FIRST_CONV",
    "search_input_scales",
    "search_plan",
    "search_statistics",
    "searched_modules",
    "smoothed_layers",
]

Candidate = dict[str, LayerQuant]
"""A candidate plan as simulated: layer name -> its activation range and bit widths."""

DEFAULT_PERCENTILES: tuple[float, ...] = (100.0, 99.999, 99.99, 99.9, 99.8, 99.5, 99.0)
DEFAULT_SPLIT_PERCENTILES: tuple[float, ...] = (99.9, 99.5, 99.0, 98.0, 95.0, 90.0)
# Name of the float-fallback candidate that floats several sensitive groups together.
JOINT = " + "
FIRST_CONV = r"feature_extractor\.conv_layers\.0\.conv$"
"""Name pattern of the CNN encoder's first convolution (its input is the waveform)."""
_BLOCK = re.compile(r"^(.*\.layers\.\d+)\.")


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of the search. Defaults are our reading, measured better on the reference models
    (README, Accuracy); the paper's plain reading is ``criterion="wer", act_scheme="symmetric",
    start="max", smooth_alpha=0`` (``accuracy.SEARCHED_METHODS["stablequant-paper"]``).

    ``criterion="kl"`` is the default because the logit KL over the dev set is a continuous
    score: picking the best of several clip percentiles by WER on a few dozen dev utterances
    follows noise (ref-wav2vec2, 30 dev utterances: +4.0 test WER points by WER, +3.0 by KL).
    ``smooth_alpha=0.75`` had the lowest dev KL of 0.5 / 0.75 / 0.9 / 1.0 on ref-wav2vec2.
    ``passes=3``: on ref-wav2vec2 W8A8 the test WER delta fell from +1.25 (one greedy pass) to
    +0.65 points (120 test utterances), for 64 instead of 36 evaluations.

    Attributes:
        gamma: WER increase (percentage points) above which a group is sensitive.
        kl_share: with ``criterion="kl"``: a group is sensitive when quantizing it alone
            costs more than this share of the logit KL of quantizing every layer (max).
        percentiles: clip percentiles tried for sensitive groups, in this order.
        granularity: ``"block"`` (one group per Transformer block; each CNN layer, the
            feature projection and the CTC head alone) or ``"layer"`` (every layer alone).
        reading: ``"mse-rest"`` or ``"mse-all"`` (see the module docstring).
        criterion: ``"wer"`` (needs transcripts) or ``"kl"`` (logit KL vs float).
        weight_bits: bits of every weight; act_bits: bits of every input activation.
        weight_calibration: ``"max"`` or ``"mse"`` per-channel weight ranges, or ``"auto"`` (default):
            MSE at 4 weight bits or fewer, max above. With 4-bit weights the rounding error of max
            ranges dominates (ref-wav2vec2 W4A8 test: +5.83 points with max, +2.22 with MSE weight
            ranges; ref-hubert +1.99 / +1.06); at 6 and 8 bits MSE ranges were no better
            (ref-wav2vec2 W8A8 +0.65 max / +0.88 MSE, W6A6 +5.37 / +6.24).
        skip_ops: op kinds kept in float (e.g. ``("grouped_conv1d",)`` for the positional conv).
        keep_float: regular expressions; layers whose name matches one (``re.search``) stay float.
            Default: the CNN encoder's first conv, which reads the raw waveform through a
            one-channel per-tensor grid and is about 0.2 % of wav2vec2-base's multiply-adds.
        act_scheme: ``"affine"``: one-sided inputs get an affine grid from their minimum
            (two-sided ones stay symmetric); ``"symmetric"``: every grid is ``[-r, r]``.
        start: ranges of sensitive groups before their percentile search, ``"mse"`` or
            ``"max"`` (see the module docstring).
        smooth_alphas: migration strengths :func:`run_search` chooses ``smooth_alpha`` from: it
            calibrates and searches at each and keeps the plan with the lowest final dev score
            (empty: ``smooth_alpha`` as given). The best one moves with the checkpoint: on ref-wav2vec2
            0.75 was best of 0.5 / 0.75 / 0.9 / 1.0, and after more training 0.5, where clipping CNN
            convs 1-3 at p99.5-99.8 took the dev KL to 0.021 (0.75: no clip helped, 0.122 before
            weight reconstruction, 0.024 after). The score of the plain MSE plan at each alpha did
            not predict this (0.127 / 0.122 / 0.129), so each alpha gets the whole search.
        smooth_alpha: SmoothQuant migration strength for the inputs of ``smooth_ops``
            layers (0: no smoothing; see :mod:`sq_pt2e.smoothing`).
        smooth_ops: op kinds whose inputs are smoothed (layers with one input channel are left alone).
        passes: passes of step 2 over the sensitive groups. Pass 1 searches each group with the
            groups after it still at their starting ranges; each later pass revisits every group with
            all others at their chosen ranges (coordinate descent), and the search stops early when a
            pass changes nothing.
        promote_weight_bits: mixed precision (None: off). After step 3, each group is scored with
            its weights at these bits and everything else as chosen (one batch); the groups that
            lower the logit KL most per promoted weight get these bits, within ``promote_share``.
        promote_share: the largest share of the searched layers' weights that may be promoted
            (for ``target="xnnpack"``, of the weights the ``.pte`` packs: :func:`promotion_costs`).
        float_share: float fallback (0: off, every searched layer int8). Last, each group is scored
            in float with everything else as chosen (one batch); the groups that lower the logit KL
            most per FLOP stay float, within this share of the searched layers' FLOPs (counted on
            1 s of audio). It trades speed for accuracy where a group's int8 error cannot be clipped
            away: on ref-wav2vec2 at W8A8 the CNN convs 1-6 carry nearly all of the dev KL. The
            sensitive groups no clip percentile helped are also scored together, as one candidate
            (``"a + b"``): their int8 errors can offset each other, so that floating one of them
            alone makes the output worse (ref-wav2vec2, CNN convs 1-3).
        split_percentiles: main-grid percentiles tried for an outlier split of each group in
            ``split_scope`` (empty: off). The group's layers of ``split_ops`` kinds get the p-th percentile
            of their input as range, and what lies beyond it a second grid and a second int8
            layer with the same weights (``LayerPlan.outlier_range``). It costs that layer's
            multiply-adds twice. On ref-wav2vec2 W8A8 (a hand-made split of the CNN convs 1-3 at
            a quarter of the plan's clip ranges) it took the dev logit KL from 0.012 to 0.002: a
            range fine enough for their inputs' bulk clips the loud frames, one that covers those
            is too coarse for the rest.
        split_ops: op kinds an outlier split may apply to.
        split_scope: which groups an outlier split is tried for: ``"all"`` groups whose layers
            are all of ``split_ops`` kinds, or the ``"sensitive"`` ones alone. A split also makes
            the main grid finer, so it pays where no clip does: where the rounding error of a
            dense input dominates, not its outliers. On ref-wav2vec2 W8A8 the CNN convs 4-6 are not
            sensitive, yet splitting them with convs 1-3 halved the dev logit KL (0.00169 ->
            0.00086) for 13 % more of the searched layers' FLOPs (29 % in all).
        split_gain: a split is kept only when it lowers the dev logit KL by at least this share
            of the KL with the group's own choice (it costs compute: small gains do not pay).
        split_max_flops: the most all outlier splits together may add, as a share of the searched
            layers' FLOPs (1.0: no limit). Splitting wav2vec2-base's CNN convs 1-3 adds 32 %
            and cost 22 % of the compiled int8 latency (AMX Xeon); a limit such as 0.1 trades that
            accuracy back for speed.
        refit_ops: op kinds whose quantized layers get reconstructed weights, last, after the
            float fallback (:mod:`sq_pt2e.reconstruct`; empty: off). Needs the calibration audio
            (``search_plan(..., calibration=waves)``); kept only if it lowers the dev score. On
            ref-wav2vec2 W8A8 refitting the CNN convs took the dev KL from 0.122 to 0.023; refitting
            the Linear layers too overfit the calibration set (dev KL rose).
        round_ops: op kinds whose quantized layers get GPTQ-rounded weights when the search
            quantizes weights to at most ``round_max_bits`` bits (empty: off). Tried after the refit
            of ``refit_ops``, as an alternative to it: the layers of ``refit_ops`` and ``round_ops``
            are refit in network order, and each one's weights rounded to its grid so that its
            output on its int8 inputs changes least (:func:`sq_pt2e.reconstruct.round_to_grid`);
            kept if that lowers the dev score below the plain refit's. Rounding to nearest is
            what costs most at 4 weight bits: on ref-wav2vec2 W4A8 the dev logit KL went from
            0.039 (no refit) to 0.030 (CNN convs refit) and 0.018 (every conv and Linear layer
            refit and rounded). At 8 bits rounding to nearest costs almost nothing. Off with
            ``refit_ops=()``, which turns all weight reconstruction off.
        round_max_bits: ``round_ops`` applies when ``weight_bits`` is at most this.
        target: the backend the plan is scored for. ``"x86_inductor"``: oneDNN's int8 kernels
            return float. ``"xnnpack"`` (ExecuTorch): XNNPACK's return int8, so every int8 layer's
            output is rounded to an observed int8 grid too (:mod:`sq_pt2e.output_grids`; needs the
            calibration audio); biases are added on XNNPACK's int32 grid
            (:mod:`sq_pt2e.passes.snap_bias_to_int32_grid`). Weight reconstruction fits each layer to
            int8 inputs simulated without that output rounding (an approximation; it is kept only if
            the scores, which have the rounding, improve: on ref-wav2vec2 W8A8 dev KL 0.002942 ->
            0.002939). Without weight reconstruction, on
            ref-wav2vec2 W8A8 it found no better ``.pte`` than the plan scored for x86 (dev logit
            KL in the ``.pte``'s arithmetic 0.0030 against 0.0029), in twice the search time: since
            outputs feeding a GELU ignore values below -3, the x86 plan loses little there.
    """

    gamma: float = 0.25
    kl_share: float = 0.2
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    granularity: Literal["block", "layer"] = "block"
    reading: Literal["mse-rest", "mse-all"] = "mse-rest"
    criterion: Literal["wer", "kl"] = "kl"
    weight_bits: int = 8
    act_bits: int = 8
    weight_calibration: Literal["max", "mse", "auto"] = "auto"
    skip_ops: tuple[OpKind, ...] = ()
    keep_float: tuple[str, ...] = (FIRST_CONV,)
    act_scheme: Literal["symmetric", "affine"] = "affine"
    start: Literal["mse", "max"] = "mse"
    smooth_alpha: float = 0.75
    smooth_alphas: tuple[float, ...] = (0.5, 0.75, 1.0)
    smooth_ops: tuple[OpKind, ...] = ("conv1d",)
    passes: int = 3
    promote_weight_bits: int | None = None
    promote_share: float = 0.25
    float_share: float = 0.0
    split_percentiles: tuple[float, ...] = DEFAULT_SPLIT_PERCENTILES
    split_ops: tuple[OpKind, ...] = ("conv1d",)
    split_scope: Literal["all", "sensitive"] = "all"
    split_gain: float = 0.1
    split_max_flops: float = 1.0
    refit_ops: tuple[OpKind, ...] = ("conv1d",)
    round_ops: tuple[OpKind, ...] = ("conv1d", "linear")
    round_max_bits: int = 6
    target: Target = "x86_inductor"

    @property
    def resolved_weight_calibration(self) -> Literal["max", "mse"]:
        """The per-channel weight range method ``weight_calibration`` resolves to at ``weight_bits``."""
        return self.weight_calibration_at(self.weight_bits)

    def weight_calibration_at(self, bits: int) -> Literal["max", "mse"]:
        """The per-channel weight range method ``weight_calibration`` resolves to at ``bits``."""
        if self.weight_calibration == "auto":
            return "mse" if bits <= 4 else "max"
        return self.weight_calibration

    def __post_init__(self) -> None:
        if not self.percentiles or any(not 0 < p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles={self.percentiles} (expected a non-empty tuple of 0 < p <= 100)")
        if (any(not 0 < p < 100 for p in self.split_percentiles) or not 0.0 <= self.split_gain < 1.0
                or self.split_max_flops < 0):
            raise ValueError(f"split_percentiles={self.split_percentiles} (expected 0 < p < 100; empty: no split), "
                             f"split_gain={self.split_gain} (expected 0 <= gain < 1), split_max_flops="
                             f"{self.split_max_flops} (expected >= 0)")
        if self.gamma < 0 or not 0 <= self.kl_share <= 1:
            raise ValueError(f"gamma={self.gamma} (expected >= 0), kl_share={self.kl_share} (expected 0..1)")
        if self.act_scheme not in ("symmetric", "affine") or self.start not in ("mse", "max"):
            raise ValueError(f"act_scheme={self.act_scheme!r} (expected symmetric or affine), start={self.start!r} "
                             "(expected mse or max)")
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r} (expected one of {TARGETS})")
        if self.split_scope not in ("sensitive", "all"):
            raise ValueError(f"split_scope={self.split_scope!r} (expected all or sensitive)")
        for pattern in self.keep_float:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"keep_float pattern {pattern!r} is not a regular expression: {exc}") from exc
        if self.weight_calibration not in ("max", "mse", "auto"):
            raise ValueError(f"weight_calibration={self.weight_calibration!r} (expected max, mse or auto)")
        if self.passes < 1:
            raise ValueError(f"passes={self.passes} (expected >= 1)")
        if self.promote_weight_bits is not None and not self.weight_bits < self.promote_weight_bits <= 8:
            raise ValueError(f"promote_weight_bits={self.promote_weight_bits} (expected more than weight_bits="
                             f"{self.weight_bits} and at most 8)")
        if not 0.0 <= self.promote_share <= 1.0:
            raise ValueError(f"promote_share={self.promote_share} (expected 0..1)")
        if not 0.0 <= self.float_share <= 1.0:
            raise ValueError(f"float_share={self.float_share} (expected 0..1; 0 disables the float fallback)")
        if any(not 0.0 <= a <= 1.0 for a in self.smooth_alphas):
            raise ValueError(f"smooth_alphas={self.smooth_alphas} (expected values 0 <= alpha <= 1)")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha={self.smooth_alpha} (expected 0 <= alpha <= 1; 0 disables smoothing)")
        if not 2 <= self.round_max_bits <= 8:
            raise ValueError(f"round_max_bits={self.round_max_bits} (expected 2..8)")


@dataclass(frozen=True)
class Score:
    """Quality of one candidate: WER (percent; None without transcripts) and mean logit KL."""

    wer: float | None
    kl: float

    def as_dict(self) -> dict[str, float]:
        """``{"kl": ..., "wer": ...}``, without ``"wer"`` when there is none."""
        return {"kl": self.kl, **({"wer": self.wer} if self.wer is not None else {})}

    def key(self, criterion: str) -> tuple[float, ...]:
        """The sort key of ``criterion`` (lower is better): WER then KL, or KL alone."""
        if criterion == "wer" and self.wer is not None:
            return (round(self.wer, 9), self.kl)
        return (self.kl,)


@dataclass(frozen=True)
class UtteranceScores:
    """Per-utterance results of one candidate on a run of consecutive dev utterances.

    Shards of the dev set are scored apart (in other processes or machines) and
    concatenated in utterance order; :meth:`score` then gives exactly the score of the
    whole set scored in one process: error and word counts are integers, and the KL
    mean is taken over the same values in the same order.

    Attributes:
        kl: logit KL against the float model, one value per utterance.
        errors: ``(word errors, reference words)`` per utterance; None without transcripts.
    """

    kl: tuple[float, ...]
    errors: tuple[tuple[float, float], ...] | None = None

    @staticmethod
    def concat(parts: Sequence[UtteranceScores]) -> UtteranceScores:
        """The scores of consecutive shards, joined in the order given."""
        if not parts:
            raise ValueError("no shard scores to concatenate")
        with_errors = {p.errors is not None for p in parts}
        if len(with_errors) != 1:
            raise ValueError("some shards were scored with transcripts and some without")
        errors = (tuple(e for p in parts for e in p.errors)  # type: ignore[union-attr]
                  if with_errors == {True} else None)
        return UtteranceScores(tuple(k for p in parts for k in p.kl), errors)

    def score(self) -> Score:
        """Corpus WER (total errors / total reference words) and the mean KL."""
        wer = None
        if self.errors is not None:
            errors = sum(e for e, _ in self.errors)
            words = sum(w for _, w in self.errors)
            wer = 100.0 * (errors / words)
        return Score(wer, float(np.mean(np.asarray(self.kl, dtype=np.float64))))


@torch.no_grad()
def float_log_probs(model: nn.Module, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The float model's float64 log-probabilities ``(frames, vocab)`` for each waveform."""
    with fake_quantized(model, {}) as float_model:
        return [torch.log_softmax(float_model(w)[0].double(), -1) for w in waves]


@torch.no_grad()
def score_utterances(
    model: nn.Module,
    waves: Sequence[torch.Tensor],
    reference_log_probs: Sequence[torch.Tensor],
    references: Sequence[str] | None,
    decode: Callable[[torch.Tensor], str],
    layers: Candidate | None,
    stage_cache: StageCache | None = None,
) -> UtteranceScores:
    """Score one candidate on some dev utterances: the work unit of every evaluator.

    Args:
        model: the float model.
        waves: ``(1, samples)`` dev waveforms.
        reference_log_probs: the float model's log-probabilities for ``waves``
            (:func:`float_log_probs`).
        references: transcripts of ``waves`` (None: KL only).
        decode: logits ``(frames, vocab)`` -> text.
        layers: the candidate (None or empty: the float model).
        stage_cache: recorded stage outputs of ``model`` on ``waves`` to replay, and to record into.

    Returns:
        Per-utterance KL and, with transcripts, word errors.
    """
    from sq_pt2e.asr import per_utterance_errors

    hyps, kls = [], []
    with fake_quantized(model, layers or {}) as run:
        outputs = (stage_cache.forward_all(run, layers or {}, waves) if stage_cache is not None
                   else map(run, waves))
        for output, ref_lp in zip(outputs, reference_log_probs, strict=True):
            logits = output[0]
            log_probs = torch.log_softmax(logits.double(), -1)
            kls.append(float((ref_lp.exp() * (ref_lp - log_probs)).sum(-1).mean()))
            if references is not None:
                hyps.append(decode(logits))
    errors = None
    if references is not None:
        errors = tuple((float(e), float(w)) for e, w in per_utterance_errors(list(references), hyps))
    return UtteranceScores(tuple(kls), errors)


def new_stage_cache(model: nn.Module, max_bytes: int = DEFAULT_CACHE_BYTES) -> StageCache:
    """An empty :class:`~sq_pt2e.replay.StageCache` for scoring candidates of ``model``."""
    return StageCache([m.name for m in quantizable_modules(to_ctc_logits(model))], layer_key, max_bytes=max_bytes)


def layer_key(name: str, quant: LayerQuant) -> str:
    """A layer's part of :func:`candidate_key`: equal only when the layer simulates identically.

    Ranges enter as exact hexadecimal floats.
    """
    payload = ([name, float(quant.act_range).hex(), quant.act_bits, quant.weight_bits, quant.weight_calibration]
               + ([float(quant.act_floor).hex()] if quant.act_floor is not None else [])
               + ([[float(v).hex() for v in quant.input_scale]] if quant.input_scale is not None else [])
               + ([quant.refit.digest, quant.refit.source] if quant.refit is not None else [])
               + ([["outliers", float(quant.outlier_range).hex()]] if quant.outlier_range is not None else [])
               + [["output", float(g[0]).hex(), *g[1:]] for g in (quant.output_grid, quant.outlier_output_grid) if g])
    return json.dumps(payload, separators=(",", ":"))


def candidate_key(layers: Candidate | None) -> str:
    """A stable hash of a candidate: the same layers, ranges and bits give the same key."""
    items = sorted((layers or {}).items())
    return hashlib.sha256(("[" + ",".join(layer_key(n, q) for n, q in items) + "]").encode()).hexdigest()


_CACHE_FORMAT = "sq-pt2e-score-cache/1"


class ScoreCache:
    """Candidate scores on disk, so an interrupted search resumes where it stopped.

    One JSON file per evaluation context (model weights, dev audio, transcripts,
    decoder): ``{"format", "context", "scores": {candidate_key: {"wer", "kl"}}}``.
    Every new score rewrites the file atomically (temporary file + ``os.replace``);
    floats round-trip exactly through JSON, so a resumed search gives the same plan
    byte for byte.

    Args:
        path: the cache file (created on the first score).
        context: fingerprint of what scores depend on (:meth:`Evaluator.fingerprint`).

    Raises:
        SearchStateError: the file is not a score cache, or belongs to another context.
    """

    def __init__(self, path: str | os.PathLike[str], context: str) -> None:
        self.path = Path(path)
        self.context = context
        self.scores: dict[str, Score] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SearchStateError(f"score cache {self.path} is unreadable ({exc}); delete it to start over") from exc
        if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
            raise SearchStateError(f"{self.path} is not a score cache (expected format {_CACHE_FORMAT!r})")
        if data.get("context") != self.context:
            msg = (f"score cache {self.path} was written for another model, dev set or decoder "
                   f"(context {str(data.get('context'))[:12]}..., this search {self.context[:12]}...): "
                   "pass another --score-cache path or delete the file")
            raise SearchStateError(msg)
        self.scores = {k: Score(v["wer"], v["kl"]) for k, v in data["scores"].items()}

    def __contains__(self, key: str) -> bool:
        return key in self.scores

    def __len__(self) -> int:
        return len(self.scores)

    def get(self, key: str) -> Score | None:
        """The stored score of candidate ``key``, or None."""
        return self.scores.get(key)

    def put(self, key: str, score: Score) -> None:
        """Store a score and rewrite the file atomically."""
        self.scores[key] = score
        data = {"format": _CACHE_FORMAT, "context": self.context,
                "scores": {k: {"wer": s.wer, "kl": s.kl} for k, s in sorted(self.scores.items())}}
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")


class Evaluator:
    """Scores simulated candidates on a dev set against the float model's logits.

    Candidates are scored in batches (:meth:`score_many`); this class scores them one
    after the other in this process. ``sq_pt2e.distributed.DistributedEvaluator``
    scores the same batches as (candidate x dev shard) tasks on Ray or a process
    pool and merges per-utterance results into identical scores. Scores are
    remembered by :func:`candidate_key` (and stored in ``cache`` when given), so no
    candidate is simulated twice. ``stage_cache`` (:class:`sq_pt2e.replay.StageCache`; None
    turns it off) keeps the stage outputs of the candidates scored, so a candidate replays
    the part of the model before its first change (the scores are the same to the bit).

    Args:
        model: the float model (weight norm is folded in place, as simulation needs).
        waves: dev waveforms, ``(1, samples)`` each (any lengths).
        references: transcripts for WER (None: KL only).
        decode: logits ``(frames, vocab)`` -> text; default CTC greedy decoding.
        cache: a score-cache file (:class:`ScoreCache`) to resume an interrupted search.

    Raises:
        ValueError: empty dev set, or as many references as waveforms missing.
        SearchStateError: ``cache`` belongs to another model or dev set.
    """

    def __init__(
        self,
        model: nn.Module,
        waves: Sequence[torch.Tensor],
        references: Sequence[str] | None = None,
        decode: Callable[[torch.Tensor], str] | None = None,
        *,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if not waves:
            raise ValueError("the dev set is empty: pass at least one waveform")
        if references is not None and len(references) != len(waves):
            raise ValueError(f"{len(references)} references for {len(waves)} dev waveforms")
        fold_weight_norm(to_ctc_logits(model))
        self.model = model
        self.waves = list(waves)
        self.references = list(references) if references is not None else None
        self.decode = decode or greedy_transcript
        self.evaluations = 0
        self.cached = 0
        self.seconds = 0.0
        self._memo: dict[str, Score] = {}
        self.stage_cache = self._new_stage_cache()
        self.float_score = self._prepare()
        self.cache = ScoreCache(cache, self.fingerprint()) if cache is not None else None

    def _new_stage_cache(self) -> StageCache | None:
        """The stage cache of the candidates this process scores (None: they run whole)."""
        return new_stage_cache(self.model)

    def _prepare(self) -> Score:
        """Compute the float reference; returns the float model's score."""
        self.float_log_probs = float_log_probs(self.model, self.waves)
        return score_utterances(self.model, self.waves, self.float_log_probs, self.references, self.decode,
                                None, self.stage_cache).score()

    def fingerprint(self) -> str:
        """A hash of everything a score depends on besides the candidate."""
        digest = hashlib.sha256(_CACHE_FORMAT.encode())
        for name, tensor in sorted(to_ctc_logits(self.model).state_dict().items()):
            hash_tensor(digest, tensor, f"{name}:")
        for i, wave in enumerate(self.waves):
            hash_tensor(digest, wave, f"wave{i}:")
        digest.update(json.dumps(self.references).encode())
        digest.update(f"{getattr(self.decode, '__module__', '')}.{getattr(self.decode, '__qualname__', '')}".encode())
        return digest.hexdigest()

    def __call__(self, layers: Candidate | None) -> Score:
        """Score one candidate (None: the float model)."""
        if layers is None:
            return self.float_score
        return self.score_many([layers])[0]

    def score_many(self, candidates: Sequence[Candidate], *,
                   on_score: Callable[[int, Score], None] | None = None) -> list[Score]:
        """Score independent candidates; the result is in the order given.

        Args:
            candidates: the candidates (identical ones are simulated once).
            on_score: called with ``(index, score)`` as each score becomes known
                (stored ones first), e.g. to advance a progress bar.

        Returns:
            One :class:`Score` per candidate.
        """
        start = time.perf_counter()
        keys = [candidate_key(c) for c in candidates]
        scores: list[Score | None] = [None] * len(candidates)
        todo: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            known = self._memo.get(key) or (self.cache.get(key) if self.cache is not None else None)
            if known is None:
                todo.setdefault(key, []).append(i)
                continue
            self.cached += key not in self._memo
            self._memo[key] = scores[i] = known
            if on_score is not None:
                on_score(i, known)
        unique = list(todo)
        for j, score in self._score_uncached([candidates[todo[k][0]] for k in unique]):
            key = unique[j]
            self._memo[key] = score
            if self.cache is not None:
                self.cache.put(key, score)
            self.evaluations += 1
            for i in todo[key]:
                scores[i] = score
                if on_score is not None:
                    on_score(i, score)
        self.seconds += time.perf_counter() - start
        missing = [i for i, s in enumerate(scores) if s is None]
        if missing:
            raise SearchStateError(f"candidates {missing[:5]} got no score from {type(self).__name__}")
        return [s for s in scores if s is not None]

    def _score_uncached(self, candidates: Sequence[Candidate]) -> Iterator[tuple[int, Score]]:
        """Simulate candidates; yields ``(index, score)`` in any order (here: in order)."""
        for j, layers in enumerate(candidates):
            yield j, score_utterances(self.model, self.waves, self.float_log_probs, self.references, self.decode,
                                      layers, self.stage_cache).score()


def layer_groups(modules: Sequence[QuantizableModule], granularity: str) -> dict[str, list[str]]:
    """Group layer names: by Transformer block (``...layers.N``) or one group per layer."""
    groups: dict[str, list[str]] = {}
    for m in modules:
        match = _BLOCK.match(m.name) if granularity == "block" else None
        key = match.group(1) if match and "conv_layers" not in m.name else m.name
        groups.setdefault(key, []).append(m.name)
    return groups


def clip_histogram(hist: AbsHistogram, clip: float) -> AbsHistogram:
    """The histogram of ``min(|x|, clip)``: mass above ``clip`` moves into clip's bin."""
    if clip >= hist.max_abs:
        return hist
    index = min(int(clip / hist.bin_width), len(hist.counts) - 1)
    counts = hist.counts.copy()
    counts[index] += counts[index + 1 :].sum()
    counts[index + 1 :] = 0.0
    floor = None if hist.min_value is None else max(hist.min_value, -clip)
    return AbsHistogram(counts, hist.upper, clip, floor)


@dataclass
class SearchReport:
    """Evidence behind a plan: every score the search computed, and its cost.

    ``kept_mse`` holds the sensitive groups whose MSE range beat every clip
    percentile (``start="mse"``), with that score. ``refinements`` lists the choices a
    later pass of step 2 changed (``SearchConfig.passes``); ``percentile_trials`` holds
    each group's trials from the last pass that visited it.

    ``promotion_trials`` holds, with mixed precision (``SearchConfig.promote_weight_bits``),
    each group's score with its weights promoted and its weight count; ``promoted_groups``
    the groups promoted, in the order chosen, and ``promoted_share`` their share of the weights.
    ``float_trials``, ``float_groups`` and ``kept_float_share`` are the same for the float
    fallback (``SearchConfig.float_share``), with FLOPs in place of weights.

    ``smoothing_trials`` holds, when :func:`run_search` chose the smoothing strength, the final
    dev score, evaluations and seconds of the search at each ``SearchConfig.smooth_alphas``
    value (keyed by alpha); ``evaluations`` and ``seconds`` then count all those searches.

    ``split_trials`` holds the scores of an outlier split at each of ``SearchConfig.split_percentiles``:
    of all splittable groups together (``SearchConfig.split_scope``; keyed by their names joined by ``" + "``), then
    of each alone; ``split_groups`` the groups that took a split, with its percentile, and
    ``split_flops_share`` the FLOPs the splits add, as a share of the searched layers' FLOPs.

    ``refit_layers`` are the layers given reconstructed weights (``SearchConfig.refit_ops``),
    ``refit_trial`` the dev scores without (``"before"``) and with (``"after"``) them and
    the seconds the fit took; ``refit_kept`` whether the plan keeps them. ``rounding_trial``
    holds the same for the refit with GPTQ rounding (``SearchConfig.round_ops``): its
    ``"layers"``, dev score (``"after"``) and ``"seconds"``; ``rounding_kept`` whether the plan
    keeps those weights (then instead of the plain refit's).

    ``evaluations`` counts candidates simulated by this search; ``cached_evaluations``
    those whose score came from the score cache (a resumed search).
    """

    float_score: Score
    all_max_score: Score | None = None
    final_score: Score | None = None
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    sensitive_groups: list[str] = field(default_factory=list)
    percentile_trials: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    chosen_percentiles: dict[str, float] = field(default_factory=dict)
    kept_mse: dict[str, dict[str, float]] = field(default_factory=dict)
    refinements: list[dict[str, object]] = field(default_factory=list)
    promotion_trials: dict[str, dict[str, float]] = field(default_factory=dict)
    promoted_groups: list[str] = field(default_factory=list)
    promoted_share: float = 0.0
    float_trials: dict[str, dict[str, float]] = field(default_factory=dict)
    float_groups: list[str] = field(default_factory=list)
    kept_float_share: float = 0.0
    smoothing_trials: dict[str, dict[str, float]] = field(default_factory=dict)
    split_trials: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    split_groups: dict[str, float] = field(default_factory=dict)
    split_flops_share: float = 0.0
    refit_layers: list[str] = field(default_factory=list)
    refit_trial: dict[str, object] = field(default_factory=dict)
    refit_kept: bool = False
    rounding_trial: dict[str, object] = field(default_factory=dict)
    rounding_kept: bool = False
    evaluations: int = 0
    cached_evaluations: int = 0
    seconds: float = 0.0
    config: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class _WithOutputGrids:
    """An evaluator's scores of candidates as the ``xnnpack`` target runs them: each int8 layer's
    output on its int8 grid (``SearchConfig.target``); everything else is the wrapped evaluator's."""

    def __init__(self, evaluator: Evaluator, grids: OutputGridCalibrator) -> None:
        self._evaluator, self._grids = evaluator, grids

    def __getattr__(self, name: str) -> object:
        return getattr(self._evaluator, name)

    def __call__(self, layers: Candidate | None) -> Score:
        return self._evaluator(None if layers is None else self._grids(layers))

    def score_many(self, candidates: Sequence[Candidate], *,
                   on_score: Callable[[int, Score], None] | None = None) -> list[Score]:
        with_grids = [self._grids(c) for c in candidates]
        if not hasattr(self._evaluator, "score_many"):  # a plain callable evaluator
            return [self._evaluator(c) for c in with_grids]
        return self._evaluator.score_many(with_grids, on_score=on_score)


def _score_batch(evaluator: Evaluator, candidates: list[Candidate], desc: str, bar: bool | None) -> list[Score]:
    """Score a batch of independent candidates, with a progress bar when ``bar`` allows."""
    score_many = getattr(evaluator, "score_many", None)
    if score_many is None:  # a plain callable evaluator
        return [evaluator(c) for c in candidates]
    from tqdm.auto import tqdm

    with tqdm(total=len(candidates), desc=desc, unit="cand", disable=None if bar is None else not bar,
              leave=False) as pbar:
        return score_many(candidates, on_score=lambda _i, _s: pbar.update())


def searched_modules(model: nn.Module, config: SearchConfig) -> list[QuantizableModule]:
    """The layers the search quantizes: all but ``skip_ops`` kinds and ``keep_float`` names."""
    return [m for m in quantizable_modules(model) if m.op not in config.skip_ops and not _kept_float(m.name, config)]


def _kept_float(name: str, config: SearchConfig) -> bool:
    return any(re.search(pattern, name) for pattern in config.keep_float)


def smoothed_layers(model: nn.Module, config: SearchConfig) -> list[str]:
    """Layers whose inputs ``config`` smooths: searched ``smooth_ops`` layers with more than one input channel."""
    if config.smooth_alpha <= 0.0:
        return []
    return [m.name for m in searched_modules(model, config)
            if m.op in config.smooth_ops and m.module.weight.shape[1] > 1]


def search_input_scales(model: nn.Module, waves: Sequence[torch.Tensor], config: SearchConfig,
                        ) -> dict[str, tuple[float, ...]]:
    """The smoothing factors ``config`` asks for, from per-channel maxima on ``waves`` ({} without smoothing)."""
    from sq_pt2e.smoothing import channel_maxima, smoothing_scales

    names = smoothed_layers(model, config)
    if not names:
        return {}
    maxima = channel_maxima(model, waves, names)
    modules = {m.name: m.module for m in quantizable_modules(model)}
    return {n: smoothing_scales(maxima[n], modules[n].weight, config.smooth_alpha) for n in names}


@dataclass(frozen=True)
class SearchCalibration:
    """The calibration a search ran on: histograms, smoothing factors, and the alpha they were made with."""

    statistics: dict[str, AbsHistogram]
    input_scales: dict[str, tuple[float, ...]]
    smooth_alpha: float


CalibrationCache = dict[tuple[object, ...], tuple[dict[str, AbsHistogram], dict[str, tuple[float, ...]]]]
# collect(model, waves, input_scales) -> {layer: histogram of its (scaled) input}
HistogramCollector = Callable[[nn.Module, Sequence[torch.Tensor], dict[str, tuple[float, ...]]],
                              dict[str, AbsHistogram]]


def run_search(model: nn.Module, calibration: Sequence[torch.Tensor], evaluator: Evaluator,
               config: SearchConfig | None = None, *, model_name: str = "",
               progress: Callable[[str], None] | None = None, progress_bar: bool | None = None,
               cache: CalibrationCache | None = None, collect: HistogramCollector | None = None,
               ) -> tuple[QuantPlan, SearchReport, SearchCalibration]:
    """The whole search: calibrate, then :func:`search_plan`, once per smoothing strength to choose from.

    With several ``config.smooth_alphas`` (and layers to smooth) the model is calibrated and
    searched at each; the plan with the lowest final dev score (``config.criterion``) wins,
    ties going to the earlier alpha. Its report lists every alpha's final score in
    ``smoothing_trials`` and counts the evaluations and seconds of all the searches.

    Args:
        model: the float model.
        calibration: calibration waveforms (histograms, smoothing factors, weight reconstruction).
        evaluator: scores candidates on the dev set.
        config: search settings.
        model_name: recorded in the plan.
        progress: called with a short line per step.
        progress_bar: as in :func:`search_plan`.
        cache: a dict kept by the caller: the calibration of each smoothing setting, reused
            by later searches on the same model and audio (e.g. at other bit widths).
        collect: collects the histograms (default :func:`collect_statistics`; e.g. on a cluster).

    Returns:
        ``(plan, report, calibration)`` of the chosen alpha.
    """
    config = config or SearchConfig()
    say = progress or (lambda _line: None)
    cache = {} if cache is None else cache
    alphas = list(dict.fromkeys(config.smooth_alphas))
    if len(alphas) < 2 or not smoothed_layers(model, dataclasses.replace(config, smooth_alpha=1.0)):
        alphas = alphas[:1] if alphas else [config.smooth_alpha]
    # XNNPACK's output grids do not depend on the smoothing: one calibrator serves every alpha
    output_grids = OutputGridCalibrator(model, calibration) if config.target == "xnnpack" else None
    results = []
    for alpha in alphas:
        at = dataclasses.replace(config, smooth_alpha=alpha)
        key = (alpha if smoothed_layers(model, at) else 0.0, config.smooth_ops, config.skip_ops, config.keep_float)
        if key not in cache:
            cache[key] = search_statistics(model, calibration, at, collect=collect)
        statistics, scales = cache[key]
        if len(alphas) > 1:
            say(f"smoothing alpha {alpha:g}:")
        plan, report = search_plan(model, statistics, evaluator, at, model_name=model_name, progress=progress,
                                   progress_bar=progress_bar, input_scales=scales, calibration=calibration,
                                   output_grids=output_grids)
        results.append((plan, report, SearchCalibration(statistics, scales, alpha)))
    best = min(range(len(results)), key=lambda i: results[i][1].final_score.key(config.criterion))
    plan, report, calibrated = results[best]
    if len(results) > 1:
        report.smoothing_trials = {f"{c.smooth_alpha:g}": {**r.final_score.as_dict(), "evaluations": r.evaluations,
                                                            "seconds": r.seconds} for _, r, c in results}
        report.evaluations = sum(r.evaluations for _, r, _ in results)
        report.cached_evaluations = sum(r.cached_evaluations for _, r, _ in results)
        report.seconds = sum(r.seconds for _, r, _ in results)
        say("smoothing: " + ", ".join(f"alpha {a}: KL {t['kl']:.3g}" for a, t in report.smoothing_trials.items())
            + f"; chose {calibrated.smooth_alpha:g}")
    return plan, report, calibrated


def search_statistics(model: nn.Module, waves: Sequence[torch.Tensor], config: SearchConfig | None = None, *,
                      collect: HistogramCollector | None = None,
                      ) -> tuple[dict[str, AbsHistogram], dict[str, tuple[float, ...]]]:
    """The search's calibration: smoothing factors (when configured), then histograms of the scaled inputs.

    Args:
        model: the float model.
        waves: calibration waveforms.
        config: search settings (smoothing).
        collect: ``collect(model, waves, input_scales)`` -> histograms; default
            :func:`collect_statistics` in this process.

    Returns:
        ``(statistics, input_scales)``; pass both to :func:`search_plan`.
    """
    scales = search_input_scales(model, waves, config or SearchConfig())
    if collect is None:
        return collect_statistics(model, waves, input_scales=scales), scales
    return collect(model, waves, scales), scales


def search_plan(
    model: nn.Module,
    statistics: dict[str, AbsHistogram],
    evaluator: Evaluator,
    config: SearchConfig | None = None,
    *,
    model_name: str = "",
    progress: Callable[[str], None] | None = None,
    progress_bar: bool | None = None,
    input_scales: dict[str, tuple[float, ...]] | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    output_grids: OutputGridCalibrator | None = None,
) -> tuple[QuantPlan, SearchReport]:
    """Run StableQuant steps 1-3 and return the plan with its report.

    Independent candidates are scored as one batch (``evaluator.score_many``): all
    sensitivity candidates at once, then the percentile grid of each sensitive group
    (groups in network order, each starting from the previous groups' choices). A
    distributed evaluator runs a batch in parallel; the plan is the same.

    Args:
        model: the float model (statistics were collected on it).
        statistics: from :func:`search_statistics` (or :func:`collect_statistics`) on calibration audio.
        evaluator: scores candidates on the dev set (:class:`Evaluator` or
            ``sq_pt2e.distributed.DistributedEvaluator``).
        config: search settings.
        model_name: recorded in the plan.
        progress: called with a short line per step (e.g. ``tqdm.write``).
        progress_bar: tqdm bars for the sensitivity step and each percentile search:
            True shows them, False hides them, None shows them on a terminal only.
        input_scales: the smoothing factors ``statistics`` were collected with
            (:func:`search_statistics`); every candidate and the plan carry them. Required
            (``{}`` allowed) when ``config`` smooths any layer.
        calibration: the calibration waveforms, for the weight reconstruction of the
            ``config.refit_ops`` layers and the output grids of ``config.target="xnnpack"``;
            required when there are such layers or that target.
        output_grids: with ``config.target="xnnpack"``, the output grids to reuse (searches of
            the same model on the same calibration audio share one); default a new one.

    Returns:
        ``(plan, report)``; the plan has a fixed range for every quantized layer.

    Example:
        >>> evaluator = Evaluator(model, dev_waves, cache="out/scores.json")  # resumable
        >>> statistics, scales = search_statistics(model, calib)
        >>> plan, report = search_plan(model, statistics, evaluator, input_scales=scales, calibration=calib)
    """
    config = config or SearchConfig()
    say = progress or (lambda _line: None)
    start = time.perf_counter()
    evaluations_before, cached_before = getattr(evaluator, "evaluations", 0), getattr(evaluator, "cached", 0)
    modules = searched_modules(model, config)
    missing = sorted({m.name for m in modules} - set(statistics))
    if missing:
        raise ValueError(f"no calibration statistics for {len(missing)} layer(s), e.g. {missing[:3]}")
    qmax = 2 ** (config.act_bits - 1) - 1
    affine = config.act_scheme == "affine"
    hist = {m.name: statistics[m.name] for m in modules}
    max_range = {n: range_max(h) for n, h in hist.items()}
    mse_range = {n: range_mse(h, qmax, affine=affine) for n, h in hist.items()}
    groups = layer_groups(modules, config.granularity)
    report = SearchReport(evaluator.float_score, config=dataclasses.asdict(config))

    smoothed = smoothed_layers(model, config) if input_scales is None else []
    if smoothed:
        raise ValueError(f"smooth_alpha={config.smooth_alpha} smooths the inputs of {len(smoothed)} "
                         "layer(s), but no input_scales were given: calibrate with search_statistics(model, waves, "
                         "config) and pass both, or set smooth_alpha=0")
    scales = input_scales or {}
    refit_names = [m.name for m in modules if m.op in config.refit_ops]
    rounds = bool(config.refit_ops) and config.weight_bits <= config.round_max_bits
    rounded_names = [m.name for m in modules if m.op in config.refit_ops + config.round_ops] if rounds else []
    if (refit_names or rounded_names) and calibration is None:
        raise ValueError(f"refit_ops={config.refit_ops} refits {len(refit_names or rounded_names)} layer(s), but no "
                         "calibration audio was given: pass calibration=waves, or set refit_ops=()")
    if config.target == "xnnpack":
        if calibration is None:
            raise ValueError("target='xnnpack' calibrates the int8 output grids of XNNPACK's layers: pass "
                             "calibration=waves")
        evaluator = _WithOutputGrids(evaluator, output_grids or OutputGridCalibrator(model, calibration))
    unknown = sorted(set(scales) - set(hist))
    if unknown:
        raise ValueError(f"input_scales for layers that are not searched: {unknown[:3]}")

    def weight_bits(name: str, promoted: set[str]) -> int:
        return config.promote_weight_bits if name in promoted and config.promote_weight_bits else config.weight_bits

    outliers: dict[str, float] = {}  # outlier ranges of the layers with an outlier split

    def quant(ranges: dict[str, float], promoted: set[str] = frozenset(),
              split: dict[str, float] | None = None) -> Candidate:
        return _candidate(ranges, hist, scales, config, {n: weight_bits(n, promoted) for n in ranges},
                          outliers if split is None else split)

    # Step 1: sensitivity of each group, quantized alone with max ranges (one batch, with all-max first).
    float_score = evaluator.float_score
    batch = [quant(max_range)] + [quant({n: max_range[n] for n in names}) for names in groups.values()]
    all_max, *group_scores = _score_batch(evaluator, batch, "sensitivity", progress_bar)
    report.all_max_score = all_max
    for (group, _names), score in zip(groups.items(), group_scores, strict=True):
        delta = (score.wer - float_score.wer) if score.wer is not None and float_score.wer is not None else None
        if config.criterion == "wer" and delta is not None:
            sensitive = delta > config.gamma
        else:
            sensitive = score.kl > config.kl_share * all_max.kl
        report.sensitivity[group] = {"kl": score.kl,
                                     **({"wer": score.wer, "delta_wer": delta} if delta is not None else {})}
        if sensitive:
            report.sensitive_groups.append(group)
        say(f"sensitivity {group}: kl {score.kl:.3g}" + (f", dWER {delta:+.2f}" if delta is not None else "")
            + (" SENSITIVE" if sensitive else ""))

    def candidate_range(name: str, percentile: float) -> float:
        clip = range_percentile(hist[name], percentile)
        return range_mse(clip_histogram(hist[name], clip), qmax, affine=affine) if config.reading == "mse-all" else clip

    def group_ranges(group: str, option: float | None) -> dict[str, float]:
        """The ranges of ``group``'s layers under one search option (None: their MSE ranges)."""
        return {n: mse_range[n] if option is None else candidate_range(n, option) for n in groups[group]}

    # Step 3 ranges for the non-sensitive layers (and starting point for the rest).
    chosen = dict(mse_range)
    if config.start == "max":
        for group in report.sensitive_groups:
            chosen |= group_ranges(group, 100.0)
    # Step 2: percentile search per sensitive group, in network order; one batch per group.
    # Later passes revisit every group with all others at their chosen ranges (coordinate descent).
    options: list[float | None] = ([None] if config.start == "mse" else []) + list(config.percentiles)
    current: dict[str, float | None] = {}
    for pass_number in range(1, config.passes + 1):
        changes = 0
        for group in report.sensitive_groups:
            if group in current:  # the current choice first: ties keep it
                order = [current[group]] + [o for o in options if o != current[group]]
            else:
                order = options
            batch = [quant(chosen | group_ranges(group, o)) for o in order]
            scores = _score_batch(evaluator, batch, f"pass {pass_number} {group}", progress_bar)
            best_index = min(range(len(order)), key=lambda i: scores[i].key(config.criterion))
            choice, score = order[best_index], scores[best_index]
            scored = dict(zip(order, scores, strict=True))
            report.percentile_trials[group] = [  # in the config's order, whatever order they were tried in
                {"percentile": p, **scored[p].as_dict()}
                for p in config.percentiles]
            if group in current and choice != current[group]:
                changes += 1
                report.refinements.append({"pass": pass_number, "group": group, "from": current[group],
                                           "to": choice, "kl": score.kl})
            current[group] = choice
            chosen |= group_ranges(group, choice)
            report.kept_mse.pop(group, None)
            report.chosen_percentiles.pop(group, None)
            if choice is None:
                report.kept_mse[group] = score.as_dict()
            else:
                report.chosen_percentiles[group] = choice
            say(f"pass {pass_number} {group}: " + ("MSE range (no percentile beats it)" if choice is None
                                                    else f"p={choice}"))
        if pass_number > 1 and changes == 0:
            break
    @functools.cache
    def searched_flops() -> dict[str, int]:
        """Each searched layer's FLOPs (1 s of audio): the split budget and the float fallback weigh by them."""
        return layer_flops(model, [m.name for m in modules])

    op_of = {m.name: m.op for m in modules}
    scope = report.sensitive_groups if config.split_scope == "sensitive" else list(groups)
    splittable = [g for g in scope if config.split_percentiles  # a group splits whole, or not
                  and all(op_of[n] in config.split_ops for n in groups[g])]
    if splittable:
        _SplitStep(groups, evaluator, hist, quant, searched_flops(), config, report, progress_bar, say).run(
            splittable, chosen, outliers)
    promoted: set[str] = set()
    if config.promote_weight_bits is not None:
        report.promoted_groups, report.promotion_trials, report.promoted_share = _upgrade_groups(
            evaluator, groups, promotion_costs(modules, config),
            lambda names: quant(chosen, names), config.promote_share, "weights", "mixed precision", progress_bar)
        promoted = {n for g in report.promoted_groups for n in groups[g]}
        say(f"mixed precision: {len(report.promoted_groups)} group(s) at W{config.promote_weight_bits} "
            f"({report.promoted_share:.0%} of {promoted_share_unit(config.target)})")

    def without(floated: set[str], refits: Mapping[str, RefitWeights] | None = None) -> Candidate:
        """The plan as chosen, with the ``floated`` layers left in float and ``refits`` swapped in."""
        return _with_refits(quant({n: r for n, r in chosen.items() if n not in floated}, promoted), refits or {})

    fallback_groups = dict(groups)
    stuck = [g for g in groups if g in report.kept_mse]
    if len(stuck) > 1:  # their errors may offset each other: floating one alone can make things worse
        fallback_groups[JOINT.join(stuck)] = [n for g in stuck for n in groups[g]]
    if config.float_share > 0:
        # weigh each group's int8 error as the final plan will have it: after weight reconstruction
        provisional = reconstruct_layers(model, without(set()), refit_names, calibration or []) if refit_names else {}
        report.float_groups, report.float_trials, report.kept_float_share = _upgrade_groups(
            evaluator, fallback_groups, searched_flops(),
            lambda floated: without(floated, provisional), config.float_share, "flops", "float fallback",
            progress_bar)
        say(f"float fallback: {len(report.float_groups)} group(s) kept float "
            f"({report.kept_float_share:.0%} of the FLOPs)")
    final = without({n for g in report.float_groups for n in fallback_groups[g]})
    final = _refit_step(model, final, [n for n in refit_names if n in final], [n for n in rounded_names if n in final],
                        calibration or [], evaluator, config, report, say)
    report.final_score = evaluator(final)
    report.evaluations = getattr(evaluator, "evaluations", 0) - evaluations_before
    report.cached_evaluations = getattr(evaluator, "cached", 0) - cached_before
    report.seconds = time.perf_counter() - start
    every = quantizable_modules(model)
    kept_float = [m for m in every if m.op not in config.skip_ops and m.name not in hist]
    plan = _to_plan(modules, groups, final, report, config, model_name, kept_float)
    plan = dataclasses.replace(plan, refits={n: q.refit for n, q in final.items() if q.refit is not None})
    position = {m.name: i for i, m in enumerate(every)}
    return dataclasses.replace(plan, layers=tuple(sorted(plan.layers, key=lambda la: position[la.name]))), report


def _candidate(ranges: dict[str, float], hist: dict[str, AbsHistogram], scales: dict[str, tuple[float, ...]],
               config: SearchConfig, weight_bits: dict[str, int] | None = None,
               outliers: Mapping[str, float] | None = None) -> Candidate:
    """Layers at ``ranges`` with the config's bits, weight ranges and grids (affine floors from ``hist``),
    and an outlier split where ``outliers`` gives its range."""
    affine = config.act_scheme == "affine"
    candidate = {}
    for name, act_range in ranges.items():
        bits = (weight_bits or {}).get(name, config.weight_bits)
        candidate[name] = LayerQuant(act_range, config.act_bits, bits, config.weight_calibration_at(bits),
                                     act_floor(hist[name], act_range) if affine else None, scales.get(name),
                                     outlier_range=(outliers or {}).get(name))
    return candidate


@dataclass
class _SplitStep:
    """The outlier-split step: try splits of groups of CNN convs, keep those that pay (KL gain, FLOPs budget).

    ``flops`` are the FLOPs of each searched layer; a split runs its layers twice, so it adds
    their FLOPs, and all kept splits together may add at most ``config.split_max_flops`` of
    the searched layers' total.
    """

    groups: dict[str, list[str]]
    evaluator: Evaluator
    hist: dict[str, AbsHistogram]
    quant: Callable[..., Candidate]
    flops: dict[str, int]
    config: SearchConfig
    report: SearchReport
    progress_bar: bool | None
    say: Callable[[str], None]

    def added_share(self, names: Iterable[str]) -> float:
        """The FLOPs that splitting ``names`` adds, as a share of the searched layers' FLOPs."""
        return sum(self.flops[n] for n in set(names)) / max(sum(self.flops.values()), 1)

    def run(self, splittable: list[str], chosen: dict[str, float], outliers: dict[str, float]) -> None:
        """All ``splittable`` groups together first (their errors can offset each other, so one alone
        may not gain), then each; ``chosen`` and ``outliers`` take the kept splits."""
        for members in ([splittable] if len(splittable) > 1 else []) + [[g] for g in splittable]:
            self.try_split(members, chosen, outliers)
        self.report.split_flops_share = self.added_share(outliers)

    def try_split(self, members: list[str], chosen: dict[str, float], outliers: dict[str, float]) -> None:
        """Try an outlier split of the ``members`` groups' layers together at each split percentile (one batch).

        The best split replaces their current ranges in ``chosen`` (and enters ``outliers``) when
        it lowers the dev logit KL by ``config.split_gain`` of the current KL; ``report`` gets
        every trial (under the members' names joined by :data:`JOINT`).
        """
        config, label = self.config, JOINT.join(members)
        names = [n for g in members for n in self.groups[g]]
        cost = self.added_share(list(outliers) + names)
        if cost > config.split_max_flops:
            self.say(f"outlier split {label}: not tried, it would add {cost:.0%} of the searched layers' FLOPs "
                     f"(split_max_flops {config.split_max_flops:.0%})")
            return
        options: list[tuple[float, dict[str, float], dict[str, float]]] = []
        for p in config.split_percentiles:
            ranges = {n: range_percentile(self.hist[n], p) for n in names}
            split = {n: range_max(self.hist[n]) - ranges[n] for n in names}
            if all(r > 1e-6 * range_max(self.hist[n]) for n, r in split.items()):
                options.append((p, ranges, split))
        if not options:
            return
        batch = [self.quant(chosen)] + [self.quant(chosen | ranges, split=outliers | split)
                                        for _, ranges, split in options]
        current, *scores = _score_batch(self.evaluator, batch, f"outlier split {label}", self.progress_bar)
        self.report.split_trials[label] = [{"percentile": p, **score.as_dict()}
                                           for (p, _, _), score in zip(options, scores, strict=True)]
        best = min(range(len(options)), key=lambda i: scores[i].key(config.criterion))
        gain = current.kl - scores[best].kl
        if scores[best].key(config.criterion) >= current.key(config.criterion) or gain < config.split_gain * current.kl:
            self.say(f"outlier split {label}: none lowers the dev KL by {config.split_gain:.0%} (best "
                     f"{scores[best].kl:.3g}, current ranges {current.kl:.3g})")
            return
        p, ranges, split = options[best]
        chosen.update(ranges)
        outliers.update(split)
        for group in members:
            self.report.split_groups[group] = p
            self.report.chosen_percentiles.pop(group, None)
            self.report.kept_mse.pop(group, None)
        self.say(f"outlier split {label}: at p={p:g}, KL {current.kl:.3g} -> {scores[best].kl:.3g} "
                 f"(splits now add {self.added_share(outliers):.0%} of the searched layers' FLOPs)")


def _refit_step(model: nn.Module, final: Candidate, names: list[str], rounded_names: list[str],
                calibration: Sequence[torch.Tensor], evaluator: Evaluator, config: SearchConfig, report: SearchReport,
                say: Callable[[str], None]) -> Candidate:
    """The final candidate with reconstructed weights: for ``names`` (least squares), or for
    ``rounded_names`` (least squares, then GPTQ rounding), whichever lowers the dev score most;
    unchanged if neither lowers it."""
    if not names and not rounded_names:
        return final
    before = evaluator(final)
    best, best_score = final, before

    def trial(layers: list[str], label: str, round_weights: bool) -> tuple[Candidate, Score, dict[str, object], bool]:
        """Reconstruct ``layers``, score the result; whether it beats the best so far, and its record."""
        start = time.perf_counter()
        candidate = _with_refits(final, reconstruct_layers(model, final, layers, calibration,
                                                           round_weights=round_weights))
        seconds = time.perf_counter() - start  # the fit, as the report says
        after = evaluator(candidate)
        record = {"before": before.as_dict(), "after": after.as_dict(), "seconds": seconds}
        better = after.key(config.criterion) < best_score.key(config.criterion)
        say(f"{label} of {len(layers)} layer(s): dev KL {before.kl:.3g} -> {after.kl:.3g}, "
            + ("kept" if better else "not kept"))
        return candidate, after, record, better

    if names:
        refit, score, report.refit_trial, report.refit_kept = trial(names, "weight reconstruction", False)
        report.refit_layers = list(names)
        if report.refit_kept:
            best, best_score = refit, score
    if rounded_names:
        rounded, _, record, report.rounding_kept = trial(rounded_names, "weight reconstruction with GPTQ rounding",
                                                         True)
        report.rounding_trial = {"layers": list(rounded_names), **record}
        if report.rounding_kept:
            best, report.refit_kept = rounded, False
    return best


def _refit_reason(quant: LayerQuant, report: SearchReport) -> str:
    """What the plan's ``reason`` says of a layer's reconstructed weights ("" without)."""
    if quant.refit is None:
        return ""
    return "; weights reconstructed for its int8 input" + (" and GPTQ-rounded to their grid"
                                                            if report.rounding_kept else "")


def _with_refits(candidate: Candidate, refits: Mapping[str, RefitWeights]) -> Candidate:
    """``candidate`` with each layer named in ``refits`` computing with those weights."""
    return {n: q.with_refit(refits[n]) if n in refits else q for n, q in candidate.items()}


def promoted_share_unit(target: str) -> str:
    """What ``promote_share`` is a share of on ``target`` (see :func:`promotion_costs`)."""
    return "the weights the .pte packs" if target == "xnnpack" else "the weights"


def promotion_costs(modules: Sequence[QuantizableModule], config: SearchConfig) -> dict[str, int]:
    """The weights each layer's promotion (mixed precision) counts against ``config.promote_share``.

    Every weight for x86 (the measure of a 4- or 6-bit weight format). For ``target="xnnpack"``
    only weights the ``.pte`` would store smaller at the lower width: Linears packed at
    ``weight_bits`` (4 or fewer) and not at ``promote_weight_bits``; promoting any other layer
    costs no bytes (convolutions are stored in int8 bytes at any width), so it is free.
    """
    def cost(m: QuantizableModule) -> int:
        if config.target != "xnnpack":
            return m.module.weight.numel()
        promoted_bits = config.promote_weight_bits or 8
        shrinks = packs_as_int4(m.op, config.weight_bits) and not packs_as_int4(m.op, promoted_bits)
        return m.module.weight.numel() if shrinks else 0

    return {m.name: cost(m) for m in modules}


def _upgrade_groups(evaluator: Evaluator, groups: dict[str, list[str]], cost: dict[str, int],
                    candidate: Callable[[set[str]], Candidate], share: float, cost_name: str, desc: str,
                    progress_bar: bool | None) -> tuple[list[str], dict[str, dict[str, float]], float]:
    """Groups to upgrade (mixed precision, float fallback): best logit-KL gain per unit of cost.

    ``candidate(names)`` is the plan as chosen with the layers ``names`` upgraded. Each
    group is scored upgraded alone (one batch); groups are taken in order of KL gain per
    unit of ``cost`` while the gain is positive and their cost fits in ``share`` of the
    total (a group that does not fit, or shares layers with one already taken, is passed
    over). ``total`` counts every layer once even when ``groups`` overlap.

    Returns:
        The groups upgraded in the order chosen, each group's trial (its score and cost,
        under the key ``cost_name``), and the share of the cost they take.
    """
    base_score = evaluator(candidate(set()))
    names = list(groups)
    scores = _score_batch(evaluator, [candidate(set(groups[g])) for g in names], desc, progress_bar)
    size = {g: sum(cost[n] for n in groups[g]) for g in names}
    gain = {g: base_score.kl - score.kl for g, score in zip(names, scores, strict=True)}
    trials = {g: {**score.as_dict(), cost_name: float(size[g])} for g, score in zip(names, scores, strict=True)}
    total = sum(cost[n] for n in {n for members in groups.values() for n in members})
    budget, used = share * total, 0
    chosen: list[str] = []
    taken: set[str] = set()
    for g in sorted(names, key=lambda g: -gain[g] / max(1, size[g])):  # stable: ties keep network order
        if gain[g] <= 0:
            break
        if used + size[g] <= budget and not taken & set(groups[g]):
            chosen.append(g)
            used += size[g]
            taken |= set(groups[g])
    return chosen, trials, used / max(1, total)


def _evidence(values: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, float(v)) for k, v in values.items()))


def _to_plan(
    modules: list[QuantizableModule],
    groups: dict[str, list[str]],
    final: Candidate,
    report: SearchReport,
    config: SearchConfig,
    model_name: str,
    kept_float: list[QuantizableModule],
) -> QuantPlan:
    """The plan of the search's ``final`` candidate, each layer with the evidence behind it."""
    group_of = {n: g for g, names in groups.items() for n in names}
    floated = {member: g for g in report.float_groups for member in g.split(JOINT)}
    refit_score = (report.rounding_trial if report.rounding_kept else report.refit_trial).get("after", {})
    layers = [LayerPlan(m.name, op=m.op, skip=True, reason="kept float by the search config (keep_float)")
              for m in kept_float]
    for m in modules:
        group = group_of[m.name]
        evidence = {f"sensitivity_{k}": v for k, v in report.sensitivity[group].items() if v is not None}
        for trial in report.percentile_trials.get(group, []):
            tag = f"p{trial['percentile']:g}"
            evidence |= {f"{tag}_{k}": v for k, v in trial.items() if k != "percentile"}
        for label, trials in report.split_trials.items():
            joint = "joint_" if label != group else ""
            if group in label.split(JOINT):
                evidence |= {f"{joint}split_p{t['percentile']:g}_{k}": v for t in trials for k, v in t.items()
                             if k != "percentile"}
        if group in report.split_groups:
            p = report.split_groups[group]
            kind = "sensitive group" if group in report.sensitive_groups else "group"
            layer = LayerPlan(m.name, op=m.op, calibration="percentile", clip_percentile=p,
                              reason=f"{kind} {group}: outlier split at percentile {p:g} (the inputs above it "
                                     "computed by a second int8 layer with the same weights)")
        elif group in report.kept_mse:
            evidence |= {f"mse_{k}": v for k, v in report.kept_mse[group].items()}
            layer = LayerPlan(m.name, op=m.op, calibration="mse",
                              reason=f"sensitive group {group}: its MSE range beat every clip percentile")
        elif group in report.chosen_percentiles:
            p = report.chosen_percentiles[group]
            method = "mse" if config.reading == "mse-all" else "percentile"
            reason = f"sensitive group {group}: clip at percentile {p:g}" + (
                " then MSE-optimal" if config.reading == "mse-all" else "")
            layer = LayerPlan(m.name, op=m.op, calibration=method,
                              clip_percentile=p if method == "percentile" else None, reason=reason)
        else:
            layer = LayerPlan(m.name, op=m.op, calibration="mse", reason=f"not sensitive ({group}): MSE-optimal range")
        if group in floated:
            trial = report.float_trials[floated[group]]
            evidence |= {f"float_{k}": v for k, v in trial.items()}
            layers.append(LayerPlan(m.name, op=m.op, skip=True, evidence=_evidence(evidence),
                                    reason=f"kept float by the search (float fallback: group {floated[group]} in "
                                           f"float has dev KL {trial['kl']:.3g})"))
            continue
        quant = final[m.name]
        if group in report.promoted_groups:
            trial = report.promotion_trials[group]
            evidence |= {f"promoted_{k}": v for k, v in trial.items()}
            layer = dataclasses.replace(layer, reason=f"{layer.reason}; weights at {quant.weight_bits} bits "
                                                      f"(mixed precision: group KL {trial['kl']:.3g} promoted)")
        layers.append(dataclasses.replace(
            layer, weight_bits=quant.weight_bits, act_bits=quant.act_bits, weight_calibration=quant.weight_calibration,
            act_range=float(quant.act_range), act_scheme="symmetric" if quant.act_floor is None else "affine",
            act_floor=quant.act_floor, input_scale=quant.input_scale, outlier_range=quant.outlier_range,
            refit=None if quant.refit is None else quant.refit.digest,
            reason=layer.reason + _refit_reason(quant, report),
            evidence=_evidence(evidence | ({f"refit_{k}": v for k, v in refit_score.items()}
                                           if quant.refit is not None else {})),
        ))
    skips = tuple(LayerPlan("*", op=op, skip=True, reason="kept float by the search config (skip_ops)")
                  for op in config.skip_ops)
    default = LayerPlan("*", weight_bits=config.weight_bits, act_bits=config.act_bits,
                        weight_calibration=config.resolved_weight_calibration)
    return QuantPlan(default=default, layers=tuple(layers), op_defaults=skips, model=model_name,
                     scored_for=config.target)
