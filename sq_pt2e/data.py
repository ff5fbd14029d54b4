"""Datasets as manifests: which audio file carries which transcript.

Two UTF-8 TSV layouts are read (no header, blank lines ignored):

- ``path<TAB>transcript``: path relative to the manifest's folder, or absolute; the
  utterance id is the file name without its suffix. An empty transcript is unlabeled.
- LibriSpeech-style ``utt_id<TAB>subset<TAB>text``, whose audio is
  ``<folder>/<subset>/<utt_id>.flac`` (LibriSpeech) or ``<folder>/<utt_id>.flac``
  (the supplementary sets).

Errors are ``AudioError`` naming the manifest and line. With ``on_error="skip"`` a bad
line (malformed, a missing audio file, a repeated id) is left out instead and
recorded, with its message, in the returned list's ``skipped``; problems with the
manifest as a whole (missing, not UTF-8) always raise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar, get_args

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.errors import AudioError

__all__ = [
    "AUDIO_SUFFIXES",
    "OnError",
    "Skipped",
    "SkippedFile",
    "Utterance",
    "check_on_error",
    "log_skipped",
    "manifest_from_folder",
    "read_manifest",
    "write_manifest",
]

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3")
OnError = Literal["raise", "skip"]
_ON_ERROR: tuple[str, ...] = get_args(OnError)
_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SkippedFile:
    """An entry of a dataset left out under ``on_error="skip"``, and why.

    Attributes:
        path: the audio file, or ``manifest:line`` for a bad manifest line.
        problem: the full error message (it names the file and the problem).
    """

    path: str
    problem: str

    def __str__(self) -> str:
        return self.problem


class Skipped(list[T], Generic[T]):
    """A list of what loaded, plus ``skipped``: the entries left out and why, in order."""

    def __init__(self, items: Iterable[T] = (), skipped: Iterable[SkippedFile] = ()) -> None:
        super().__init__(items)
        self.skipped: list[SkippedFile] = list(skipped)


def check_on_error(on_error: str) -> None:
    """Raise ``AudioError`` unless ``on_error`` is ``"raise"`` or ``"skip"``."""
    if on_error not in _ON_ERROR:
        raise AudioError(f"on_error={on_error!r} (expected one of {_ON_ERROR})")


def log_skipped(entry: SkippedFile) -> None:
    """The default report of a skipped entry: a ``logging`` warning with its message."""
    _log.warning("skipped %s", entry.problem)


@dataclass(frozen=True)
class Utterance:
    """One audio file and its transcript (``""`` when unlabeled).

    Attributes:
        id: utterance id (LibriSpeech ``speaker-chapter-index``, or the file's stem).
        path: the audio file.
        text: the reference transcript.
    """

    id: str
    path: Path
    text: str = ""


def read_manifest(path: str | os.PathLike[str], *, on_error: OnError = "raise",
                  on_skip: Callable[[SkippedFile], None] | None = log_skipped) -> Skipped[Utterance]:
    """Read a manifest in either layout.

    Args:
        path: the ``.tsv`` file.
        on_error: ``"raise"``: a bad line is an error; ``"skip"``: it is left out,
            reported to ``on_skip`` and listed in the result's ``skipped``.
        on_skip: called with each skipped line (default: a ``logging`` warning).

    Returns:
        The utterances in file order (a list; ``.skipped`` holds the lines left out).

    Raises:
        AudioError: missing or non-UTF-8 manifest; with ``on_error="raise"`` also a
            malformed line, a listed audio file that does not exist, or an utterance
            id listed twice (file and line named).

    Example:
        >>> utterances = read_manifest("data/librispeech/transcripts.tsv")
    """
    check_on_error(on_error)
    manifest = Path(path)
    if not manifest.is_file():
        raise AudioError(f"{manifest}: no such manifest")
    try:
        content = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AudioError(f"{manifest}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    utterances: Skipped[Utterance] = Skipped()
    first_line: dict[str, int] = {}
    for number, line in enumerate(content.split("\n"), start=1):  # not splitlines(): U+2028 is no line end here
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            utt = _parse_line(manifest, number, line, first_line)
        except AudioError as exc:
            if on_error == "raise":
                raise
            entry = SkippedFile(f"{manifest}:{number}", str(exc))
            utterances.skipped.append(entry)
            if on_skip is not None:
                on_skip(entry)
            continue
        first_line[utt.id] = number
        utterances.append(utt)
    return utterances


def _parse_line(manifest: Path, number: int, line: str, first_line: dict[str, int]) -> Utterance:
    """One manifest line as an :class:`Utterance`; ``AudioError`` naming file and line."""
    folder = manifest.parent
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
    if not fields[0].strip():
        raise AudioError(f"{manifest}:{number}: the first field (path or utterance id) is empty")
    if not utt.path.is_file():
        raise AudioError(f"{manifest}:{number}: audio file {utt.path} does not exist")
    if utt.id in first_line:
        raise AudioError(f"{manifest}:{number}: utterance id {utt.id!r} is already on line {first_line[utt.id]}")
    return utt


def write_manifest(path: str | os.PathLike[str], utterances: Sequence[Utterance]) -> Path:
    """Write a ``path<TAB>transcript`` manifest atomically (temporary file + ``os.replace``).

    Audio paths under the manifest's folder are written relative to it, others absolute.
    The layout stores no ids: reading back gives each utterance its file name's stem.

    Args:
        path: the ``.tsv`` file to write (parent folders are created).
        utterances: what to list, in order.

    Returns:
        The manifest path.

    Raises:
        AudioError: a transcript contains a tab or newline.
    """
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
    """Every audio file directly in ``folder``, sorted by name, unlabeled (for calibration).

    Args:
        folder: a folder of audio files (suffixes in ``AUDIO_SUFFIXES``, any case).

    Returns:
        One unlabeled :class:`Utterance` per file, id = file name without suffix.

    Raises:
        AudioError: no such folder, or no audio file in it.
    """
    root = Path(folder)
    if not root.is_dir():
        raise AudioError(f"{root}: no such folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise AudioError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return [Utterance(p.stem, p) for p in files]
