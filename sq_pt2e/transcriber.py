"""Transcribe audio with a float or plan-quantized model: thread-safe, chunked, resumable.

:class:`Transcriber` holds a private copy of the model (its weight norm folded; with
a plan, its weights fake-quantized once and activation hooks installed), so a call
changes no state and calls from many threads at once are safe and give the same
transcripts as sequential calls. Files are decoded in chunks (``chunk_seconds``,
default 30 s); each chunk runs as one window with ``overlap_seconds`` of its
neighbours on each side, normalised on its own, and keeps the frames of its own
samples, so a word across a chunk boundary is seen whole and the stitched logits
are decoded once. Memory is bounded by a window (plus 6.4 kB of logits per second
of audio), however long the file.

:func:`transcribe_dataset` runs a transcriber over a dataset and, given a
checkpoint path, appends every finished utterance to a JSONL file (flushed and
fsynced per line). A rerun with the same checkpoint skips the utterances already
there; an interrupted last line is dropped; a checkpoint written by another model,
plan, chunking or decoder is refused (``ResumeError``).

Example:
    >>> transcriber = Transcriber(model, plan, calibration=[u.wave for u in calibration])
    >>> transcriber.transcribe("sample.flac")
    'HELLO WORLD'
    >>> results = transcribe_dataset(transcriber, read_manifest("test.tsv"), checkpoint="out/test.jsonl",
    ...                              on_error="skip")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch import nn

from sq_pt2e.asr import greedy_transcript
from sq_pt2e.audio import MIN_SAMPLES, SAMPLE_RATE, normalize_waveform, stream_audio, validate_waveform
from sq_pt2e.beam import BeamSearchDecoder
from sq_pt2e.data import OnError, SkippedFile, check_on_error, log_skipped
from sq_pt2e.errors import AudioError, NumericsError, PlanError, ResumeError
from sq_pt2e.framing import centre_window, check_overlap, cnn_geometry, hop_length
from sq_pt2e.observers import AbsHistogram, check_accumulator
from sq_pt2e.plan import QuantPlan

__all__ = ["CHECKPOINT_FORMAT", "TranscriptRecord", "Transcriber", "transcribe_dataset"]

CHECKPOINT_FORMAT = "sq-pt2e transcripts v1"
Audio = str | os.PathLike[str] | np.ndarray | torch.Tensor


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (as waveform -> logits) with its weight norm folded, sharing nothing with it."""
    from sq_pt2e.models.build import to_ctc_logits
    from sq_pt2e.passes.fold_weight_norm import folded_copy

    return folded_copy(to_ctc_logits(model)).eval()


def _reduction_size(module: nn.Module) -> int:
    """Products summed into one output of a Linear / Conv1d (the int32 accumulation length)."""
    if isinstance(module, nn.Conv1d):
        return module.in_channels // module.groups * module.kernel_size[0]
    return int(module.in_features)


class Transcriber:
    """Waveform or audio file -> transcript, with a float or plan-quantized model.

    Args:
        model: a ``*ForCTC`` model (or waveform -> logits module); it is copied, and
            later changes to it do not affect the transcriber.
        plan: quantize the copy's layers as this plan says (simulated int8, the same
            arithmetic as the eager ``convert_pt2e`` graph); float if ``None``.
        statistics: calibration histograms (``collect_statistics``) for plan layers
            without a fixed ``act_range``.
        calibration: ``(1, samples)`` normalised waveforms to collect them from,
            when ``statistics`` is not given.
        chunk_seconds: files and long waveforms are transcribed in chunks of this length
            (rounded down to whole frames).
        overlap_seconds: context from each neighbouring chunk (default: a quarter of a
            chunk, at most 1 s); at most ``chunk_seconds``.
        max_seconds: refuse audio longer than this.
        decoder: beam search with a word language model (default: greedy CTC decoding).

    Raises:
        PlanError: the plan names layers the model lacks, or needs calibration data
            and none was given.
        QuantizationError: a layer's int32 accumulation could overflow at its bits.
        AudioError: ``chunk_seconds`` shorter than the model's receptive field, or
            ``overlap_seconds`` too short for a frame's context or longer than a chunk.
    """

    def __init__(self, model: nn.Module, plan: QuantPlan | None = None, *,
                 statistics: dict[str, AbsHistogram] | None = None,
                 calibration: Sequence[torch.Tensor] | None = None, chunk_seconds: float = 30.0,
                 overlap_seconds: float | None = None, max_seconds: float | None = None,
                 decoder: BeamSearchDecoder | None = None) -> None:
        from sq_pt2e.simulate import collect_statistics, fake_quantized, plan_layer_quants, quantizable_modules

        if not chunk_seconds * SAMPLE_RATE >= MIN_SAMPLES:
            raise AudioError(f"chunk_seconds={chunk_seconds!r} is shorter than {MIN_SAMPLES} samples")
        self._model = _private_copy(model)
        self._geometry = cnn_geometry(self._model)
        hop = hop_length(self._geometry)
        self._chunk = max(int(round(chunk_seconds * SAMPLE_RATE)) // hop, math.ceil(MIN_SAMPLES / hop)) * hop
        if overlap_seconds is None:
            overlap_seconds = min(1.0, self._chunk / SAMPLE_RATE / 4)
        self._overlap = int(round(overlap_seconds * SAMPLE_RATE)) // hop * hop
        check_overlap(self._overlap, self._geometry, name=f"overlap_seconds={overlap_seconds!r}")
        if self._overlap > self._chunk:
            raise AudioError(f"overlap_seconds={overlap_seconds!r} is longer than a chunk ({self._chunk} samples)")
        self.plan, self.max_seconds, self.decoder = plan, max_seconds, decoder
        self._stack = contextlib.ExitStack()
        self._forward: nn.Module = self._model
        self._fingerprint: str | None = None
        self._fingerprint_lock = threading.Lock()
        if plan is not None:
            modules = quantizable_modules(self._model)
            plan.check_names([m.name for m in modules])
            needs_ranges = any(not plan.resolve(m.name, m.op).skip and plan.resolve(m.name, m.op).act_range is None
                               for m in modules)
            if needs_ranges and statistics is None:
                if not calibration:
                    raise PlanError("the plan has layers without a fixed act_range: pass statistics= or calibration=")
                statistics = collect_statistics(self._model, calibration, input_scales=plan.input_scales())
            quants = plan_layer_quants(self._model, plan, statistics or {})
            for m in modules:
                if m.name in quants:
                    check_accumulator(m.name, _reduction_size(m.module), quants[m.name].weight_bits,
                                      quants[m.name].act_bits)
            self._forward = self._stack.enter_context(fake_quantized(self._model, quants))

    @property
    def chunk_seconds(self) -> float:
        """Chunk length in seconds, as used (whole frames)."""
        return self._chunk / SAMPLE_RATE

    @property
    def overlap_seconds(self) -> float:
        """Context taken from each neighbouring chunk, in seconds, as used (whole frames)."""
        return self._overlap / SAMPLE_RATE

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove the quantization hooks from the private model copy."""
        self._stack.close()

    def __enter__(self) -> Transcriber:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ transcription
    def logits(self, wave: np.ndarray | torch.Tensor, *, source: str = "waveform") -> torch.Tensor:
        """``(frames, vocab)`` logits of one normalised 16 kHz waveform (no chunking).

        Raises:
            AudioError: not 1-D or ``(1, samples)``, too short, or NaN/Inf samples.
            NumericsError: the model produced NaN/Inf logits.
        """
        samples = self._samples(wave, source)
        with torch.inference_mode():  # grad mode is per thread: set it in every calling thread
            out = self._forward(torch.from_numpy(samples).unsqueeze(0))[0]
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise NumericsError(f"{source}: the model produced {bad} NaN/Inf logit(s)")
        return out

    def transcribe(self, audio: Audio) -> str:
        """The transcript of an audio file or a raw 16 kHz mono waveform of any length.

        Args:
            audio: a path, or ``(samples,)`` / ``(1, samples)`` float samples at 16 kHz.

        Raises:
            AudioError: the file or waveform cannot be used (named in the message).
            NumericsError: the model produced NaN/Inf logits.
        """
        return (self.decoder or greedy_transcript)(self.stitched_logits(audio))

    def stitched_logits(self, audio: Audio) -> torch.Tensor:
        """``(frames, vocab)`` logits of a file or raw waveform, from overlapping chunk windows.

        A waveform is validated and chunked exactly as a file is. Each chunk runs with
        ``overlap_seconds`` of its neighbours on each side (the window normalised on its
        own) and keeps the frames that start in its own samples, so the result has
        ``frame_count(samples)`` frames, each computed once.

        Raises:
            AudioError: the file or waveform cannot be used (named in the message).
            NumericsError: the model produced NaN/Inf logits.
        """
        if isinstance(audio, (str, os.PathLike)):
            source = str(audio)
            chunks: Iterator[np.ndarray] = stream_audio(audio, chunk_seconds=self.chunk_seconds,
                                                        max_seconds=self.max_seconds)
        else:
            source = "waveform"
            chunks = self._split(self._samples(audio, source))
        hop, empty = hop_length(self._geometry), np.zeros(0, dtype=np.float32)
        pieces, before, start = [], empty, 0
        current = next(chunks)
        for following in itertools.chain(chunks, [None]):
            after = empty if following is None else following[: self._overlap]
            window = np.concatenate([before, current, after])
            logits = self.logits(normalize_waveform(window), source=source)
            end = start + len(current)
            frames = centre_window(start, end, self._geometry, before=len(before),
                                   after=len(after), final=following is None)
            offset = frames.start // hop
            if frames.last - offset > logits.shape[0]:
                raise AudioError(f"{source}: a window of {len(window)} samples gave {logits.shape[0]} frames, "
                                 f"{frames.last - offset} needed")
            pieces.append(logits[frames.first - offset : frames.last - offset])
            before = current[len(current) - self._overlap :] if self._overlap else empty
            start, current = end, following
        return torch.cat(pieces)

    def _samples(self, wave: np.ndarray | torch.Tensor, source: str) -> np.ndarray:
        array = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if not np.issubdtype(array.dtype, np.floating):
            raise AudioError(f"{source}: expected float samples, got dtype {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        validate_waveform(array, source=source, max_seconds=self.max_seconds)
        return array

    def _split(self, samples: np.ndarray) -> Iterator[np.ndarray]:
        chunk = self._chunk
        start = 0
        while len(samples) - start >= chunk + MIN_SAMPLES:
            yield samples[start:start + chunk]
            start += chunk
        yield samples[start:]

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model's weights, the plan, the chunking and the decoder: what a checkpoint belongs to."""
        with self._fingerprint_lock:
            if self._fingerprint is None:
                digest = hashlib.sha256()
                for name, tensor in self._model.state_dict().items():
                    digest.update(name.encode())
                    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                digest.update((self.plan.to_json() if self.plan else "float").encode())
                digest.update(f"chunk={self._chunk} overlap={self._overlap} max={self.max_seconds}".encode())
                digest.update((self.decoder.identity if self.decoder else "greedy").encode())
                self._fingerprint = digest.hexdigest()
            return self._fingerprint


@dataclass(frozen=True)
class TranscriptRecord:
    """One utterance's result in a dataset run.

    Attributes:
        id: utterance id.
        path: its audio file.
        text: the transcript (``""`` when it failed).
        reference: the reference transcript (``""`` when unlabeled).
        error: why it failed (``on_error="skip"``), or ``None``.
    """

    id: str
    path: str
    text: str
    reference: str = ""
    error: str | None = None


class _CheckpointLog:
    """Append-only JSONL of :class:`TranscriptRecord` lines after one header line."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.done: dict[str, TranscriptRecord] = {}
        if path.exists() and path.stat().st_size > 0:
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint}) + "\n")
        self._handle = path.open("a", encoding="utf-8")

    def _read(self) -> None:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # an interrupted last line has no newline: drop it
        lines = complete.decode("utf-8", errors="replace").split("\n")[:-1]
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
            raise ResumeError(f"{self.path}: not an sq-pt2e transcript checkpoint (first line {lines[:1]})")
        if header.get("fingerprint") != self.fingerprint:
            raise ResumeError(f"{self.path}: written by another model, plan, chunking or decoder (fingerprint "
                              f"{str(header.get('fingerprint'))[:12]}..., this run {self.fingerprint[:12]}...); "
                              "delete it or choose another checkpoint path")
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = TranscriptRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                raise ResumeError(f"{self.path}:{number}: corrupt checkpoint line ({exc})") from exc
            if record.error is None:
                self.done[record.id] = record
        if len(complete) != len(raw):
            with self.path.open("r+b") as handle:
                handle.truncate(len(complete))

    def append(self, record: TranscriptRecord) -> None:
        self._handle.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def transcribe_dataset(transcriber: Transcriber, utterances: Sequence[object], *,
                       checkpoint: str | os.PathLike[str] | None = None, on_error: OnError = "raise",
                       on_skip: Callable[[SkippedFile], None] | None = log_skipped,
                       progress: Callable[[TranscriptRecord], None] | None = None) -> list[TranscriptRecord]:
    """Transcribe every utterance, one file at a time; resumable from ``checkpoint``.

    Each file is decoded in chunks when it is reached, so memory does not grow with
    the number of files. With a checkpoint, each finished utterance is appended
    (flushed and fsynced) before the next starts; a rerun returns the recorded
    results for utterances already there without decoding them again, and retries
    those that failed.

    Args:
        transcriber: the model to run.
        utterances: ``sq_pt2e.data.Utterance`` records (``id``, ``path``, ``text``).
        checkpoint: JSONL file of finished utterances (created, or resumed from).
        on_error: ``"raise"``: a bad file stops the run (everything before it is in
            the checkpoint); ``"skip"``: it is recorded with its error, reported to
            ``on_skip`` and the run goes on.
        on_skip: called with each failed file (default: a ``logging`` warning).
        progress: called with each new record.

    Returns:
        One record per utterance, in input order (failed ones carry ``error``).

    Raises:
        AudioError: a bad file with ``on_error="raise"``.
        ResumeError: the checkpoint is corrupt or belongs to another run.
        NumericsError: the model produced NaN/Inf logits.
    """
    check_on_error(on_error)
    ids = [utt.id for utt in utterances]  # type: ignore[attr-defined]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise AudioError(f"utterance id(s) {repeated[:5]} appear more than once: results could not be resumed")
    log = _CheckpointLog(Path(checkpoint), transcriber.fingerprint) if checkpoint is not None else None
    records = []
    try:
        for utt in utterances:
            if log is not None and utt.id in log.done:  # type: ignore[attr-defined]
                records.append(log.done[utt.id])  # type: ignore[attr-defined]
                continue
            record = _transcribe_one(transcriber, utt, on_error, on_skip)
            if log is not None:
                log.append(record)
            if progress is not None:
                progress(record)
            records.append(record)
    finally:
        if log is not None:
            log.close()
    return records


def _transcribe_one(transcriber: Transcriber, utt: object, on_error: OnError,
                    on_skip: Callable[[SkippedFile], None] | None) -> TranscriptRecord:
    path, reference = str(utt.path), utt.text or ""  # type: ignore[attr-defined]
    try:
        return TranscriptRecord(utt.id, path, transcriber.transcribe(path), reference)  # type: ignore[attr-defined]
    except AudioError as exc:
        if on_error == "raise":
            raise
        if on_skip is not None:
            on_skip(SkippedFile(path, str(exc)))
        return TranscriptRecord(utt.id, path, "", reference, str(exc))  # type: ignore[attr-defined]
