"""The audio shipped with the package (LibriSpeech, CC BY 4.0; see assets/LICENSES.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sq_pt2e.data import Utterance, manifest_from_folder, read_manifest

__all__ = ["asset_path", "calibration_files", "librispeech_manifest"]

_ROOT = Path(__file__).resolve().parent / "assets"


def asset_path(*parts: str) -> Path:
    """Path of a shipped asset."""
    return _ROOT.joinpath(*parts)


def librispeech_manifest(subset: Literal["test-other", "test-clean"] | None = None) -> list[Utterance]:
    """The shipped LibriSpeech utterances with transcripts (60 test-other, 4 test-clean)."""
    utterances = read_manifest(asset_path("librispeech", "transcripts.tsv"))
    if subset is None:
        return utterances
    return [u for u in utterances if u.path.parent.name == subset]


def calibration_files() -> list[Path]:
    """The shipped unlabeled calibration audio (LibriSpeech train-clean-100, one file per speaker)."""
    return [u.path for u in manifest_from_folder(asset_path("calibration"))]
