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
    """A mono float32 waveform at ``sample_rate`` and what was done to get it."""

    waveform: np.ndarray
    sample_rate: int
    path: str
    original_sample_rate: int
    channels: int
    resampled: bool
    clipped_fraction: float

    @property
    def seconds(self) -> float:
        return len(self.waveform) / self.sample_rate


def validate_waveform(waveform: np.ndarray, *, source: str = "waveform", max_seconds: float | None = None,
                      sample_rate: int = SAMPLE_RATE) -> None:
    """Raise ``AudioError`` if ``waveform`` (1-D) cannot be fed to a speech model."""
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
    """Read an audio file as mono float32 at ``target_sr``.

    Multi-channel audio is averaged to mono; other rates are resampled with soxr.

    Raises:
        AudioError: missing, unreadable, empty, non-finite, too short or too long audio.
    """
    import soundfile

    source = str(path)
    if not Path(path).is_file():
        raise AudioError(f"{source}: no such audio file")
    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError) as exc:  # libsndfile errors derive from RuntimeError
        raise AudioError(f"{source}: cannot decode audio ({exc})") from exc
    channels = int(data.shape[1])
    mono = data.mean(axis=1) if channels > 1 else data[:, 0]
    if mono.size == 0:
        raise AudioError(f"{source}: the audio has no samples")
    if not np.isfinite(mono).all():
        raise AudioError(f"{source}: {int((~np.isfinite(mono)).sum())} sample(s) are NaN or infinite")
    clipped = float((np.abs(mono) >= _CLIP_LEVEL).mean())
    resampled = rate != target_sr
    if resampled:
        import soxr

        mono = soxr.resample(mono, rate, target_sr, quality="VHQ").astype(np.float32)
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    validate_waveform(mono, source=source, max_seconds=max_seconds, sample_rate=target_sr)
    return Audio(mono, target_sr, source, int(rate), channels, resampled, clipped)


def normalize_waveform(waveform: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance, as Wav2Vec2FeatureExtractor(do_normalize=True) does."""
    waveform = np.asarray(waveform, dtype=np.float32)
    return ((waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)).astype(np.float32)
