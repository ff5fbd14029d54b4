"""The StableQuant search: layer-adaptive activation ranges for speech models.

Two phases, as in NNCF: statistics are collected once (:func:`collect_statistics`,
one |x| histogram per layer input), then candidates are scored from those stored
histograms, by fake-quantized simulation on the float model, never recalibrating.

Our reading of the paper (arXiv 2504.14915), each choice configurable in
:class:`SearchConfig`:

1. Sensitivity: quantize one layer group at a time with max ranges, the rest
   float; a group whose WER rises more than ``gamma`` points is *sensitive*.
   Logit KL against the float model is recorded as a proxy, and can drive the
   search instead of WER (``criterion="kl"``) where no transcripts exist.
2. Outlier removal: for each sensitive group in network order, try each clip
   percentile of its input histograms; keep the one giving the whole quantized
   model the lowest WER (ties: lower KL).
3. Scale: every other layer gets the MSE-optimal range of its histogram
   (``reading="mse-rest"``); or every layer gets the MSE-optimal range inside its
   clipped histogram (``reading="mse-all"``).
4. The result is a :class:`~sq_pt2e.plan.QuantPlan` with fixed ranges, applied
   through ``StableQuantQuantizer`` -> ``prepare_pt2e`` / ``convert_pt2e``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from sq_pt2e.observers import AbsHistogram, range_max, range_mse, range_percentile
from sq_pt2e.plan import LayerPlan, OpKind, QuantPlan
from sq_pt2e.simulate import LayerQuant, QuantizableModule, collect_statistics, fake_quantized, quantizable_modules

__all__ = [
    "DEFAULT_PERCENTILES",
    "Evaluator",
    "Score",
    "SearchConfig",
    "SearchReport",
    "clip_histogram",
    "collect_statistics",
    "layer_groups",
    "search_plan",
]

DEFAULT_PERCENTILES: tuple[float, ...] = (100.0, 99.999, 99.99, 99.9, 99.8, 99.5, 99.0)
_BLOCK = re.compile(r"^(.*\.layers\.\d+)\.")


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of the search; defaults follow the paper.

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
        weight_calibration: ``"max"`` or ``"mse"`` per-channel weight ranges.
        skip_ops: op kinds kept in float (e.g. ``("grouped_conv1d",)`` for the positional conv).
    """

    gamma: float = 0.25
    kl_share: float = 0.2
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    granularity: Literal["block", "layer"] = "block"
    reading: Literal["mse-rest", "mse-all"] = "mse-rest"
    criterion: Literal["wer", "kl"] = "wer"
    weight_bits: int = 8
    act_bits: int = 8
    weight_calibration: Literal["max", "mse"] = "max"
    skip_ops: tuple[OpKind, ...] = ()

    def __post_init__(self) -> None:
        if not self.percentiles or any(not 0 < p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles={self.percentiles} (expected a non-empty tuple of 0 < p <= 100)")
        if self.gamma < 0 or not 0 <= self.kl_share <= 1:
            raise ValueError(f"gamma={self.gamma} (expected >= 0), kl_share={self.kl_share} (expected 0..1)")


@dataclass(frozen=True)
class Score:
    """Quality of one candidate: WER (percent; None without transcripts) and mean logit KL."""

    wer: float | None
    kl: float

    def key(self, criterion: str) -> tuple[float, ...]:
        if criterion == "wer" and self.wer is not None:
            return (round(self.wer, 9), self.kl)
        return (self.kl,)


class Evaluator:
    """Scores simulated candidates on a dev set against the float model's logits.

    Args:
        model: the float model.
        waves: dev waveforms, ``(1, samples)`` each (any lengths).
        references: transcripts for WER (None: KL only).
        decode: logits ``(frames, vocab)`` -> text; default CTC greedy decoding.
    """

    def __init__(
        self,
        model: nn.Module,
        waves: Sequence[torch.Tensor],
        references: Sequence[str] | None = None,
        decode: Callable[[torch.Tensor], str] | None = None,
    ) -> None:
        if not waves:
            raise ValueError("the dev set is empty: pass at least one waveform")
        if references is not None and len(references) != len(waves):
            raise ValueError(f"{len(references)} references for {len(waves)} dev waveforms")
        self.model = model
        self.waves = list(waves)
        self.references = list(references) if references is not None else None
        self.decode = decode or _greedy_decode
        self.evaluations = 0
        self.seconds = 0.0
        with fake_quantized(model, {}) as float_model, torch.no_grad():
            self.float_log_probs = [torch.log_softmax(float_model(w)[0].double(), -1) for w in self.waves]
        self.float_score = self(None)

    def __call__(self, layers: dict[str, LayerQuant] | None) -> Score:
        start = time.perf_counter()
        hyps, kls = [], []
        with fake_quantized(self.model, layers or {}) as run, torch.no_grad():
            for wave, ref_lp in zip(self.waves, self.float_log_probs, strict=True):
                logits = run(wave)[0]
                log_probs = torch.log_softmax(logits.double(), -1)
                kls.append(float((ref_lp.exp() * (ref_lp - log_probs)).sum(-1).mean()))
                if self.references is not None:
                    hyps.append(self.decode(logits))
        wer = _wer(self.references, hyps) if self.references is not None else None
        if layers is not None:
            self.evaluations += 1
        self.seconds += time.perf_counter() - start
        return Score(wer, float(np.mean(kls)))


def _greedy_decode(logits: torch.Tensor) -> str:
    from sq_pt2e.asr import ctc_greedy_decode

    return ctc_greedy_decode(logits)[0]


def _wer(references: list[str], hypotheses: list[str]) -> float:
    from sq_pt2e.asr import wer

    return float(wer(references, hypotheses))


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
    return AbsHistogram(counts, hist.upper, clip)


@dataclass
class SearchReport:
    """Evidence behind a plan: every score the search computed, and its cost."""

    float_score: Score
    all_max_score: Score | None = None
    final_score: Score | None = None
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    sensitive_groups: list[str] = field(default_factory=list)
    percentile_trials: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    chosen_percentiles: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0
    config: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def search_plan(
    model: nn.Module,
    statistics: dict[str, AbsHistogram],
    evaluator: Evaluator,
    config: SearchConfig | None = None,
    *,
    model_name: str = "",
    progress: Callable[[str], None] | None = None,
) -> tuple[QuantPlan, SearchReport]:
    """Run StableQuant steps 1-3 and return the plan with its report.

    Args:
        model: the float model (statistics were collected on it).
        statistics: from :func:`collect_statistics` on calibration audio.
        evaluator: scores candidates on the dev set.
        config: search settings.
        model_name: recorded in the plan.
        progress: called with a short line per step (e.g. ``tqdm.write``).

    Returns:
        ``(plan, report)``; the plan has a fixed range for every quantized layer.
    """
    config = config or SearchConfig()
    say = progress or (lambda _line: None)
    start = time.perf_counter()
    modules = [m for m in quantizable_modules(model) if m.op not in config.skip_ops]
    missing = sorted({m.name for m in modules} - set(statistics))
    if missing:
        raise ValueError(f"no calibration statistics for {len(missing)} layer(s), e.g. {missing[:3]}")
    qmax = 2 ** (config.act_bits - 1) - 1
    hist = {m.name: statistics[m.name] for m in modules}
    max_range = {n: range_max(h) for n, h in hist.items()}
    mse_range = {n: range_mse(h, qmax) for n, h in hist.items()}
    groups = layer_groups(modules, config.granularity)
    report = SearchReport(evaluator.float_score, config=dataclasses.asdict(config))

    def quant(ranges: dict[str, float]) -> dict[str, LayerQuant]:
        return {n: LayerQuant(r, config.act_bits, config.weight_bits, config.weight_calibration) for n, r in ranges.items()}

    # Step 1: sensitivity of each group, quantized alone with max ranges.
    float_score = evaluator.float_score
    all_max = evaluator(quant(max_range))
    report.all_max_score = all_max
    for group, names in groups.items():
        score = evaluator(quant({n: max_range[n] for n in names}))
        delta = (score.wer - float_score.wer) if score.wer is not None and float_score.wer is not None else None
        if config.criterion == "wer" and delta is not None:
            sensitive = delta > config.gamma
        else:
            sensitive = score.kl > config.kl_share * all_max.kl
        report.sensitivity[group] = {"kl": score.kl, **({"wer": score.wer, "delta_wer": delta} if delta is not None else {})}
        if sensitive:
            report.sensitive_groups.append(group)
        say(f"sensitivity {group}: kl {score.kl:.3g}" + (f", dWER {delta:+.2f}" if delta is not None else "")
            + (" SENSITIVE" if sensitive else ""))

    def candidate_range(name: str, percentile: float) -> float:
        clip = range_percentile(hist[name], percentile)
        return range_mse(clip_histogram(hist[name], clip), qmax) if config.reading == "mse-all" else clip

    # Step 3 ranges for the non-sensitive layers (and starting point for the rest).
    chosen = dict(mse_range)
    sensitive_layers = {n for g in report.sensitive_groups for n in groups[g]}
    for name in sensitive_layers:
        chosen[name] = candidate_range(name, 100.0)
    # Step 2: percentile search per sensitive group, in network order.
    for group in report.sensitive_groups:
        trials, best = [], None
        for p in config.percentiles:
            trial = dict(chosen) | {n: candidate_range(n, p) for n in groups[group]}
            score = evaluator(quant(trial))
            trials.append({"percentile": p, "kl": score.kl, **({"wer": score.wer} if score.wer is not None else {})})
            if best is None or score.key(config.criterion) < best[1].key(config.criterion):
                best = (p, score)
        assert best is not None  # percentiles is non-empty (checked in SearchConfig)
        chosen |= {n: candidate_range(n, best[0]) for n in groups[group]}
        report.percentile_trials[group] = trials
        report.chosen_percentiles[group] = best[0]
        say(f"percentile {group}: p={best[0]}")
    report.final_score = evaluator(quant(chosen))
    report.evaluations = evaluator.evaluations
    report.seconds = time.perf_counter() - start
    plan = _to_plan(modules, groups, chosen, report, config, model_name)
    return plan, report


def _to_plan(
    modules: list[QuantizableModule],
    groups: dict[str, list[str]],
    chosen: dict[str, float],
    report: SearchReport,
    config: SearchConfig,
    model_name: str,
) -> QuantPlan:
    group_of = {n: g for g, names in groups.items() for n in names}
    layers = []
    for m in modules:
        group = group_of[m.name]
        evidence = {f"sensitivity_{k}": v for k, v in report.sensitivity[group].items() if v is not None}
        if group in report.chosen_percentiles:
            p = report.chosen_percentiles[group]
            for trial in report.percentile_trials[group]:
                tag = f"p{trial['percentile']:g}"
                evidence |= {f"{tag}_{k}": v for k, v in trial.items() if k != "percentile"}
            method = "mse" if config.reading == "mse-all" else "percentile"
            reason = f"sensitive group {group}: clip at percentile {p:g}" + (
                " then MSE-optimal" if config.reading == "mse-all" else "")
            layer = LayerPlan(m.name, op=m.op, calibration=method,
                              clip_percentile=p if method == "percentile" else None, reason=reason)
        else:
            layer = LayerPlan(m.name, op=m.op, calibration="mse", reason=f"not sensitive ({group}): MSE-optimal range")
        layers.append(dataclasses.replace(
            layer, weight_bits=config.weight_bits, act_bits=config.act_bits,
            weight_calibration=config.weight_calibration, act_range=float(chosen[m.name]),
            evidence=tuple(sorted((k, float(v)) for k, v in evidence.items())),
        ))
    skips = tuple(LayerPlan("*", op=op, skip=True, reason="kept float by the search config (skip_ops)")
                  for op in config.skip_ops)
    default = LayerPlan("*", weight_bits=config.weight_bits, act_bits=config.act_bits)
    return QuantPlan(default=default, layers=tuple(layers), op_defaults=skips, model=model_name)
