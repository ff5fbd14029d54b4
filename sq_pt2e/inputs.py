"""Turn the audio sources users name (a folder, a manifest, the shipped sets) into waveforms.

Waveforms come out as ``(1, samples)`` float32 tensors at 16 kHz, normalised the way
wav2vec2 / HuBERT feature extractors do, each with its utterance record.

:func:`stream_source` yields them one at a time, so an evaluation over hundreds of
files holds one waveform at a time; :func:`load_source` loads them all into a list.
With ``on_error="skip"`` a bad file (corrupt, empty, NaN samples, too short, ...) or
a bad manifest line is reported to ``on_skip`` (default: a ``logging`` warning),
left out and listed in ``skipped``; the default ``on_error="raise"`` stops at it.

Example:
    >>> stream = stream_source("data/test.tsv", on_error="skip")
    >>> for utt in stream:
    ...     print(utt.id, transcriber.transcribe(utt.wave))
    >>> for entry in stream.skipped:
    ...     print("skipped:", entry.problem)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sq_pt2e.data import OnError, Skipped, SkippedFile, Utterance, check_on_error, log_skipped
from sq_pt2e.errors import AudioError

__all__ = ["LoadedUtterance", "SearchSets", "UtteranceStream", "fixed_length", "load_one", "load_source",
           "load_utterances", "search_sets", "stream_source"]


@dataclass(frozen=True)
class LoadedUtterance:
    """An utterance (id, path, transcript or "") with its normalised waveform."""

    id: str
    path: Path
    text: str
    wave: torch.Tensor


class UtteranceStream:
    """Utterances loaded lazily, one waveform at a time, in order.

    Iterating loads each file when it is reached. Entries that fail under
    ``on_error="skip"`` are in :attr:`skipped` (filled while iterating, reset by a
    new iteration, and including manifest lines skipped before). If every entry
    fails, the end of the iteration raises ``AudioError``: a dataset with no usable
    audio is an error, whatever the policy.

    Args:
        utterances: ``sq_pt2e.data.Utterance`` records (anything with ``id``,
            ``path``, ``text``).
        limit: yield at most this many utterances (skipped ones do not count).
        on_error: ``"raise"`` or ``"skip"``.
        on_skip: called with each skipped entry (default: a ``logging`` warning).
        max_seconds: refuse (raise or skip) files longer than this.
        skipped: entries already skipped (e.g. manifest lines), reported first.
    """

    def __init__(self, utterances: Sequence[object], *, limit: int | None = None, on_error: OnError = "raise",
                 on_skip: Callable[[SkippedFile], None] | None = log_skipped, max_seconds: float | None = None,
                 skipped: Sequence[SkippedFile] = ()) -> None:
        check_on_error(on_error)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise AudioError(f"limit={limit!r} (expected a non-negative integer or None)")
        self.utterances = list(utterances)
        self.limit, self.on_error, self.on_skip, self.max_seconds = limit, on_error, on_skip, max_seconds
        self._before = list(skipped)
        self.skipped: list[SkippedFile] = list(skipped)

    def __iter__(self) -> Iterator[LoadedUtterance]:
        self.skipped = list(self._before)
        yielded = 0
        for utt in self.utterances:
            if self.limit is not None and yielded >= self.limit:
                return
            try:
                loaded = load_one(utt, max_seconds=self.max_seconds)
            except AudioError as exc:
                if self.on_error == "raise":
                    raise
                self._skip(SkippedFile(str(utt.path), str(exc)))  # type: ignore[attr-defined]
                continue
            yielded += 1
            yield loaded
        if yielded == 0 and self.skipped and (self.limit is None or self.limit > 0):
            shown = "; ".join(entry.problem for entry in self.skipped[:3])
            raise AudioError(f"no usable audio: all {len(self.skipped)} entries failed ({shown})")

    def _skip(self, entry: SkippedFile) -> None:
        self.skipped.append(entry)
        if self.on_skip is not None:
            self.on_skip(entry)


def fixed_length(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """A ``(1, samples)`` copy of a ``(1, n)`` waveform: cropped, or zero-padded at the end.

    Exported programs (inductor int8, ``.pte``) take one fixed length.

    Raises:
        ValueError: ``samples`` is not positive or ``wave`` is not ``(1, n)``.
    """
    if samples <= 0:
        raise ValueError(f"samples={samples} (expected > 0)")
    if wave.ndim != 2 or wave.shape[0] != 1:
        raise ValueError(f"waveform of shape {tuple(wave.shape)} (expected (1, samples))")
    out = torch.zeros(1, samples, dtype=wave.dtype)
    clip = wave[0, :samples]
    out[0, : clip.numel()] = clip
    return out


def load_one(utt: object, *, max_seconds: float | None = None) -> LoadedUtterance:
    """Load one ``Utterance`` record as a normalised ``(1, samples)`` waveform.

    Raises:
        AudioError: the file cannot be used (see :func:`sq_pt2e.audio.load_audio`).
    """
    from sq_pt2e.audio import load_audio, normalize_waveform

    audio = load_audio(utt.path, max_seconds=max_seconds)  # type: ignore[attr-defined]
    wave = torch.from_numpy(normalize_waveform(audio.waveform)).unsqueeze(0)
    return LoadedUtterance(utt.id, Path(utt.path), utt.text or "", wave)  # type: ignore[attr-defined]


def load_utterances(utterances: Sequence[object], limit: int | None = None, *, on_error: OnError = "raise",
                    on_skip: Callable[[SkippedFile], None] | None = log_skipped,
                    max_seconds: float | None = None) -> Skipped[LoadedUtterance]:
    """Load ``sq_pt2e.data.Utterance`` records (first ``limit``) as normalised waveforms.

    Args:
        utterances: the records.
        limit: load at most this many.
        on_error: ``"raise"``: a bad file is an error; ``"skip"``: it is left out and
            listed in the result's ``skipped``.
        on_skip: called with each skipped file (default: a ``logging`` warning).
        max_seconds: refuse files longer than this.

    Returns:
        A list of :class:`LoadedUtterance`; its ``skipped`` lists the files left out.

    Raises:
        AudioError: a bad file with ``on_error="raise"``, or every file bad.
    """
    stream = UtteranceStream(utterances, limit=limit, on_error=on_error, on_skip=on_skip, max_seconds=max_seconds)
    loaded = list(stream)
    return Skipped(loaded, stream.skipped)


def _records(source: str | os.PathLike[str] | None, shipped: str, on_error: OnError,
             on_skip: Callable[[SkippedFile], None] | None) -> Skipped[Utterance]:
    from sq_pt2e import assets, data

    if source is None:
        if shipped == "calibration":
            return Skipped(data.manifest_from_folder(assets.calibration_files()[0].parent))
        if shipped.startswith("synthetic-"):
            return Skipped(assets.synthetic_manifest(shipped.removeprefix("synthetic-")))
        return Skipped(assets.librispeech_manifest(shipped))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"audio source {path} does not exist (expected a folder or a .tsv manifest)")
    if path.is_dir():
        return Skipped(data.manifest_from_folder(path))
    return data.read_manifest(path, on_error=on_error, on_skip=on_skip)


def stream_source(source: str | os.PathLike[str] | None, *, limit: int | None = None,
                  shipped: str = "calibration", on_error: OnError = "raise",
                  on_skip: Callable[[SkippedFile], None] | None = log_skipped,
                  max_seconds: float | None = None) -> UtteranceStream:
    """Audio from a folder, a manifest or a shipped set, loaded one file at a time.

    The manifest is read (and its bad lines raised or skipped) now; audio files are
    decoded while iterating.

    Args:
        source: a folder of audio files, a manifest file, or None (a shipped set).
        limit: yield at most this many utterances.
        shipped: which shipped set ``None`` means (see :func:`load_source`).
        on_error: ``"raise"`` or ``"skip"`` (bad files and bad manifest lines).
        on_skip: called with each skipped entry (default: a ``logging`` warning).
        max_seconds: refuse files longer than this.

    Returns:
        An iterable of :class:`LoadedUtterance` with ``skipped``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        AudioError: a bad manifest, or (``on_error="raise"``) a bad line.
    """
    check_on_error(on_error)
    records = _records(source, shipped, on_error, on_skip)
    return UtteranceStream(records, limit=limit, on_error=on_error, on_skip=on_skip, max_seconds=max_seconds,
                           skipped=records.skipped)


def load_source(source: str | os.PathLike[str] | None, *, limit: int | None = None,
                shipped: str = "calibration", on_error: OnError = "raise",
                on_skip: Callable[[SkippedFile], None] | None = log_skipped,
                max_seconds: float | None = None) -> Skipped[LoadedUtterance]:
    """Load audio from a folder, a manifest (``.tsv``) or, when ``source`` is None, a shipped set.

    Args:
        source: a folder of audio files, a manifest file, or None.
        limit: load at most this many utterances (in manifest / sorted order).
        shipped: which shipped set ``None`` means: ``"calibration"`` (unlabeled LibriSpeech),
            ``"test-other"`` / ``"test-clean"`` (LibriSpeech with transcripts) or
            ``"synthetic-test"`` / ``"synthetic-dev"`` (held-out synthetic speech).
        on_error: ``"raise"``: a bad file or manifest line is an error; ``"skip"``: it
            is left out, reported to ``on_skip`` and listed in the result's ``skipped``.
        on_skip: called with each skipped entry (default: a ``logging`` warning).
        max_seconds: refuse files longer than this.

    Returns:
        A list of :class:`LoadedUtterance`; ``.skipped`` lists what was left out and why.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        AudioError: a bad file or line with ``on_error="raise"``, or no usable audio.
    """
    stream = stream_source(source, limit=limit, shipped=shipped, on_error=on_error, on_skip=on_skip,
                           max_seconds=max_seconds)
    loaded = list(stream)
    return Skipped(loaded, stream.skipped)


@dataclass(frozen=True)
class SearchSets:
    """What a plan search runs on: calibration and dev audio, dev transcripts, the criterion."""

    calibration: list[LoadedUtterance]
    dev: list[LoadedUtterance]
    references: list[str] | None  # None: the dev audio has no transcripts
    criterion: str  # "wer" or "kl"


def search_sets(calibration: str | os.PathLike[str] | None, dev: str | os.PathLike[str] | None, *,
                max_calibration: int | None, max_dev: int | None, criterion: str | None = None,
                on_error: OnError = "raise") -> SearchSets:
    """Load the audio of a plan search; without a dev source, hold a quarter of the calibration audio out.

    Args:
        calibration: folder or manifest (None: the shipped LibriSpeech calibration audio).
        dev: folder or manifest to score candidates on (None: held-out calibration audio).
        max_calibration: calibration utterances to load at most.
        max_dev: dev utterances to load at most.
        criterion: ``"wer"`` (needs transcripts) or ``"kl"`` (the default, see ``SearchConfig``).
        on_error: ``"skip"`` leaves out (and logs) unreadable files instead of raising.

    Raises:
        ValueError: ``criterion="wer"`` for dev audio without transcripts.
    """
    calibration_set = load_source(calibration, limit=max_calibration, on_error=on_error)
    if dev is not None:
        dev_set = load_source(dev, limit=max_dev, on_error=on_error)
    else:
        held_out = max(1, len(calibration_set) // 4)
        calibration_set, dev_set = calibration_set[:-held_out], calibration_set[-held_out:]
    references = [u.text for u in dev_set] if all(u.text for u in dev_set) else None
    chosen = criterion or "kl"
    if chosen == "wer" and references is None:
        raise ValueError(f"--criterion wer needs transcripts: {dev or 'the calibration audio'} has none")
    return SearchSets(list(calibration_set), list(dev_set), references, chosen)
