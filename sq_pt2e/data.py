"""Datasets as manifests: which audio file carries which transcript.

Two TSV layouts are read (no header): ``path<TAB>transcript`` (path relative to the
manifest's folder, or absolute) and LibriSpeech-style ``utt_id<TAB>subset<TAB>text``,
whose audio is ``<folder>/<subset>/<utt_id>.flac`` or ``<folder>/<utt_id>.flac``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.errors import AudioError

__all__ = ["AUDIO_SUFFIXES", "Utterance", "manifest_from_folder", "read_manifest", "write_manifest"]

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3")


@dataclass(frozen=True)
class Utterance:
    """One audio file and its transcript ("" when unlabeled)."""

    id: str
    path: Path
    text: str = ""


def read_manifest(path: str | os.PathLike[str]) -> list[Utterance]:
    """Read a manifest (either layout); errors name the file and line.

    Raises:
        AudioError: missing manifest, malformed line, or a listed audio file that does not exist.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise AudioError(f"{manifest}: no such manifest")
    folder = manifest.parent
    utterances = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) == 2:
            audio = Path(fields[0]) if Path(fields[0]).is_absolute() else folder / fields[0]
            utt = Utterance(audio.stem, audio, fields[1].strip())
        elif len(fields) == 3:
            utt_id, subset, text = fields
            candidates = [folder / subset / f"{utt_id}.flac", folder / f"{utt_id}.flac"]
            audio = next((c for c in candidates if c.exists()), candidates[0])
            utt = Utterance(utt_id, audio, text.strip())
        else:
            raise AudioError(f"{manifest}:{number}: expected 2 or 3 tab-separated fields, got {len(fields)}")
        if not utt.path.is_file():
            raise AudioError(f"{manifest}:{number}: audio file {utt.path} does not exist")
        utterances.append(utt)
    return utterances


def write_manifest(path: str | os.PathLike[str], utterances: Sequence[Utterance]) -> Path:
    """Write ``path<TAB>transcript`` lines (paths relative to the manifest when possible), atomically."""
    folder = Path(path).parent.resolve()
    lines = []
    for utt in utterances:
        audio = Path(utt.path).resolve()
        shown = audio.relative_to(folder) if audio.is_relative_to(folder) else audio
        if "\t" in utt.text or "\n" in utt.text:
            raise AudioError(f"transcript of {utt.id} contains a tab or newline")
        lines.append(f"{shown}\t{utt.text}")
    return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def manifest_from_folder(folder: str | os.PathLike[str]) -> list[Utterance]:
    """Every audio file directly in ``folder`` (sorted by name), unlabeled."""
    root = Path(folder)
    if not root.is_dir():
        raise AudioError(f"{root}: no such folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise AudioError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return [Utterance(p.stem, p) for p in files]
