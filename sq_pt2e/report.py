"""The quantization report: a plan, the search behind it, accuracy and speed, as Markdown and PNGs.

Inputs are the artifacts the other verbs write: ``plan.json`` (always),
``search_report.json`` and ``statistics.npz`` from ``sq-pt2e quantize``,
``accuracy.json`` from ``sq-pt2e accuracy`` and ``bench.json`` from ``sq-pt2e bench``.
Each section appears when its input is given; nothing is recomputed but the
per-layer numbers that follow from the stored histograms (clip ratio, share of
values clipped, activation SQNR under the plan's range).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.observers import AbsHistogram
from sq_pt2e.plan import LayerPlan, QuantPlan

__all__ = ["LayerRow", "ReconstructionTrial", "activation_sqnr_db", "clipped_share", "layer_rows",
           "reconstruction_trials", "write_report"]

_MAX_HISTOGRAMS = 8


@dataclass(frozen=True)
class LayerRow:
    """One planned layer, with what its calibration histogram says about the chosen range."""

    name: str
    op: str
    bits: str
    calibration: str
    act_range: float | None
    max_abs: float | None
    clip_ratio: float | None  # chosen range / largest |x| seen
    clipped_percent: float | None  # share of calibration values above the range
    sqnr_db: float | None  # input-activation SQNR under the chosen range
    sensitivity: float | None
    sensitive: bool
    skip: bool
    reason: str


def _centres(hist: AbsHistogram) -> np.ndarray:
    return (np.arange(len(hist.counts)) + 0.5) * hist.bin_width


def activation_sqnr_db(hist: AbsHistogram, clip: float, qmax: int, floor: float | None = None,
                       outlier_range: float | None = None) -> float:
    """SQNR in dB of quantizing values distributed as ``hist`` to ``[-clip, clip]`` with ``qmax`` levels.

    The error model of :func:`sq_pt2e.observers.range_mse`: values at bin centres; below
    the clip a uniform rounding error of ``step**2 / 12`` (``step = clip / qmax``, or
    ``(clip - floor) / (2 qmax)`` on an affine grid ``[floor, clip]``), above it the
    clipping error ``(x - clip)**2``. With an outlier split (``LayerPlan.outlier_range``)
    the values above the clip are rounded on the outlier grid instead, and clipped only
    beyond ``clip + outlier_range``.

    Raises:
        ValueError: ``clip`` or ``qmax`` not positive.
    """
    if not clip > 0 or qmax < 1:
        raise ValueError(f"clip={clip}, qmax={qmax} (expected clip > 0 and qmax >= 1)")
    x, counts = _centres(hist), hist.counts
    signal = float(np.sum(counts * x**2))
    step = clip / qmax if floor is None else (clip - floor) / (2 * qmax)
    top = clip if outlier_range is None else clip + outlier_range
    inside, outliers, above = x <= clip, (x > clip) & (x <= top), x > top
    noise = float(np.sum(counts[inside]) * step**2 / 12.0 + np.sum(counts[above] * (x[above] - top) ** 2))
    if outlier_range is not None:
        outlier_step = outlier_range / qmax if floor is None else outlier_range / (2 * qmax)
        noise += float(np.sum(counts[outliers]) * outlier_step**2 / 12.0)
    if signal == 0.0:
        return float("nan")
    return float("inf") if noise == 0.0 else 10.0 * math.log10(signal / noise)


def clipped_share(hist: AbsHistogram, clip: float) -> float:
    """Percent of the histogram's values whose |x| lies above ``clip`` (bins above the clip's bin)."""
    if hist.total == 0:
        return 0.0
    return 100.0 * float(hist.counts[_centres(hist) > clip].sum()) / hist.total


def _group_of(name: str, search: dict[str, Any] | None) -> str | None:
    if not search:
        return None
    for group in search.get("sensitivity", {}):
        if name == group or name.startswith(group + "."):
            return group
    return None


def layer_rows(plan: QuantPlan, statistics: dict[str, AbsHistogram] | None = None,
               search: dict[str, Any] | None = None) -> list[LayerRow]:
    """One :class:`LayerRow` per layer listed in ``plan``, in plan order.

    Args:
        plan: the plan.
        statistics: calibration histograms by layer name (``statistics.npz``); without them
            the histogram columns are empty.
        search: the search report (``search_report.json``) for sensitivities.
    """
    criterion = (search or {}).get("config", {}).get("criterion", "wer")
    metric = "delta_wer" if criterion == "wer" else "kl"
    sensitive_groups = set((search or {}).get("sensitive_groups", []))
    rows = []
    for layer in plan.layers:
        hist = (statistics or {}).get(layer.name)
        group = _group_of(layer.name, search)
        sensitivity = (search or {}).get("sensitivity", {}).get(group, {}).get(metric) if group else None
        rows.append(_row(layer, hist, sensitivity, group in sensitive_groups))
    return rows


def _row(layer: LayerPlan, hist: AbsHistogram | None, sensitivity: float | None, sensitive: bool) -> LayerRow:
    calibration = layer.calibration + (f" p{layer.clip_percentile:g}" if layer.clip_percentile is not None else "")
    calibration += f", affine from {layer.act_floor:.3g}" if layer.act_floor is not None else ""
    if layer.input_scale is not None:
        calibration += f", smoothed (x / s, s {min(layer.input_scale):.3g}..{max(layer.input_scale):.3g})"
    if layer.outlier_range is not None:
        calibration += f", outliers split (2nd int8 layer up to +{layer.outlier_range:.3g})"
    if layer.refit is not None:
        calibration += ", weights refit"
    clip = layer.act_range
    usable = hist is not None and hist.total > 0 and hist.max_abs > 0
    if clip is None and usable and layer.calibration == "max":
        clip = hist.max_abs
    measured = usable and clip is not None and not layer.skip
    qmax = 2 ** (layer.act_bits - 1) - 1
    return LayerRow(
        name=layer.name, op=layer.op or "", bits="float" if layer.skip else f"W{layer.weight_bits}A{layer.act_bits}",
        calibration="-" if layer.skip else calibration, act_range=clip, max_abs=hist.max_abs if usable else None,
        clip_ratio=clip / hist.max_abs if measured else None,
        clipped_percent=clipped_share(hist, clip + (layer.outlier_range or 0.0)) if measured else None,
        sqnr_db=activation_sqnr_db(hist, clip, qmax, layer.act_floor, layer.outlier_range) if measured else None,
        sensitivity=sensitivity, sensitive=sensitive, skip=layer.skip, reason=layer.reason,
    )


def _num(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _layer_table(rows: list[LayerRow], sensitivity_label: str) -> list[str]:
    lines = [f"| # | layer | op | bits | calibration | range | max \\|x\\| | range / max | clipped % | "
             f"act SQNR (dB) | {sensitivity_label} | sensitive |",
             "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for i, r in enumerate(rows):
        lines.append(
            f"| {i} | `{r.name}` | {r.op} | {r.bits} | {r.calibration} | {_num(r.act_range, '.4g')} | "
            f"{_num(r.max_abs, '.4g')} | {_num(r.clip_ratio, '.3f')} | {_num(r.clipped_percent, '.4f')} | "
            f"{_num(r.sqnr_db, '.1f')} | {_num(r.sensitivity, '.4g')} | {'yes' if r.sensitive else ''} |"
        )
    return lines


def _histogram_layers(rows: list[LayerRow], statistics: dict[str, AbsHistogram]) -> list[LayerRow]:
    """Sensitive layers first, then the most outlier-heavy (smallest range / max) up to the limit."""
    candidates = [r for r in rows if r.name in statistics and r.clip_ratio is not None]
    chosen = [r for r in candidates if r.sensitive]
    rest = sorted((r for r in candidates if not r.sensitive), key=lambda r: (r.clip_ratio, r.name))
    return (chosen + rest)[:_MAX_HISTOGRAMS]


def _search_section(search: dict[str, Any]) -> list[str]:
    from sq_pt2e.stablequant import promoted_share_unit

    def score(value: dict[str, Any] | None) -> str:
        if not value:
            return "n/a"
        wer = value.get("wer")
        return (f"WER {wer:.2f}%, " if wer is not None else "") + f"logit KL {value['kl']:.3g}"

    config = search.get("config", {})
    chosen, split = search.get("chosen_percentiles", {}), search.get("split_groups", {})
    lines = [
        "## Search", "",
        f"Criterion: {config.get('criterion', '?')} (gamma {config.get('gamma', '?')} WER points; "
        f"granularity {config.get('granularity', '?')}; reading {config.get('reading', '?')}; "
        f"W{config.get('weight_bits', '?')}A{config.get('act_bits', '?')}).",
        "",
        f"- float32: {score(search.get('float_score'))}",
        f"- every layer with max ranges: {score(search.get('all_max_score'))}",
        f"- StableQuant plan: {score(search.get('final_score'))}",
        f"- cost: {search.get('evaluations', '?')} model evaluations in {search.get('seconds', 0.0):.1f} s",
        "- sensitive groups: " + (", ".join(f"`{g}` ({_group_choice(g, chosen, search.get('kept_mse', {}), split)})"
                                            for g in search.get("sensitive_groups", [])) or "none"),
        f"- passes over the sensitive groups: up to {config.get('passes', 1)}; later passes changed "
        + (", ".join(f"`{r['group']}` in pass {r['pass']} ({_option(r['from'])} -> {_option(r['to'])})"
                     for r in search.get("refinements", [])) or "nothing"),
    ]
    if search.get("promotion_trials"):
        promoted = ", ".join(f"`{g}`" for g in search.get("promoted_groups", [])) or "no group"
        lines.append(f"- mixed precision: weights of {promoted} at {config.get('promote_weight_bits')} bits "
                     f"({search.get('promoted_share', 0.0):.0%} of "
                     f"{promoted_share_unit(str(config.get('target', 'x86_inductor')))}, at most "
                     f"{config.get('promote_share', 0.0):.0%})")
    if search.get("float_trials"):
        floated = ", ".join(f"`{g}`" for g in search.get("float_groups", [])) or "no group"
        lines.append(f"- float fallback: {floated} kept float ({search.get('kept_float_share', 0.0):.0%} of the "
                     f"searched layers' FLOPs, at most {config.get('float_share', 0.0):.0%})")
    if search.get("split_trials"):
        split = ", ".join(f"`{g}` (p{p:g})" for g, p in search.get("split_groups", {}).items()) or "no group"
        lines.append(f"- outlier split: {split}: the inputs above that percentile computed by a second int8 layer, "
                     f"adding {search.get('split_flops_share', 0.0):.0%} of the searched layers' FLOPs "
                     f"(tried at p{', p'.join(f'{p:g}' for p in config.get('split_percentiles', []))} for each "
                     f"{'sensitive ' if config.get('split_scope') == 'sensitive' else ''}group of CNN convs, at most "
                     f"{config.get('split_max_flops', 1.0):.0%} added)")
    if search.get("smoothing_trials"):
        trials = ", ".join(f"{alpha}: KL {t['kl']:.3g}" for alpha, t in search["smoothing_trials"].items())
        lines.append(f"- smoothing strength: searched at each alpha ({trials}); chose {config.get('smooth_alpha')}")
    for trial in reconstruction_trials(search):
        lines.append(f"- {trial.label}: {len(trial.layers)} layer(s) {trial.what} in {trial.seconds:.1f} s, dev "
                     f"logit KL {trial.before.get('kl', float('nan')):.3g} -> "
                     f"{trial.after.get('kl', float('nan')):.3g}: {trial.outcome}")
    return lines + [""]


@dataclass(frozen=True)
class ReconstructionTrial:
    """One weight-reconstruction trial of a search (plain refit, or refit with GPTQ rounding)."""

    label: str
    what: str
    layers: list[str]
    seconds: float
    before: dict[str, Any]  # dev score without it
    after: dict[str, Any]  # dev score with it
    outcome: str  # "kept" or "not kept (why)"


def reconstruction_trials(search: dict[str, Any]) -> list[ReconstructionTrial]:
    """The weight-reconstruction trials a search ran, from its report's JSON dict (``SearchReport.to_dict()``)."""
    rounding = search.get("rounding_trial", {})
    candidates = (
        ("weight reconstruction", "refit to their int8 inputs", search.get("refit_layers", []),
         search.get("refit_trial", {}), search.get("refit_kept"), "no better on dev"),
        ("weight reconstruction with GPTQ rounding", "refit and rounded to their weight grid",
         rounding.get("layers", []), rounding, search.get("rounding_kept"), "no better on dev than the plain refit"),
    )
    return [ReconstructionTrial(label, what, list(layers), trial.get("seconds", 0.0), trial.get("before", {}),
                                trial.get("after", {}), "kept" if kept else f"not kept ({lost})")
            for label, what, layers, trial, kept, lost in candidates if layers]


def _option(percentile: float | None) -> str:
    return "MSE range" if percentile is None else f"p{percentile:g}"


def _group_choice(group: str, chosen: dict[str, float], kept_mse: dict[str, Any],
                  split: dict[str, float] | None = None) -> str:
    if group in (split or {}):
        return f"outlier split at p{split[group]:g}"
    if group in chosen:
        return f"clip p{chosen[group]:g}"
    return "MSE range: no clip percentile did better" if group in kept_mse else "not searched"


def _load_json(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    if path is None:
        return None
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from exc


def write_report(
    output_dir: str | os.PathLike[str],
    plan: QuantPlan,
    *,
    statistics: dict[str, AbsHistogram] | None = None,
    search_path: str | os.PathLike[str] | None = None,
    accuracy_path: str | os.PathLike[str] | None = None,
    bench_path: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write ``report.md`` and its figures into ``output_dir`` (each file atomically).

    Args:
        output_dir: where ``report.md`` and the PNGs go.
        plan: the plan to describe.
        statistics: calibration histograms (``sq_pt2e.stats_file.load_statistics``).
        search_path: ``search_report.json`` of ``sq-pt2e quantize``.
        accuracy_path: ``accuracy.json`` of ``sq-pt2e accuracy``.
        bench_path: ``bench.json`` of ``sq-pt2e bench``.

    Returns:
        The files written, ``report.md`` first.

    Raises:
        FileNotFoundError: a named input does not exist.
        ValueError: an input is not valid JSON.
    """
    from sq_pt2e import plots

    out = Path(output_dir)
    search = _load_json(search_path)
    accuracy = _load_json(accuracy_path)
    bench = _load_json(bench_path)
    rows = layer_rows(plan, statistics, search)
    figures: list[Path] = []
    quantized = [r for r in rows if not r.skip]
    lines = [f"# Quantization report: {plan.model or 'model'}", "",
             f"{len(quantized)} layer(s) quantized, {len(rows) - len(quantized)} kept in float; bit widths: "
             + ", ".join(f"{b} x{sum(r.bits == b for r in rows)}" for b in dict.fromkeys(r.bits for r in rows)) + ".",
             ""]
    if plan.scored_for:
        arithmetic = {"x86_inductor": "inductor's (oneDNN: int8 in, float out)",
                      "xnnpack": "the ExecuTorch .pte's (XNNPACK: every int8 layer's output int8 too)"}
        lines += [f"The search scored this plan in {arithmetic[plan.scored_for]} arithmetic "
                  f"(`scored_for: {plan.scored_for}`).", ""]
    if plan.attention == "int8":
        lines += ["Attention is quantized too (q, k, v and the probabilities, uint8): inductor runs its matmuls as "
                  "int8 GEMMs on VNNI CPUs and as one fused int8 attention kernel on AMX-INT8 CPUs. The search "
                  "scored float attention; measure its WER with `sq-pt2e eval --plan`.", ""]
    for op_default in plan.op_defaults:
        if op_default.skip:
            lines.append(f"Every `{op_default.op}` layer is kept in float: {op_default.reason}.")
    lines += [f"Float layer `{r.name}`: {r.reason}" for r in rows if r.skip]
    criterion = (search or {}).get("config", {}).get("criterion", "wer")
    label = "WER increase alone (points)" if criterion == "wer" else "logit KL alone"
    if search is not None:
        lines += [""] + _search_section(search)
        sensitivity = {g: v.get("delta_wer" if criterion == "wer" else "kl", 0.0)
                       for g, v in search.get("sensitivity", {}).items()}
        if sensitivity:
            all_max_kl = (search.get("all_max_score") or {}).get("kl", 0.0)
            config = search.get("config", {})
            threshold = config.get("gamma", 0.25) if criterion == "wer" else config.get("kl_share", 0.2) * all_max_kl
            figures.append(plots.plot_sensitivity(
                sensitivity, threshold, label, f"{plan.model}: each group quantized alone (max ranges)",
                out / "sensitivity.png"))
            lines += ["![sensitivity per layer group](sensitivity.png)", ""]
    lines += ["## Layers", "",
              "Range: the input-activation clip max |x| the plan fixes; range / max < 1 means outliers are clipped, "
              "unless the layer splits them off to a second int8 layer (clipped %: beyond both grids). "
              "Act SQNR: signal-to-quantization-noise ratio of the layer input under that range, from the "
              "calibration histogram." + ("" if statistics else " (No calibration statistics given: histogram "
                                                                 "columns are empty.)"), ""]
    lines += _layer_table(rows, label) + [""]
    if statistics:
        shown = _histogram_layers(rows, statistics)
        if shown:
            figures.append(plots.plot_activation_histograms(
                {r.name: (statistics[r.name], float(r.act_range)) for r in shown},
                f"{plan.model}: input |x| histograms with the chosen range", out / "histograms.png"))
            lines += ["## Activation histograms", "",
                      "Sensitive layers first, then those whose range clips most: |x| on a log count scale, the "
                      "chosen range in red, the largest |x| seen in grey.", "", "![histograms](histograms.png)", ""]
    if accuracy is not None:
        lines += _accuracy_section(accuracy, out, figures)
    if bench is not None:
        lines += _bench_section(bench, out, figures)
    report = atomic_write_text(out / "report.md", "\n".join(lines).rstrip() + "\n")
    return [report, *figures]


def _accuracy_section(accuracy: dict[str, Any], out: Path, figures: list[Path]) -> list[str]:
    from sq_pt2e import plots
    from sq_pt2e.accuracy import AccuracyTable

    table = AccuracyTable.from_dict(accuracy)
    series: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for cell in table.cells:
        series.setdefault(cell.eval_set, {}).setdefault(cell.method, []).append((cell.bits, cell.wer))
    figures.append(plots.plot_wer_vs_bits(series, table.float_wer, f"{table.model}: WER against bit width",
                                          out / "wer_vs_bits.png"))
    return ["## Accuracy", "", table.to_markdown(), "", "![WER against bit width](wer_vs_bits.png)", ""]


def _bench_section(bench: dict[str, Any], out: Path, figures: list[Path]) -> list[str]:
    from sq_pt2e import plots
    from sq_pt2e.bench import BenchResult, BenchRow

    result = BenchResult(bench["cpu"], bench["torch"], [BenchRow(**r) for r in bench["rows"]], bench.get("skipped", []))
    lines = ["## Speed", "", result.to_markdown(), ""]
    series: dict[str, list[tuple[float, float]]] = {}
    for row in result.rows:
        series.setdefault(f"{row.model} {row.variant} ({row.threads}t)", []).append((row.seconds, row.latency_ms))
    plot = plots.plot_latency_vs_length(series, f"Latency vs audio length\n{result.cpu}", out / "latency_vs_length.png")
    if plot is not None:
        figures.append(plot)
        lines += ["![latency against audio length](latency_vs_length.png)", ""]
    return lines
