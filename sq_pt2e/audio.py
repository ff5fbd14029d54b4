"""Load and validate speech audio: any soundfile format -> 16 kHz mono float32.

Files are decoded block by block (``soundfile.SoundFile.blocks``) and resampled with
a streaming soxr resampler (very high quality), so memory holds the mono 16 kHz
result, never the file's channels at their original rate; :func:`stream_audio`
yields fixed-length chunks and holds only one chunk. Every problem is an
``AudioError`` naming the file and what is wrong: unreadable or corrupt data, no
samples, NaN/Inf, a sample rate outside 1 kHz .. 384 kHz, too short for the CNN
encoder's 400-sample receptive field, longer than a given limit. Clipping is
reported (``clipped_fraction``), not refused; resampling is reported (``resampled``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sq_pt2e.errors import AudioError

__all__ = [
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLES",
    "MIN_SAMPLE_RATE",
    "SAMPLE_RATE",
    "Audio",
    "load_audio",
    "normalize_waveform",
    "stream_audio",
    "validate_waveform",
]

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # receptive field of the CNN feature encoder: shorter audio yields no frame
MIN_SAMPLE_RATE = 1000  # below this no speech is left; above the maximum a header is corrupt
MAX_SAMPLE_RATE = 384000
_CLIP_LEVEL = 0.999
_BLOCK_FRAMES = 1 << 16  # frames decoded at a time


@dataclass(frozen=True)
class Audio:
    """A mono float32 waveform at ``sample_rate`` and what was done to get it.

    Attributes:
        waveform: ``(samples,)`` float32, not normalised (see :func:`normalize_waveform`).
        sample_rate: rate of ``waveform`` (the ``target_sr`` asked for).
        path: the file it was read from.
        original_sample_rate: rate of the file.
        channels: channels of the file (averaged to mono).
        resampled: whether ``waveform`` was resampled from ``original_sample_rate``.
        clipped_fraction: share of the file's frames with a channel at full scale
            (``|x| >= 0.999``); clipping is reported, not refused.
    """

    waveform: np.ndarray
    sample_rate: int
    path: str
    original_sample_rate: int
    channels: int
    resampled: bool
    clipped_fraction: float

    @property
    def seconds(self) -> float:
        """Duration in seconds."""
        return len(self.waveform) / self.sample_rate


def validate_waveform(waveform: np.ndarray, *, source: str = "waveform", max_seconds: float | None = None,
                      sample_rate: int = SAMPLE_RATE) -> None:
    """Check that a waveform can be fed to a wav2vec2 / HuBERT model.

    Args:
        waveform: ``(samples,)`` array.
        source: what to call it in error messages (a file name).
        max_seconds: longest accepted duration; no limit if ``None``.
        sample_rate: rate of ``waveform``.

    Raises:
        AudioError: not 1-D, no samples, NaN/Inf, shorter than the CNN encoder's
            400-sample receptive field, or longer than ``max_seconds``.
    """
    if waveform.ndim != 1:
        raise AudioError(f"{source}: expected a 1-D waveform, got shape {tuple(waveform.shape)}")
    if waveform.size == 0:
        raise AudioError(f"{source}: the audio has no samples")
    if not np.isfinite(waveform).all():
        bad = int((~np.isfinite(waveform)).sum())
        raise AudioError(f"{source}: {bad} sample(s) are NaN or infinite")
    if waveform.size < MIN_SAMPLES:
        raise AudioError(
            f"{source}: {waveform.size} samples ({waveform.size / sample_rate * 1000:.1f} ms) is shorter than the "
            f"model's {MIN_SAMPLES}-sample receptive field"
        )
    if max_seconds is not None and waveform.size > max_seconds * sample_rate:
        raise AudioError(f"{source}: {waveform.size / sample_rate:.1f} s is longer than the limit of {max_seconds:g} s")


@dataclass
class _DecodeStats:
    """What block decoding saw: the file's rate and channels, frames, clipped frames."""

    rate: int = 0
    channels: int = 0
    frames: int = 0
    clipped_frames: int = 0


def _check_arguments(source: str, target_sr: int, max_seconds: float | None) -> None:
    if isinstance(target_sr, bool) or not isinstance(target_sr, int) or target_sr <= 0:
        raise AudioError(f"{source}: target_sr={target_sr!r} (expected a positive integer rate in Hz)")
    if max_seconds is not None and not max_seconds > 0:
        raise AudioError(f"{source}: max_seconds={max_seconds!r} (expected > 0 or None)")


def _too_long(source: str, seconds: float, max_seconds: float) -> AudioError:
    return AudioError(f"{source}: {seconds:.1f} s is longer than the limit of {max_seconds:g} s")


def _decode_blocks(path: str | os.PathLike[str], target_sr: int, max_seconds: float | None,
                   stats: _DecodeStats) -> Iterator[np.ndarray]:
    """Decode ``path`` block by block into mono float32 at ``target_sr``; fills ``stats``.

    The header's rate and length are checked before decoding; the length is checked
    again while decoding, since a corrupt header can understate it.
    """
    import soundfile

    source = str(path)
    _check_arguments(source, target_sr, max_seconds)
    if not Path(path).is_file():
        raise AudioError(f"{source}: no such audio file")
    try:
        with soundfile.SoundFile(source) as handle:
            stats.rate, stats.channels = int(handle.samplerate), int(handle.channels)
            if not MIN_SAMPLE_RATE <= stats.rate <= MAX_SAMPLE_RATE:
                msg = (f"{source}: sample rate {stats.rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz "
                       "(corrupt header or not speech audio)")
                raise AudioError(msg)
            if handle.frames == 0:
                raise AudioError(f"{source}: the audio has no samples")
            if max_seconds is not None and handle.frames / stats.rate > max_seconds:
                raise _too_long(source, handle.frames / stats.rate, max_seconds)
            yield from _resampled_blocks(handle, source, target_sr, max_seconds, stats)
    except AudioError:
        raise
    except (RuntimeError, TypeError, ValueError, OverflowError, EOFError, MemoryError) as exc:
        # libsndfile errors derive from RuntimeError; corrupt headers can also surface as the others.
        raise AudioError(f"{source}: cannot decode audio ({type(exc).__name__}: {exc})") from exc


def _resampled_blocks(handle: object, source: str, target_sr: int, max_seconds: float | None,
                      stats: _DecodeStats) -> Iterator[np.ndarray]:
    resampler = None
    if stats.rate != target_sr:
        import soxr

        resampler = soxr.ResampleStream(stats.rate, target_sr, 1, dtype="float32", quality="VHQ")
    for block in handle.blocks(blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True):  # type: ignore[attr-defined]
        stats.frames += len(block)
        if max_seconds is not None and stats.frames / stats.rate > max_seconds:
            raise _too_long(source, stats.frames / stats.rate, max_seconds)
        finite = np.isfinite(block)
        if not finite.all():
            raise AudioError(f"{source}: {int((~finite).sum())} sample(s) are NaN or infinite")
        stats.clipped_frames += int((np.abs(block) >= _CLIP_LEVEL).any(axis=1).sum())
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        yield np.ascontiguousarray(mono) if resampler is None else resampler.resample_chunk(mono)
    if resampler is not None:
        yield resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    if stats.frames == 0:
        raise AudioError(f"{source}: the audio has no samples")


def load_audio(path: str | os.PathLike[str], *, target_sr: int = SAMPLE_RATE,
               max_seconds: float | None = None) -> Audio:
    """Read an audio file (WAV, FLAC, OGG, ... as libsndfile reads them) as mono float32.

    Multi-channel audio is averaged to mono; other rates are resampled with soxr (very
    high quality, streaming). A file longer than ``max_seconds`` is refused from its
    header, before it is decoded. Decoding goes block by block, so memory holds the
    result at ``target_sr``, not the whole file at its own rate and channel count.

    Args:
        path: the audio file.
        target_sr: sample rate of the returned waveform.
        max_seconds: longest accepted duration; no limit if ``None``.

    Returns:
        The waveform and how it was obtained (:class:`Audio`).

    Raises:
        AudioError: missing, unreadable, corrupt or non-audio file, no samples, NaN/Inf
            samples, a sample rate outside 1 kHz .. 384 kHz, shorter than 400 samples at
            ``target_sr``, longer than ``max_seconds``, or invalid arguments.

    Example:
        >>> audio = load_audio("sample.flac", max_seconds=60)
        >>> logits = model(torch.from_numpy(normalize_waveform(audio.waveform))[None]).logits
    """
    source = str(path)
    stats = _DecodeStats()
    blocks = list(_decode_blocks(path, target_sr, max_seconds, stats))
    mono = np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)
    validate_waveform(mono, source=source, max_seconds=max_seconds, sample_rate=target_sr)
    clipped = stats.clipped_frames / stats.frames
    return Audio(mono, target_sr, source, stats.rate, stats.channels, stats.rate != target_sr, clipped)


def stream_audio(path: str | os.PathLike[str], *, chunk_seconds: float = 30.0, target_sr: int = SAMPLE_RATE,
                 max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """Yield a file's mono float32 samples at ``target_sr`` in chunks of ``chunk_seconds``.

    Memory holds one chunk (plus one decoded block), whatever the file's length. The
    last chunk takes the remainder and is longer than ``chunk_seconds`` by less than
    400 samples rather than shorter than the model's receptive field. Chunks are not
    normalised (see :func:`normalize_waveform`).

    Args:
        path: the audio file.
        chunk_seconds: length of each chunk (at least 400 samples at ``target_sr``).
        target_sr: sample rate of the chunks.
        max_seconds: longest accepted duration; no limit if ``None``.

    Yields:
        ``(samples,)`` float32 chunks, in order.

    Raises:
        AudioError: as :func:`load_audio`, raised when the problem is reached (a NaN
            late in a file is raised after earlier chunks were yielded), or
            ``chunk_seconds`` too short.
    """
    source = str(path)
    chunk = int(round(chunk_seconds * target_sr)) if chunk_seconds > 0 else 0
    if chunk < MIN_SAMPLES:
        raise AudioError(f"{source}: chunk_seconds={chunk_seconds!r} is shorter than {MIN_SAMPLES} samples")
    pending: list[np.ndarray] = []
    buffered = 0
    for block in _decode_blocks(path, target_sr, max_seconds, _DecodeStats()):
        pending.append(block)
        buffered += len(block)
        if buffered >= chunk + MIN_SAMPLES:
            joined = np.concatenate(pending)
            while len(joined) >= chunk + MIN_SAMPLES:
                yield np.ascontiguousarray(joined[:chunk], dtype=np.float32)
                joined = joined[chunk:]
            pending, buffered = [joined], len(joined)
    rest = np.concatenate(pending) if pending else np.zeros(0, dtype=np.float32)
    validate_waveform(rest, source=source, sample_rate=target_sr)
    yield np.ascontiguousarray(rest, dtype=np.float32)


def normalize_waveform(waveform: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance, as ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does.

    ``(x - mean) / sqrt(var + 1e-7)``, computed over the whole array; silence stays zero.

    Args:
        waveform: samples (any shape; normalised as one sequence).

    Returns:
        A new float32 array.

    Raises:
        AudioError: the waveform is empty.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.size == 0:
        raise AudioError("cannot normalise an empty waveform")
    return ((waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)).astype(np.float32)
