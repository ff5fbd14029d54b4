"""Turn the audio sources users name (a folder, a manifest, the shipped sets) into waveforms.

Waveforms come out as ``(1, samples)`` float32 tensors at 16 kHz, normalised the way
wav2vec2 / HuBERT feature extractors do, each with its utterance record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LoadedUtterance", "load_source", "load_utterances"]


@dataclass(frozen=True)
class LoadedUtterance:
    """An utterance (id, path, transcript or "") with its normalised waveform."""

    id: str
    path: Path
    text: str
    wave: torch.Tensor


def load_utterances(utterances: Sequence[object], limit: int | None = None) -> list[LoadedUtterance]:
    """Load ``sq_pt2e.data.Utterance`` records (first ``limit``) as normalised waveforms."""
    from sq_pt2e.audio import load_audio, normalize_waveform

    loaded = []
    for utt in list(utterances)[:limit]:
        audio = load_audio(utt.path)
        wave = torch.from_numpy(normalize_waveform(audio.waveform)).unsqueeze(0)
        loaded.append(LoadedUtterance(utt.id, Path(utt.path), utt.text or "", wave))
    return loaded


def load_source(source: str | os.PathLike[str] | None, *, limit: int | None = None,
                shipped: str = "calibration") -> list[LoadedUtterance]:
    """Load audio from a folder, a manifest (``.tsv``) or, when ``source`` is None, a shipped set.

    Args:
        source: a folder of audio files, a manifest file, or None.
        limit: load at most this many utterances (in manifest / sorted order).
        shipped: which shipped set ``None`` means: ``"calibration"`` (unlabeled LibriSpeech),
            ``"test-other"`` / ``"test-clean"`` (LibriSpeech with transcripts) or
            ``"synthetic-test"`` / ``"synthetic-dev"`` (held-out synthetic speech).

    Raises:
        FileNotFoundError: ``source`` does not exist.
    """
    from sq_pt2e import assets, data

    if source is None:
        if shipped == "calibration":
            utterances = data.manifest_from_folder(assets.calibration_files()[0].parent)
        elif shipped.startswith("synthetic-"):
            utterances = assets.synthetic_manifest(shipped.removeprefix("synthetic-"))
        else:
            utterances = assets.librispeech_manifest(shipped)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"audio source {path} does not exist (expected a folder or a .tsv manifest)")
        utterances = data.manifest_from_folder(path) if path.is_dir() else data.read_manifest(path)
    return load_utterances(utterances, limit)
