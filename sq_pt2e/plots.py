"""Matplotlib figures for reports (written atomically as PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sq_pt2e.observers import AbsHistogram

__all__ = ["plot_activation_histograms", "plot_latency_vs_length", "plot_sensitivity", "plot_wer_vs_bits"]


def _figure(width: float = 9.0, height: float = 5.5, grid: tuple[int, int] | None = None):  # noqa: ANN202
    """pyplot, the figure and one Axes; with ``grid=(rows, cols)`` a 2-D array of Axes instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if grid is None:
        return plt, *plt.subplots(figsize=(width, height))
    return plt, *plt.subplots(*grid, figsize=(width, height), squeeze=False)


def _short(name: str) -> str:
    """A layer path short enough for a tick label or panel title."""
    for long, short in (("feature_extractor.conv_layers.", "cnn"), ("encoder.layers.", "block"),
                        ("feature_projection.projection", "feature_proj"), ("wav2vec2.", ""), ("hubert.", "")):
        name = name.replace(long, short)
    return name


def _save(plt, fig, path: str | os.PathLike[str]) -> Path:  # noqa: ANN001
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(target)
    return target


def plot_latency_vs_length(series: dict[str, Sequence[tuple[float, float]]], title: str,
                           path: str | os.PathLike[str]) -> Path | None:
    """One line per label through ``(seconds, latency_ms)`` points; None if no label has 2 points."""
    series = {k: sorted(v) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    plt, fig, ax = _figure()
    for label, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("audio length (s)")
    ax.set_ylabel("latency (ms, median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_sensitivity(sensitivity: dict[str, float], threshold: float, ylabel: str, title: str,
                     path: str | os.PathLike[str]) -> Path:
    """Bar per layer group of its sensitivity, threshold line, sensitive bars highlighted."""
    names = list(sensitivity)
    values = [sensitivity[n] for n in names]
    plt, fig, ax = _figure(max(7.0, 0.35 * len(names) + 2), 5.0)
    colors = ["tab:red" if v > threshold else "tab:blue" for v in values]
    ax.bar(range(len(names)), values, color=colors)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_activation_histograms(layers: dict[str, tuple[AbsHistogram, float]], title: str,
                               path: str | os.PathLike[str]) -> Path:
    """One panel per layer: its |x| histogram (log counts), the chosen range (red) and max |x| (grey)."""
    import numpy as np

    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    plt, fig, axes = _figure(3.6 * cols, 2.9 * rows + 0.6, (rows, cols))
    flat = list(axes.flat)
    for ax, (name, (hist, clip)) in zip(flat, layers.items()):
        last = int(np.nonzero(hist.counts)[0].max()) + 1 if hist.total > 0 else 1
        centres = (np.arange(last) + 0.5) * hist.bin_width
        ax.fill_between(centres, np.maximum(hist.counts[:last], 0.5), 0.5, step="mid", color="tab:blue", alpha=0.7)
        ax.set_yscale("log")
        ax.axvline(hist.max_abs, color="grey", linewidth=1)
        ax.axvline(clip, color="tab:red", linestyle="--", linewidth=1.2)
        ax.set_title(f"{_short(name)}\nrange {clip:.3g} = {clip / hist.max_abs:.3f} x max", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("|x|", fontsize=7)
    for ax in flat[len(layers):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def plot_wer_vs_bits(series: dict[str, dict[str, Sequence[tuple[str, float]]]], float_wer: dict[str, float],
                     title: str, path: str | os.PathLike[str]) -> Path:
    """One panel per evaluation set: WER of each method at each bit width, float WER dashed.

    Args:
        series: evaluation set -> method -> ``(bits label, WER)`` in column order.
        float_wer: evaluation set -> float32 WER.
        title: figure title.
        path: PNG to write.
    """
    sets = list(series)
    plt, fig, axes = _figure(5.5 * len(sets), 4.6, (1, len(sets)))
    for ax, name in zip(axes.flat, sets):
        columns = list(dict.fromkeys(bits for points in series[name].values() for bits, _ in points))
        for method, points in series[name].items():
            xs = [columns.index(bits) for bits, _ in points]
            style = {"linewidth": 2.4, "color": "black"} if method == "stablequant" else {"linewidth": 1.2}
            ax.plot(xs, [w for _, w in points], marker="o", label=method, **style)
        if name in float_wer:
            ax.axhline(float_wer[name], color="grey", linestyle="--", linewidth=1, label="float32")
        ax.set_xticks(range(len(columns)), columns)
        ax.set_ylabel("WER (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)
