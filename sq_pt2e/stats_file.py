"""Calibration statistics as a file: the |x| histogram of every layer input.

``sq-pt2e quantize`` writes them beside the plan (``statistics.npz``) so a report, a
re-search or an edited plan can use the same calibration without running it again.
One ``.npz`` holds, per layer, the counts, the grid's upper edge, the exact max and
the smallest signed value (NaN where not recorded).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from sq_pt2e.atomic import atomic_write_bytes
from sq_pt2e.errors import QuantizationError
from sq_pt2e.observers import AbsHistogram

__all__ = ["load_statistics", "save_statistics"]

_FORMAT = "sq-pt2e-statistics-1"


def save_statistics(path: str | os.PathLike[str], statistics: dict[str, AbsHistogram]) -> Path:
    """Write ``statistics`` (layer name -> histogram) to ``path`` atomically, layers in the given order.

    Returns:
        The path written.
    """
    names = list(statistics)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(_FORMAT),
        "names": np.array(names, dtype=str),
        "upper": np.array([statistics[n].upper for n in names], dtype=np.float64),
        "max_abs": np.array([statistics[n].max_abs for n in names], dtype=np.float64),
        "min_value": np.array([np.nan if statistics[n].min_value is None else statistics[n].min_value
                               for n in names], dtype=np.float64),
    }
    for i, name in enumerate(names):
        arrays[f"counts_{i}"] = np.asarray(statistics[name].counts, dtype=np.float64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def load_statistics(path: str | os.PathLike[str]) -> dict[str, AbsHistogram]:
    """Read a file written by :func:`save_statistics`.

    Raises:
        FileNotFoundError: no such file.
        QuantizationError: the file is not a statistics file (or is damaged).
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"calibration statistics {source} do not exist (written by `sq-pt2e quantize`)")
    try:
        with np.load(source, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != _FORMAT:
                raise QuantizationError(f"{source} is not an sq-pt2e statistics file (no '{_FORMAT}' marker)")
            names = [str(n) for n in data["names"]]
            mins = data["min_value"] if "min_value" in data else np.full(len(names), np.nan)
            return {name: AbsHistogram(data[f"counts_{i}"].astype(np.float64), float(data["upper"][i]),
                                       float(data["max_abs"][i]), None if np.isnan(mins[i]) else float(mins[i]))
                    for i, name in enumerate(names)}
    except (OSError, ValueError, KeyError) as exc:
        raise QuantizationError(f"cannot read calibration statistics {source}: {exc}") from exc
