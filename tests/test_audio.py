"""Audio loading: formats, rates, channels and every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from sq_pt2e.audio import MIN_SAMPLES, load_audio, normalize_waveform, stream_audio, validate_waveform
from sq_pt2e.errors import AudioError


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.mark.parametrize(("subtype", "suffix"), [("PCM_16", ".wav"), ("PCM_24", ".flac"), ("FLOAT", ".wav"),
                                                 ("PCM_32", ".wav")])
def test_formats_load_as_16k_float32(tmp_path, subtype: str, suffix: str) -> None:
    path = tmp_path / f"a{suffix}"
    sf.write(path, _tone(0.5, 16000), 16000, subtype=subtype)
    audio = load_audio(path)
    assert audio.waveform.dtype == np.float32 and audio.sample_rate == 16000 and not audio.resampled
    assert len(audio.waveform) == 8000
    np.testing.assert_allclose(audio.waveform, _tone(0.5, 16000), atol=1e-3)


def test_other_rates_are_resampled_and_say_so(tmp_path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, _tone(1.0, 44100), 44100)
    audio = load_audio(path)
    assert audio.resampled and audio.original_sample_rate == 44100
    assert abs(len(audio.waveform) - 16000) <= 1


def test_resampling_keeps_the_signal(tmp_path) -> None:
    path = tmp_path / "a.flac"
    sf.write(path, _tone(1.0, 48000, channels=2), 48000, subtype="PCM_24")
    audio = load_audio(path)
    assert (audio.original_sample_rate, audio.channels, audio.sample_rate) == (48000, 2, 16000)
    expected = _tone(1.0, 16000)
    middle = slice(800, 15200)  # away from the resampler's edges
    assert np.corrcoef(audio.waveform[middle], expected[middle])[0, 1] > 0.999
    np.testing.assert_allclose(audio.waveform[middle], expected[middle], atol=2e-3)


def test_low_rate_audio_is_upsampled(tmp_path) -> None:
    path = tmp_path / "phone.wav"
    sf.write(path, _tone(0.5, 8000), 8000, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.resampled and len(audio.waveform) == 8000 and audio.seconds == pytest.approx(0.5)


def test_short_after_resampling_is_refused(tmp_path) -> None:
    path = tmp_path / "blip.wav"
    sf.write(path, _tone(1000 / 48000, 48000), 48000)  # 1000 samples at 48 kHz = 333 at 16 kHz
    with pytest.raises(AudioError, match=r"blip.wav: 333 samples .* receptive field"):
        load_audio(path)


def test_stereo_is_averaged_to_mono(tmp_path) -> None:
    path = tmp_path / "a.wav"
    stereo = _tone(0.5, 16000, channels=2)
    stereo[:, 1] = 0.0
    sf.write(path, stereo, 16000, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.channels == 2
    np.testing.assert_allclose(audio.waveform, stereo[:, 0] / 2, atol=1e-6)


def test_clipping_is_reported_not_refused(tmp_path) -> None:
    path = tmp_path / "a.wav"
    wave = _tone(0.5, 16000)
    wave[:800] = 1.0
    sf.write(path, wave, 16000, subtype="FLOAT")
    assert load_audio(path).clipped_fraction == pytest.approx(0.1, abs=0.01)


def test_clipping_in_one_channel_is_reported(tmp_path) -> None:
    path = tmp_path / "a.wav"
    stereo = _tone(0.5, 16000, channels=2)
    stereo[:4000, 0] = -1.0  # left channel clipped for a half: the average is not at full scale
    sf.write(path, stereo, 16000, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.clipped_fraction == pytest.approx(0.5, abs=0.01)
    assert np.abs(audio.waveform).max() < 0.7


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot decode"),
        (b"not audio at all" * 100, "cannot decode"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "cannot decode"),
    ],
)
def test_corrupt_or_non_audio_files_name_the_file(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=f"broken.wav: {message}"):
        load_audio(path)


def test_truncated_flac_is_an_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "cut.flac"
    sf.write(path, _tone(1.0, 16000), 16000)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(AudioError, match="cut.flac"):
        load_audio(path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "nope.wav")


def test_too_short_and_too_long(tmp_path) -> None:
    short = tmp_path / "short.wav"
    sf.write(short, _tone(0.01, 16000), 16000)
    with pytest.raises(AudioError, match="receptive field"):
        load_audio(short)
    long = tmp_path / "long.wav"
    sf.write(long, _tone(2.0, 16000), 16000)
    with pytest.raises(AudioError, match="long.wav: 2.0 s is longer than the limit of 1 s"):
        load_audio(long, max_seconds=1.0)
    assert load_audio(long, max_seconds=2.0).seconds == pytest.approx(2.0)


def test_invalid_arguments(tmp_path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, _tone(0.5, 16000), 16000)
    with pytest.raises(AudioError, match="target_sr=0"):
        load_audio(path, target_sr=0)
    with pytest.raises(AudioError, match="max_seconds=-1"):
        load_audio(path, max_seconds=-1)


def test_zero_length_file(tmp_path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: the audio has no samples"):
        load_audio(path)


def test_non_finite_samples_in_a_float_file(tmp_path) -> None:
    path = tmp_path / "nan.wav"
    wave = _tone(0.5, 16000)
    wave[10], wave[20] = np.nan, np.inf
    sf.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: 2 sample"):
        load_audio(path)


def test_non_finite_and_empty_waveforms_are_rejected() -> None:
    wave = np.zeros(MIN_SAMPLES * 2, dtype=np.float32)
    wave[3] = np.nan
    with pytest.raises(AudioError, match="NaN or infinite"):
        validate_waveform(wave, source="x")
    with pytest.raises(AudioError, match="no samples"):
        validate_waveform(np.zeros(0, dtype=np.float32), source="x")
    with pytest.raises(AudioError, match="1-D"):
        validate_waveform(np.zeros((2, 800), dtype=np.float32), source="x")


def test_silence_loads_and_normalises_without_nan(tmp_path) -> None:
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000, dtype=np.float32), 16000)
    normalised = normalize_waveform(load_audio(path).waveform)
    assert np.isfinite(normalised).all() and np.abs(normalised).max() == 0.0


def test_normalize_gives_zero_mean_unit_variance() -> None:
    wave = np.random.default_rng(0).normal(3.0, 2.0, 16000).astype(np.float32)
    out = normalize_waveform(wave)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1.0) < 1e-3
    with pytest.raises(AudioError, match="empty"):
        normalize_waveform(np.zeros(0, dtype=np.float32))


def test_normalize_matches_the_transformers_feature_extractor() -> None:
    from transformers import Wav2Vec2FeatureExtractor

    wave = (0.01 * np.random.default_rng(1).standard_normal(4000)).astype(np.float32)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=16000)
    expected = extractor(wave, sampling_rate=16000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(normalize_waveform(wave), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("subtype", "atol"), [("PCM_U8", 1 / 64), ("PCM_S8", 1 / 64), ("DOUBLE", 1e-6)])
def test_8_bit_and_double_files_load(tmp_path, subtype: str, atol: float) -> None:
    path = tmp_path / ("a.wav" if subtype != "PCM_S8" else "a.aiff")
    sf.write(path, _tone(0.5, 16000), 16000, subtype=subtype)
    np.testing.assert_allclose(load_audio(path).waveform, _tone(0.5, 16000), atol=atol)


def test_six_channels_are_averaged(tmp_path) -> None:
    path = tmp_path / "surround.wav"
    frames = np.zeros((8000, 6), dtype=np.float32)
    frames[:, 2] = _tone(0.5, 16000) * 3
    sf.write(path, frames, 16000, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.channels == 6
    np.testing.assert_allclose(audio.waveform, _tone(0.5, 16000) / 2, atol=1e-6)


@pytest.mark.parametrize("rate", [16000, 22050])
def test_streamed_chunks_join_to_the_loaded_waveform(tmp_path, rate: int) -> None:
    path = tmp_path / "long.flac"
    sf.write(path, _tone(9.3, rate), rate)  # several decoding blocks
    chunks = list(stream_audio(path, chunk_seconds=2.0))
    assert [len(c) for c in chunks[:-1]] == [32000] * 4
    assert abs(len(chunks[-1]) - 0.3 * 16000 - 16000) <= 1  # the 1.3 s remainder
    np.testing.assert_array_equal(np.concatenate(chunks), load_audio(path).waveform)


def test_streaming_keeps_a_short_tail_with_the_last_chunk(tmp_path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(32000 + 100, dtype=np.float32), 16000)
    assert [len(c) for c in stream_audio(path, chunk_seconds=1.0)] == [16000, 16100]


def test_streaming_refuses_chunks_below_the_receptive_field_and_bad_files(tmp_path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, _tone(0.5, 16000), 16000)
    with pytest.raises(AudioError, match=r"a.wav: chunk_seconds=0.01 is shorter than 400 samples"):
        next(stream_audio(path, chunk_seconds=0.01))
    (tmp_path / "b.wav").write_bytes(b"junk" * 50)
    with pytest.raises(AudioError, match=r"b.wav: cannot decode audio"):
        next(stream_audio(tmp_path / "b.wav"))
    short = tmp_path / "short.wav"
    sf.write(short, _tone(0.01, 16000), 16000)
    with pytest.raises(AudioError, match=r"short.wav: 160 samples .* receptive field"):
        list(stream_audio(short))


def test_nan_late_in_a_long_file_is_found(tmp_path) -> None:
    path = tmp_path / "late.wav"
    wave = _tone(6.0, 16000)
    wave[-5] = np.nan  # in the second decoding block
    sf.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="late.wav: 1 sample"):
        load_audio(path)
