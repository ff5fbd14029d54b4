"""Matplotlib figures for reports (written atomically as PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_latency_vs_length", "plot_sensitivity"]


def _figure(width: float = 9.0, height: float = 5.5):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


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
    short = [n.replace("feature_extractor.conv_layers.", "cnn").replace("encoder.layers.", "block") for n in names]
    ax.set_xticks(range(len(names)), [s.split(".", 1)[-1] if "." in s else s for s in short], rotation=60,
                  ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path)
