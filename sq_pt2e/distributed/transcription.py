"""Batch transcription of a manifest on a runner: int8 model compiled once per worker, ordered, resumable."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.distributed.runners import WORKER_CACHE, Runner, TaskFailure, shippable_model
from sq_pt2e.errors import WorkerError

__all__ = ["TranscriptionJob", "TranscriptionSummary", "transcribe_manifest"]


@dataclass(frozen=True)
class TranscriptionJob:
    """What every transcription worker needs, shipped once.

    Attributes:
        model: the float model (weight norm folded).
        plan: the int8 plan (None: transcribe with the float model).
        calibration: waveforms for observers of layers without a fixed range.
        window: samples per model call; audio is cut into windows, the last zero-padded.
        engine: ``"inductor"`` (int8 compiled once per worker) or ``"eager"`` (the
            converted int8 graph, uncompiled).
        fit_to_cpu: narrow W8A8 to W7A8 on CPUs without VNNI (as the inductor backend needs).
    """

    model: nn.Module
    plan: Any
    calibration: tuple[torch.Tensor, ...]
    window: int
    engine: Literal["inductor", "eager"] = "inductor"
    fit_to_cpu: bool = True


def _build_forward(job: TranscriptionJob) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model of ``job`` for inputs of exactly ``job.window`` samples (compiled once)."""
    from sq_pt2e.models.build import to_ctc_logits

    if job.plan is None:
        wrapper = to_ctc_logits(job.model).eval()
        return lambda wave: wrapper(wave)
    from sq_pt2e.pipeline import quantize_model

    from sq_pt2e.inputs import fixed_length

    example = torch.randn(1, job.window, generator=torch.Generator().manual_seed(0))
    calibration = [fixed_length(w, job.window) for w in job.calibration] or [example]  # the program's one length
    converted = quantize_model(job.model, example, calibration, plan=job.plan, fit_to_cpu=job.fit_to_cpu).converted
    if job.engine == "eager":
        return lambda wave: converted(wave)
    from sq_pt2e.backends.inductor import compile_inductor

    return compile_inductor(converted, example, threads=torch.get_num_threads())


def _frames(model: nn.Module, samples: int) -> int:
    lengths = model._get_feat_extract_output_lengths(torch.tensor([samples]))  # noqa: SLF001 (HF API)
    return max(0, int(lengths[0]))


@torch.no_grad()
def _transcribe_wave(forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, wave: torch.Tensor,
                     window: int) -> str:
    from sq_pt2e.asr import ctc_greedy_decode

    samples = int(wave.shape[-1])
    pieces = []
    for start in range(0, max(samples, 1), window):
        chunk = wave[..., start : start + window]
        real = int(chunk.shape[-1])
        if real < window:
            chunk = torch.nn.functional.pad(chunk, (0, window - real))
        logits = forward(chunk)[0]
        pieces.append(logits[: _frames(model, real)] if real < window else logits)
    return ctc_greedy_decode(torch.cat(pieces))[0]


def _transcribe_task(job: TranscriptionJob, job_key: str, utt_id: str, path: str) -> dict[str, str]:
    """Transcribe one file in a worker; the model is built (and compiled) on the worker's first call only."""
    key = f"forward:{job_key}"
    if key not in WORKER_CACHE:  # errors here (e.g. compilation) fail the task, not a file
        WORKER_CACHE[key] = _build_forward(job)
    forward = WORKER_CACHE[key]
    row = {"id": utt_id, "path": path}
    try:
        from sq_pt2e.data import Utterance
        from sq_pt2e.inputs import load_utterances

        wave = load_utterances([Utterance(utt_id, Path(path))])[0].wave
        row["text"] = _transcribe_wave(forward, job.model, wave, job.window)  # type: ignore[arg-type]
    except Exception as exc:  # a bad file is reported, the others go on
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


@dataclass
class TranscriptionSummary:
    """How a batch transcription went.

    Attributes:
        output: the JSONL file (one row per manifest file, in manifest order).
        total: files in the manifest.
        transcribed: files transcribed by this run.
        skipped: files already finished by an earlier run.
        failed: ``{path: error}`` of files that failed (they are retried by the next run).
        seconds: wall time of this run.
        runner: where it ran.
    """

    output: Path
    total: int
    transcribed: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    runner: str = ""


def _read_journal(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an earlier run by id (last row wins); a torn last line is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # interrupted mid-line: drop the torn row
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as handle:
            handle.truncate(len(data))
    rows: dict[str, dict[str, str]] = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkerError(f"{path}:{number}: not a transcription row ({exc}); move the file away") from exc
            rows[row["id"]] = row
    return rows


def transcribe_manifest(
    model: nn.Module,
    plan: object | None,
    utterances: Sequence[Any],
    output: str | os.PathLike[str],
    runner: Runner,
    *,
    window_seconds: float = 10.0,
    engine: Literal["inductor", "eager"] = "inductor",
    calibration: Sequence[torch.Tensor] = (),
    block: int = 64,
    fit_to_cpu: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TranscriptionSummary:
    """Transcribe every file of a manifest on ``runner``'s workers.

    Each worker builds the int8 model (``plan``; float without one) once and, with
    ``engine="inductor"``, compiles it once for inputs of ``window_seconds``; audio is
    cut into such windows (the last zero-padded, its padded frames dropped) and the
    logits of a file are decoded together. Files go out in blocks of ``block``; the
    rows of a block are appended to ``output`` (JSONL: ``id``, ``path`` and ``text`` or
    ``error``) in manifest order, so memory stays bounded and an interrupted run loses
    at most one block. A rerun skips files with a ``text`` row and retries failed ones;
    the file is then rewritten atomically in manifest order, one row per file.

    Args:
        model: the float model.
        plan: a ``QuantPlan`` or None.
        utterances: ``sq_pt2e.data.Utterance`` records (ids unique).
        output: the JSONL file.
        runner: where tasks run.
        window_seconds: model input length in seconds at 16 kHz.
        engine: ``"inductor"`` or ``"eager"``.
        calibration: calibration waveforms, needed when plan layers have no fixed range.
        block: files per block.
        fit_to_cpu: see :class:`TranscriptionJob`.
        progress: called with a line per block.

    Returns:
        The summary; ``failed`` lists files that could not be transcribed.

    Raises:
        WorkerError: the model could not be built in a worker (every file would fail).
    """
    start = time.perf_counter()
    out = Path(output)
    ids = [u.id for u in utterances]
    if len(set(ids)) != len(ids):
        raise ValueError("utterance ids in the manifest are not unique")
    if block < 1:
        raise ValueError(f"block={block} (expected >= 1)")
    shippable_model(model)
    previous = _read_journal(out)
    todo = [u for u in utterances if "text" not in previous.get(u.id, {})]
    summary = TranscriptionSummary(out, len(utterances), skipped=len(utterances) - len(todo),
                                   runner=runner.describe())
    window = int(round(window_seconds * 16000))
    if window < 400:
        raise ValueError(f"window_seconds={window_seconds}: the CNN encoder needs at least 400 samples (0.025 s)")
    job = runner.share(TranscriptionJob(model, plan, tuple(calibration), window, engine, fit_to_cpu))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as journal:
        for first in range(0, len(todo), block):
            chunk = todo[first : first + block]
            rows: dict[int, dict[str, str]] = {}
            calls = [(job, job.key, u.id, str(u.path)) for u in chunk]
            for index, result in runner.run(_transcribe_task, calls):
                if isinstance(result, TaskFailure):
                    if result.kind == "error":  # the task itself failed: the model, not a file
                        raise WorkerError(f"transcription worker failed on {chunk[index].path}: {result.message}")
                    result = {"id": chunk[index].id, "path": str(chunk[index].path),
                              "error": f"worker died: {result.message}"}
                rows[index] = result  # type: ignore[assignment]
            for index in range(len(chunk)):
                row = rows[index]
                journal.write(json.dumps(row, ensure_ascii=False) + "\n")
                if "error" in row:
                    summary.failed[row["path"]] = row["error"]
                else:
                    summary.transcribed += 1
            journal.flush()
            os.fsync(journal.fileno())
            if progress is not None:
                progress(f"{summary.skipped + first + len(chunk)}/{len(utterances)} files "
                         f"({len(summary.failed)} failed)")
    _compact_journal(out, ids)
    summary.seconds = time.perf_counter() - start
    return summary


def _compact_journal(path: Path, ids: Sequence[str]) -> None:
    """Rewrite the rows in manifest order, one per file, atomically (if needed)."""
    text = path.read_text(encoding="utf-8")
    rows = _read_journal(path)
    ordered = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in ids if i in rows)
    if ordered != text:
        atomic_write_text(path, ordered)
