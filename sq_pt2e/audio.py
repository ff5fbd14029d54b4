"""Load and validate speech audio: any soundfile format -> 16 kHz mono float32.

Resampling uses soxr (very high quality). Every problem is an ``AudioError`` naming
the file and what is wrong: unreadable or corrupt data, no samples, NaN/Inf, too short
for the CNN encoder's 400-sample receptive field, longer than a given limit. Clipping
is reported (``clipped_fraction``), not refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sq_pt2e.errors import AudioError

__all__ = ["MIN_SAMPLES", "SAMPLE_RATE", "Audio", "load_audio", "normalize_waveform", "validate_waveform"]

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # receptive field of the CNN feature encoder: shorter audio yields no frame
_CLIP_LEVEL = 0.999


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


def load_audio(path: str | os.PathLike[str], *, target_sr: int = SAMPLE_RATE,
               max_seconds: float | None = None) -> Audio:
    """Read an audio file (WAV, FLAC, OGG, ... as libsndfile reads them) as mono float32.

    Multi-channel audio is averaged to mono; other rates are resampled with soxr (very
    high quality). A file longer than ``max_seconds`` is refused from its header,
    before it is decoded.

    Args:
        path: the audio file.
        target_sr: sample rate of the returned waveform.
        max_seconds: longest accepted duration; no limit if ``None``.

    Returns:
        The waveform and how it was obtained (:class:`Audio`).

    Raises:
        AudioError: missing, unreadable or corrupt file, no samples, NaN/Inf samples,
            shorter than 400 samples at ``target_sr``, longer than ``max_seconds``, or
            invalid arguments.

    Example:
        >>> audio = load_audio("sample.flac", max_seconds=60)
        >>> logits = model(torch.from_numpy(normalize_waveform(audio.waveform))[None]).logits
    """
    import soundfile

    source = str(path)
    if isinstance(target_sr, bool) or not isinstance(target_sr, int) or target_sr <= 0:
        raise AudioError(f"{source}: target_sr={target_sr!r} (expected a positive integer rate in Hz)")
    if max_seconds is not None and not max_seconds > 0:
        raise AudioError(f"{source}: max_seconds={max_seconds!r} (expected > 0 or None)")
    if not Path(path).is_file():
        raise AudioError(f"{source}: no such audio file")
    try:
        info = soundfile.info(source)
        if info.frames == 0:
            raise AudioError(f"{source}: the audio has no samples")
        if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
            msg = f"{source}: {info.frames / info.samplerate:.1f} s is longer than the limit of {max_seconds:g} s"
            raise AudioError(msg)
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError) as exc:  # libsndfile errors derive from RuntimeError
        if isinstance(exc, AudioError):
            raise
        raise AudioError(f"{source}: cannot decode audio ({exc})") from exc
    channels = int(data.shape[1])
    mono = data.mean(axis=1) if channels > 1 else data[:, 0]
    if mono.size == 0:
        raise AudioError(f"{source}: the audio has no samples")
    if not np.isfinite(mono).all():
        raise AudioError(f"{source}: {int((~np.isfinite(mono)).sum())} sample(s) are NaN or infinite")
    clipped = float((np.abs(data) >= _CLIP_LEVEL).any(axis=1).mean())
    resampled = rate != target_sr
    if resampled:
        import soxr

        mono = soxr.resample(mono, rate, target_sr, quality="VHQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    validate_waveform(mono, source=source, max_seconds=max_seconds, sample_rate=target_sr)
    return Audio(mono, target_sr, source, int(rate), channels, resampled, clipped)


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
