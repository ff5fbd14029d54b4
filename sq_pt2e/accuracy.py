"""The accuracy table: every method at every bit width, on every evaluation set.

Rows are methods (float32, the baselines, StableQuant), columns bit widths; a cell is
the corpus WER, its difference to float in points with a paired bootstrap 95%
interval, and the agreement with the float model (WER of the quantized transcripts
against the float transcripts, logit cosine). The best quantized cell per column is
marked. StableQuant searches its plan per bit width on the dev set, never on an
evaluation set: ``stablequant`` with the default :class:`SearchConfig` (logit-KL criterion,
affine grids for one-sided inputs, groups searched from MSE ranges, CNN inputs smoothed),
``stablequant-paper`` with the plain reading of the paper (WER criterion, symmetric grids,
groups searched once each from max ranges, no smoothing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from sq_pt2e.asr import greedy_transcript, logit_agreement, paired_bootstrap_delta, wer
from sq_pt2e.baselines import BASELINES, Bits, build_method
from sq_pt2e.inputs import LoadedUtterance
from sq_pt2e.stablequant import CalibrationCache, Evaluator, SearchConfig, collect_statistics, run_search

__all__ = ["COMPARED_METHODS", "SEARCHED_METHODS", "AccuracyCell", "AccuracyTable", "PairedComparison",
           "build_accuracy_table", "method_applies", "paired_comparisons", "transcribe", "wer_against_float"]

SEARCHED_METHODS: dict[str, dict[str, object]] = {
    "stablequant": {},
    "stablequant-paper": {"act_scheme": "symmetric", "start": "max", "smooth_alpha": 0.0, "criterion": "wer",
                          "keep_float": (), "passes": 1, "weight_calibration": "max", "refit_ops": (),
                          "smooth_alphas": (), "split_percentiles": ()},
    "stablequant-mixed": {"promote_weight_bits": 8, "promote_share": 0.25},
    "stablequant-fallback": {"float_share": 0.3},
}
"""Methods whose plan is searched, with the ``SearchConfig`` fields they override (``criterion="wer"``
falls back to ``"kl"`` when the dev set has no transcripts). ``stablequant-mixed`` is StableQuant
with mixed precision: up to a quarter of the weights (the groups that gain most) at 8 bits, the
rest at the column's weight bits; it runs only in columns below 8 weight bits. ``stablequant-fallback``
is StableQuant with the float fallback: the groups whose int8 error costs most per FLOP stay float,
up to 30 % of the searched layers' FLOPs (on the reference models the CNN convs 1-6 are 29 % of them)."""

Forward = Callable[[torch.Tensor], torch.Tensor]


def transcribe(forward: Forward, utterances: Iterable[LoadedUtterance], *, keep_logits: bool = True,
               decode: Callable[[torch.Tensor], str] | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """Transcripts and logits of ``forward`` on each utterance (batch 1, its own length).

    Args:
        forward: waveform -> logits callable.
        utterances: a list, or a stream (``sq_pt2e.inputs.stream_source``): each
            waveform is used and dropped, so a stream keeps memory bounded.
        keep_logits: return every utterance's logits (the second list stays empty
            when ``False``, which keeps memory flat over long evaluations).
        decode: ``(frames, vocab)`` logits -> transcript (default: greedy CTC decoding;
            e.g. a :class:`sq_pt2e.beam.BeamSearchDecoder`).

    Returns:
        Transcripts, and logits when ``keep_logits``.

    Raises:
        NumericsError: ``forward`` produced NaN/Inf logits (the message names the utterance).
    """
    from sq_pt2e.errors import NumericsError

    decode = decode or greedy_transcript
    texts, logits = [], []
    with torch.no_grad():
        for utt in utterances:
            out = forward(utt.wave)[0]
            try:
                texts.append(decode(out))
            except NumericsError as exc:
                raise NumericsError(f"{utt.path}: {exc}") from exc
            if keep_logits:
                logits.append(out)
    return texts, logits


@dataclass(frozen=True)
class AccuracyCell:
    """One method at one bit width on one evaluation set.

    ``transcripts`` (one per utterance, in the evaluation set's order) let a later
    ``--update`` recompute the paired comparisons with cells measured again; cells of
    older tables have none.
    """

    method: str
    bits: str
    eval_set: str
    wer: float
    delta: float
    delta_low: float
    delta_high: float
    wer_vs_float_transcripts: float
    logit_cosine: float
    best: bool = False
    transcripts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PairedComparison:
    """WER of ``method`` minus WER of ``against`` in points, paired bootstrap 95 % interval.

    Both ran on the same utterances at the same bit width in one run; a negative interval
    means ``method`` is better beyond chance, a positive one that ``against`` is.
    """

    method: str
    against: str
    bits: str
    eval_set: str
    delta: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.delta:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


# The methods compared pair by pair with every other method of their column (not with each other).
COMPARED_METHODS = ("stablequant", "stablequant-fallback", "stablequant-mixed")


@dataclass
class AccuracyTable:
    """All cells, the float WERs, and how they were obtained.

    ``search`` holds each searched plan's cost and choices under ``"{bits} {method}"``
    (e.g. ``"W8A8 stablequant"``); ``references`` the reference transcripts of each
    evaluation set.
    """

    model: str
    float_wer: dict[str, float]
    utterances: dict[str, int]
    cells: list[AccuracyCell] = field(default_factory=list)
    search: dict[str, dict[str, object]] = field(default_factory=dict)
    seconds: float = 0.0
    comparisons: list[PairedComparison] = field(default_factory=list)
    references: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyTable:
        """The table of a parsed ``accuracy.json``."""
        return cls(**{**data, "cells": [AccuracyCell(**c) for c in data["cells"]],
                      "comparisons": [PairedComparison(**c) for c in data.get("comparisons", [])]})

    @classmethod
    def from_json(cls, text: str) -> AccuracyTable:
        """Read a table written by :meth:`to_json` (see :meth:`from_dict`)."""
        return cls.from_dict(json.loads(text))

    def updated_with(self, newer: AccuracyTable) -> AccuracyTable:
        """This table with ``newer``'s cells (and search records) in place of the ones they measure again.

        For rerunning some methods or bit widths after a change without rerunning the rest; the
        best cells are marked again, and the paired comparisons recomputed wherever both cells
        have transcripts. A comparison with a cell measured again that has none is dropped.

        Raises:
            ValueError: the tables are of different models, evaluation sets or float WERs.
        """
        same_float = self.float_wer.keys() == newer.float_wer.keys() and all(
            abs(self.float_wer[n] - newer.float_wer[n]) < 1e-9 for n in self.float_wer)
        same_references = all(self.references[n] == newer.references[n]
                              for n in self.references.keys() & newer.references.keys())
        if self.model != newer.model or self.utterances != newer.utterances or not same_float or not same_references:
            raise ValueError(f"cannot update the accuracy table of {self.model} ({self.utterances}, float WER "
                             f"{self.float_wer}) with one of {newer.model} ({newer.utterances}, float WER "
                             f"{newer.float_wer}): rerun the whole table")
        fresh = {(c.method, c.bits, c.eval_set): c for c in newer.cells}
        remeasured = set(fresh)
        cells = [fresh.pop((c.method, c.bits, c.eval_set), c) for c in self.cells] + list(fresh.values())
        references = {**self.references, **newer.references}
        recomputed = _cell_comparisons(cells, references)
        covered = {(c.method, c.against, c.bits, c.eval_set) for c in recomputed}
        earlier = [c for c in self.comparisons  # a comparison with a cell measured again is out of date
                   if not {(c.method, c.bits, c.eval_set), (c.against, c.bits, c.eval_set)} & remeasured]
        comparisons = recomputed + [c for c in earlier + list(newer.comparisons)
                                    if (c.method, c.against, c.bits, c.eval_set) not in covered]
        table = AccuracyTable(self.model, dict(self.float_wer), dict(self.utterances),
                              [replace(c, best=False) for c in cells], {**self.search, **newer.search},
                              self.seconds + newer.seconds, comparisons, references)
        _mark_best(table)
        return table

    def to_markdown(self) -> str:
        bits = list(dict.fromkeys(c.bits for c in self.cells))
        methods = list(dict.fromkeys(c.method for c in self.cells))
        lines = [f"Model: {self.model}. Cells: WER % (difference to float in points [95% paired bootstrap "
                 "interval]; WER against the float model's transcripts). **Bold**: best quantized method per column.",
                 ""]
        for name, float_wer in self.float_wer.items():
            lines += [f"### {name} ({self.utterances[name]} utterances; float32 WER {float_wer:.2f}%)", "",
                      "| method | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
            for method in methods:
                row = []
                for width in bits:
                    key = (method, width, name)
                    cell = next((c for c in self.cells if (c.method, c.bits, c.eval_set) == key), None)
                    if cell is None:
                        row.append("n/a")
                        continue
                    text = (f"{cell.wer:.2f} ({cell.delta:+.2f} [{cell.delta_low:+.2f}, {cell.delta_high:+.2f}]; "
                            f"{cell.wer_vs_float_transcripts:.1f})")
                    row.append(f"**{text}**" if cell.best else text)
                lines.append(f"| {method} | " + " | ".join(row) + " |")
            lines += ["", *self._comparison_lines(name, bits)]
        return "\n".join(lines)

    def _comparison_lines(self, eval_set: str, bits: list[str]) -> list[str]:
        """Each compared method against the best other method of each column (paired)."""
        rows = []
        for method in dict.fromkeys(c.method for c in self.comparisons if c.eval_set == eval_set):
            row = []
            for width in bits:
                pairs = [c for c in self.comparisons if (c.method, c.bits, c.eval_set) == (method, width, eval_set)]
                others = {c.method: c.wer for c in self.cells if (c.bits, c.eval_set) == (width, eval_set)}
                best = min(pairs, key=lambda c: others[c.against], default=None)
                row.append("n/a" if best is None else f"{best} vs {best.against}")
            rows.append(f"| {method} | " + " | ".join(row) + " |")
        if not rows:
            return []
        return ["Paired against the best other method of the column (WER difference in points [95% paired "
                "bootstrap interval]; negative: better; every pair is in the JSON):", "",
                "| method | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits), *rows, ""]


def method_applies(method: str, bits: Bits) -> bool:
    """Whether ``method`` has a cell at ``bits``: fixed-width baselines only at W8A8, mixed
    precision only below the width it promotes to."""
    if method in SEARCHED_METHODS:
        promote_to = SEARCHED_METHODS[method].get("promote_weight_bits")
        return promote_to is None or bits.weight < int(promote_to)
    return BASELINES[method].any_bits or bits == Bits(8, 8)


def build_accuracy_table(
    model: nn.Module,
    model_name: str,
    calibration: Sequence[LoadedUtterance],
    dev: Sequence[LoadedUtterance],
    eval_sets: dict[str, Sequence[LoadedUtterance]],
    *,
    bit_widths: Sequence[Bits] = (Bits(8, 8),),
    methods: Sequence[str] = ("max", "percentile-99.99", "mse", "entropy", "cnn0-2-float", "stablequant"),
    search: SearchConfig | None = None,
    decoders: dict[str, Callable[[torch.Tensor], str]] | None = None,
    progress: Callable[[str], None] = print,
) -> AccuracyTable:
    """Evaluate ``methods`` x ``bit_widths`` on every evaluation set (all need transcripts).

    Transcripts are greedy; each of ``decoders`` (``{label: logits -> transcript}``, e.g. a
    :class:`sq_pt2e.beam.BeamSearchDecoder`) also decodes the same logits, scored as the
    evaluation set ``"{name}, {label}"``.
    """
    start = time.perf_counter()
    waves = [u.wave for u in calibration]
    statistics = collect_statistics(model, waves)
    float_forward = build_method("float32", model, waves, statistics)
    decoded_sets = {name: {name: None} | {f"{name}, {label}": d for label, d in (decoders or {}).items()}
                    for name in eval_sets}

    def decode_all(forward: Forward, name: str) -> dict[str, tuple[list[str], list[torch.Tensor]]]:
        texts, logits = transcribe(forward, eval_sets[name])
        return {scored: (texts if decode is None else [decode(x) for x in logits], logits)
                for scored, decode in decoded_sets[name].items()}

    reference = {scored: result for name in eval_sets for scored, result in decode_all(float_forward, name).items()}
    references = {scored: [u.text for u in eval_sets[name]] for name in eval_sets for scored in decoded_sets[name]}
    table = AccuracyTable(model_name, {n: wer(references[n], reference[n][0]) for n in references},
                          {n: len(references[n]) for n in references}, references=references)
    dev_references = [u.text for u in dev]
    evaluator = Evaluator(model, [u.wave for u in dev], dev_references if all(dev_references) else None)
    calibrations: CalibrationCache = {}  # one calibration pass per smoothing setting
    for bits in bit_widths:
        for method in methods:
            if not method_applies(method, bits):
                continue
            progress(f"{bits} {method} ...")
            plan, method_statistics = None, statistics
            if method in SEARCHED_METHODS:
                config = SearchConfig(**{**asdict(search or SearchConfig()), "weight_bits": bits.weight,
                                         "act_bits": bits.act, **SEARCHED_METHODS[method]})
                if evaluator.references is None:
                    config = replace(config, criterion="kl")
                plan, report, calibrated = run_search(model, waves, evaluator, config, model_name=model_name,
                                                      cache=calibrations)
                method_statistics = calibrated.statistics
                table.search[f"{bits} {method}"] = {
                    "evaluations": report.evaluations, "seconds": report.seconds,
                    "sensitive_groups": report.sensitive_groups, "chosen_percentiles": report.chosen_percentiles,
                    "kept_mse": sorted(report.kept_mse), "refinements": report.refinements,
                    "split_groups": report.split_groups, "split_flops_share": report.split_flops_share,
                    **({"promoted_groups": report.promoted_groups, "promoted_share": report.promoted_share}
                       if report.promotion_trials else {}),
                    **({"float_groups": report.float_groups, "kept_float_share": report.kept_float_share}
                       if report.float_trials else {}),
                    **({"smoothing_trials": report.smoothing_trials, "smooth_alpha": calibrated.smooth_alpha}
                       if report.smoothing_trials else {}),
                    **({"refit_layers": report.refit_layers, "refit_kept": report.refit_kept,
                        "refit_trial": report.refit_trial} if report.refit_layers else {}),
                    **({"rounding_kept": report.rounding_kept, "rounding_trial": report.rounding_trial}
                       if report.rounding_trial else {})}
            forward = build_method("stablequant" if plan is not None else method, model, waves, method_statistics,
                                   bits, plan=plan)
            for name in eval_sets:
                for scored, (texts, logits) in decode_all(forward, name).items():
                    refs = references[scored]
                    float_texts, float_logits = reference[scored]
                    delta = paired_bootstrap_delta(refs, float_texts, texts)
                    cosine = min(logit_agreement(f, q).cosine for f, q in zip(float_logits, logits, strict=True))
                    agree = wer_against_float(float_texts, texts)
                    table.cells.append(AccuracyCell(method, str(bits), scored, wer(refs, texts), delta.delta,
                                                    delta.low, delta.high, agree, cosine, transcripts=texts))
    _mark_best(table)
    table.comparisons = _cell_comparisons(table.cells, references)
    table.seconds = time.perf_counter() - start
    return table


def paired_comparisons(transcripts: dict[tuple[str, str, str], list[str]], references: dict[str, list[str]],
                       ) -> list[PairedComparison]:
    """Each of ``COMPARED_METHODS`` against every other method of the same bit width and evaluation set.

    Args:
        transcripts: ``{(method, bits, eval set): transcripts}``.
        references: ``{eval set: reference transcripts}``.
    """
    comparisons = []
    for (method, bits, name), texts in transcripts.items():
        if method not in COMPARED_METHODS:
            continue
        for (against, other_bits, other_name), other in transcripts.items():
            if (other_bits, other_name) == (bits, name) and against not in COMPARED_METHODS:
                delta = paired_bootstrap_delta(references[name], other, texts)
                comparisons.append(PairedComparison(method, against, bits, name, delta.delta, delta.low, delta.high))
    return comparisons


def _cell_comparisons(cells: Sequence[AccuracyCell], references: dict[str, list[str]]) -> list[PairedComparison]:
    """:func:`paired_comparisons` of the cells that have transcripts of an evaluation set in ``references``."""
    return paired_comparisons({(c.method, c.bits, c.eval_set): c.transcripts for c in cells
                               if c.transcripts and c.eval_set in references}, references)


def wer_against_float(float_texts: Sequence[str], texts: Sequence[str]) -> float:
    """WER (percent) of ``texts`` taking the float model's transcripts as references.

    Utterances whose float transcript is empty carry no reference word and are left
    out; NaN when every float transcript is empty.
    """
    from sq_pt2e.asr import normalize_transcript

    pairs = [(f, t) for f, t in zip(float_texts, texts, strict=True) if normalize_transcript(f)]
    if not pairs:
        return float("nan")
    return wer([f for f, _ in pairs], [t for _, t in pairs])


def _mark_best(table: AccuracyTable) -> None:
    for i, cell in enumerate(table.cells):
        peers = [c for c in table.cells if (c.bits, c.eval_set) == (cell.bits, cell.eval_set) and c.method != "float32"]
        if cell.method != "float32" and cell.wer == min(c.wer for c in peers):
            table.cells[i] = AccuracyCell(**{**asdict(cell), "best": True})
