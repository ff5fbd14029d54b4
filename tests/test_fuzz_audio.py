"""Fuzzing the audio loader: random bytes and mutated real WAV / FLAC / OGG files.

Every outcome must be a valid waveform or an ``AudioError`` whose message starts with
the file's path; any other exception type, a hang or a crash fails. The mutations
found one real fault: a FLAC header claiming billions of frames made the old
whole-file ``soundfile.read`` allocate tens of GB (``MemoryError``).
"""

from __future__ import annotations

import contextlib
import io
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sq_pt2e.assets import calibration_files
from sq_pt2e.audio import MIN_SAMPLES, SAMPLE_RATE, load_audio, stream_audio
from sq_pt2e.errors import AudioError

_SECONDS_PER_FILE = 10  # a file that takes longer to load or refuse counts as a hang


def _encoded(fmt: str, subtype: str, channels: int = 1, rate: int = 16000) -> bytes:
    t = np.arange(rate // 2) / rate
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


SEEDS: dict[str, bytes] = {
    "pcm16.wav": _encoded("WAV", "PCM_16"),
    "pcm24.wav": _encoded("WAV", "PCM_24", channels=2, rate=48000),
    "float.wav": _encoded("WAV", "FLOAT"),
    "u8.wav": _encoded("WAV", "PCM_U8", rate=8000),
    "stereo.flac": _encoded("FLAC", "PCM_16", channels=2),
    "pcm24.flac": _encoded("FLAC", "PCM_24", rate=44100),
    "vorbis.ogg": _encoded("OGG", "VORBIS"),
    "shipped.flac": calibration_files()[0].read_bytes()[:32768],
}
SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".bin", "")


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"loading took more than {seconds} s (hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check_outcome(content: bytes, suffix: str) -> str:
    """Load ``content`` from a file; return "ok" or "error", fail on anything else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(content)
        with _time_limit(_SECONDS_PER_FILE):
            try:
                audio = load_audio(path)
            except AudioError as exc:
                assert str(exc).startswith(f"{path}: "), str(exc)
                return "error"
    wave = audio.waveform
    assert wave.dtype == np.float32 and wave.ndim == 1 and wave.size >= MIN_SAMPLES
    assert np.isfinite(wave).all() and audio.sample_rate == SAMPLE_RATE
    assert 0.0 <= audio.clipped_fraction <= 1.0 and audio.channels >= 1
    return "ok"


_mutation = st.tuples(st.integers(0, 511), st.integers(0, 255))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=4096), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_load_or_raise_audio_error_naming_the_file(content: bytes, suffix: str) -> None:
    _check_outcome(content, suffix)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    mutations=st.lists(_mutation, min_size=1, max_size=8),
    keep=st.one_of(st.none(), st.floats(0.0, 1.0)),
    suffix=st.sampled_from(SUFFIXES),
)
def test_mutated_real_headers_load_or_raise_audio_error_naming_the_file(
    seed: str, mutations: list[tuple[int, int]], keep: float | None, suffix: str
) -> None:
    data = bytearray(SEEDS[seed])
    for position, value in mutations:
        data[position % len(data)] = value
    if keep is not None:
        data = data[: int(len(data) * keep)]
    _check_outcome(bytes(data), suffix)


def _flac_claiming_frames(frames: int) -> bytes:
    """A valid FLAC whose STREAMINFO header claims ``frames`` samples (36-bit field)."""
    data = bytearray(SEEDS["stereo.flac"])
    assert data[:4] == b"fLaC"
    total = frames & (2**36 - 1)
    data[21] = (data[21] & 0xF0) | (total >> 32)
    data[22:26] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def test_a_flac_header_claiming_billions_of_frames_does_not_allocate_them(tmp_path: Path) -> None:
    path = tmp_path / "liar.flac"
    path.write_bytes(_flac_claiming_frames(2**36 - 1))  # 4.3 million seconds at 16 kHz
    with pytest.raises(AudioError, match=r"liar.flac: cannot decode audio"):
        load_audio(path)  # decoded block by block: fails at the real end, never allocates 2**36 frames
    with pytest.raises(AudioError, match=r"liar.flac: \d+\.\d s is longer than the limit of 60 s"):
        load_audio(path, max_seconds=60)  # refused from the header, before decoding


@pytest.mark.parametrize("rate", [1, 999, 400_000, 655_350])
def test_implausible_sample_rates_are_refused_naming_the_rate(tmp_path: Path, rate: int) -> None:
    path = tmp_path / "rate.wav"
    sf.write(path, np.zeros(4000, dtype=np.float32), rate, subtype="FLOAT")
    with pytest.raises(AudioError, match=rf"rate.wav: sample rate {rate} Hz is outside 1000..384000 Hz"):
        load_audio(path)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    mutations=st.lists(_mutation, min_size=1, max_size=6),
)
def test_streaming_a_mutated_file_yields_valid_chunks_or_raises_audio_error(
    seed: str, mutations: list[tuple[int, int]]
) -> None:
    data = bytearray(SEEDS[seed])
    for position, value in mutations:
        data[position % len(data)] = value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{Path(seed).suffix}"
        path.write_bytes(bytes(data))
        with _time_limit(_SECONDS_PER_FILE):
            try:
                chunks = list(stream_audio(path, chunk_seconds=0.1))
            except AudioError as exc:
                assert str(exc).startswith(f"{path}: "), str(exc)
                return
    assert all(c.dtype == np.float32 and c.size >= MIN_SAMPLES and np.isfinite(c).all() for c in chunks)
