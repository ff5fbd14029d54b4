"""Manifests and the shipped assets."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sq_pt2e.asr import normalize_transcript
from sq_pt2e.assets import asset_path, calibration_files, librispeech_manifest, synthetic_manifest, synthetic_voices
from sq_pt2e.audio import load_audio
from sq_pt2e.data import SkippedFile, Utterance, manifest_from_folder, read_manifest, write_manifest
from sq_pt2e.errors import AudioError
from sq_pt2e.inputs import load_source, load_utterances, stream_source


def _write_audio(path) -> None:
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000)


def test_two_column_manifest_round_trip(tmp_path) -> None:
    for name in ("a", "b"):
        _write_audio(tmp_path / f"{name}.wav")
    utts = [Utterance("a", tmp_path / "a.wav", "HELLO"), Utterance("b", tmp_path / "b.wav", "WORLD WIDE")]
    write_manifest(tmp_path / "m.tsv", utts)
    assert (tmp_path / "m.tsv").read_text() == "a.wav\tHELLO\nb.wav\tWORLD WIDE\n"
    assert [(u.id, u.text) for u in read_manifest(tmp_path / "m.tsv")] == [("a", "HELLO"), ("b", "WORLD WIDE")]


def test_librispeech_layout_is_read(tmp_path) -> None:
    (tmp_path / "test-other").mkdir()
    _write_audio(tmp_path / "test-other" / "1-2-3.flac")
    (tmp_path / "t.tsv").write_text("1-2-3\ttest-other\tA B\n")
    (utt,) = read_manifest(tmp_path / "t.tsv")
    assert utt.id == "1-2-3" and utt.text == "A B" and utt.path.parent.name == "test-other"


def test_flat_supplementary_layout_crlf_and_bom(tmp_path) -> None:
    _write_audio(tmp_path / "LJ001-0001.flac")
    _write_audio(tmp_path / "x.wav")
    content = "\ufeffLJ001-0001\tljspeech\tPRINTING IN THE ONLY SENSE\r\nx.wav\tA\u2028B\r\n"
    (tmp_path / "t.tsv").write_bytes(content.encode())
    first, second = read_manifest(tmp_path / "t.tsv")
    assert (first.id, first.path) == ("LJ001-0001", tmp_path / "LJ001-0001.flac")
    assert first.text == "PRINTING IN THE ONLY SENSE"
    assert (second.id, second.text) == ("x", "A\u2028B")


def test_absolute_paths_and_unlabeled_round_trip(tmp_path) -> None:
    (tmp_path / "audio").mkdir()
    _write_audio(tmp_path / "audio" / "a.wav")
    (tmp_path / "lists").mkdir()
    written = write_manifest(tmp_path / "lists" / "m.tsv", [Utterance("a", tmp_path / "audio" / "a.wav")])
    assert written.read_text() == f"{tmp_path / 'audio' / 'a.wav'}\t\n"
    (utt,) = read_manifest(written)
    assert (utt.id, utt.path, utt.text) == ("a", tmp_path / "audio" / "a.wav", "")
    assert write_manifest(tmp_path / "empty.tsv", []).read_text() == ""
    assert read_manifest(tmp_path / "empty.tsv") == []


def test_write_is_atomic_and_refuses_newlines(tmp_path) -> None:
    _write_audio(tmp_path / "a.wav")
    write_manifest(tmp_path / "m.tsv", [Utterance("a", tmp_path / "a.wav", "OLD")])
    with pytest.raises(AudioError, match="transcript of a contains a tab or newline"):
        write_manifest(tmp_path / "m.tsv", [Utterance("a", tmp_path / "a.wav", "NEW\nLINE")])
    assert (tmp_path / "m.tsv").read_text() == "a.wav\tOLD\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "m.tsv"]  # no temporary file left


def test_bad_manifest_lines_name_file_and_line(tmp_path) -> None:
    (tmp_path / "m.tsv").write_text("only-one-field\n")
    with pytest.raises(AudioError, match=r"m.tsv:1: expected 2 or 3"):
        read_manifest(tmp_path / "m.tsv")
    (tmp_path / "n.tsv").write_text("\nmissing.wav\tTEXT\n")
    with pytest.raises(AudioError, match=r"n.tsv:2: audio file .*missing.wav does not exist"):
        read_manifest(tmp_path / "n.tsv")
    _write_audio(tmp_path / "a.wav")
    (tmp_path / "d.tsv").write_text("a.wav\tX\n\n./a.wav\tY\n")
    with pytest.raises(AudioError, match=r"d.tsv:3: utterance id 'a' is already on line 1"):
        read_manifest(tmp_path / "d.tsv")
    (tmp_path / "e.tsv").write_text("\ttest-other\tX\n")
    with pytest.raises(AudioError, match=r"e.tsv:1: the first field .* is empty"):
        read_manifest(tmp_path / "e.tsv")
    (tmp_path / "f.tsv").write_bytes(b"a.wav\t\xff\xfe\n")
    with pytest.raises(AudioError, match=r"f.tsv: not UTF-8"):
        read_manifest(tmp_path / "f.tsv")
    with pytest.raises(AudioError, match=r"nope.tsv: no such manifest"):
        read_manifest(tmp_path / "nope.tsv")


def test_folder_manifest_is_sorted_and_rejects_empty_folders(tmp_path) -> None:
    for name in ("b", "a"):
        _write_audio(tmp_path / f"{name}.flac")
    (tmp_path / "notes.txt").write_text("x")
    assert [u.id for u in manifest_from_folder(tmp_path)] == ["a", "b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AudioError, match="no audio files"):
        manifest_from_folder(empty)


def test_shipped_assets_are_complete() -> None:
    other, clean = librispeech_manifest("test-other"), librispeech_manifest("test-clean")
    assert (len(other), len(clean)) == (60, 4)
    assert all(u.text and u.path.is_file() for u in other + clean)
    assert all(u.text == normalize_transcript(u.text) for u in other + clean)  # already LibriSpeech-normalised
    assert len(librispeech_manifest()) == 64
    files = calibration_files()
    assert len(files) == 24 and files == sorted(files) and all(f.suffix == ".flac" for f in files)
    with pytest.raises(AudioError, match="unknown LibriSpeech subset 'dev-other'"):
        librispeech_manifest("dev-other")  # type: ignore[arg-type]
    assert asset_path("LICENSES.md").is_file() and "CC BY 4.0" in asset_path("LICENSES.md").read_text()


def test_every_shipped_synthetic_utterance_has_a_voice_of_its_split() -> None:
    from sq_pt2e.train.corpus import FLITE_SPLIT_VOICES, SPLIT_VARIANTS

    voices = synthetic_voices()
    for split in ("test", "dev"):
        allowed = {f"espeak-ng:{v}" for v in SPLIT_VARIANTS[split]} | {f"flite:{v}" for v in FLITE_SPLIT_VOICES[split]}
        used = {voices[u.id] for u in synthetic_manifest(split)}
        assert used <= allowed and len(used) >= 3, (split, used - allowed)


def test_shipped_audio_is_16k_mono_speech() -> None:
    for path in (librispeech_manifest("test-clean")[0].path, calibration_files()[0]):
        audio = load_audio(path)
        assert (audio.original_sample_rate, audio.channels, audio.resampled) == (16000, 1, False)
        assert 1.0 < audio.seconds < 35.0 and audio.clipped_fraction < 0.01


# ------------------------------------------------------------------ bad-file policy
def _tone_file(path, seconds: float = 0.2) -> None:
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)


def _dataset_with_bad_files(folder) -> list[str]:
    """A manifest of 3 good files and 5 bad entries; returns the bad entries' expected messages."""
    for name in ("good1", "good2", "good3"):
        _tone_file(folder / f"{name}.wav")
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 20)
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(folder / "blip.wav", np.zeros(100, dtype=np.float32), 16000)
    nan = np.zeros(1600, dtype=np.float32)
    nan[7] = np.nan
    sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
    lines = ["good1.wav\tA", "corrupt.wav\tB", "empty.wav\tC", "good2.wav\tD", "missing.wav\tE", "blip.wav\tF",
             "nan.wav\tG", "only-one-field", "good3.wav\tH"]
    (folder / "m.tsv").write_text("\n".join(lines) + "\n")
    return [r"m.tsv:5: audio file .*missing.wav does not exist", r"m.tsv:8: expected 2 or 3",
            r"corrupt.wav: cannot decode", r"empty.wav: the audio has no samples",
            r"blip.wav: 100 samples .* receptive field", r"nan.wav: 1 sample\(s\) are NaN"]


def test_one_bad_file_raises_by_default_naming_it(tmp_path) -> None:
    _dataset_with_bad_files(tmp_path)
    with pytest.raises(AudioError, match=r"m.tsv:5: audio file .*missing.wav"):
        load_source(tmp_path / "m.tsv")
    (tmp_path / "m.tsv").write_text("good1.wav\tA\ncorrupt.wav\tB\n")
    with pytest.raises(AudioError, match=r"corrupt.wav: cannot decode"):
        load_source(tmp_path / "m.tsv")


def test_bad_files_are_skipped_reported_and_listed(tmp_path) -> None:
    expected = _dataset_with_bad_files(tmp_path)
    reported: list[SkippedFile] = []
    loaded = load_source(tmp_path / "m.tsv", on_error="skip", on_skip=reported.append)
    assert [u.id for u in loaded] == ["good1", "good2", "good3"]
    assert [u.text for u in loaded] == ["A", "D", "H"]
    assert len(loaded.skipped) == len(expected) and reported == loaded.skipped
    for entry, pattern in zip(loaded.skipped, expected, strict=True):
        assert re.search(pattern, entry.problem), (entry, pattern)
    assert loaded.skipped[2].path == str(tmp_path / "corrupt.wav")
    assert loaded.skipped[0].path == f"{tmp_path / 'm.tsv'}:5"


def test_skipped_files_are_logged_by_default(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    _dataset_with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sq_pt2e.data"):
        load_source(tmp_path / "m.tsv", on_error="skip")
    assert len(caplog.records) == 6 and "corrupt.wav: cannot decode" in caplog.text


def test_limit_counts_loaded_utterances_not_skipped_ones(tmp_path) -> None:
    _dataset_with_bad_files(tmp_path)
    loaded = load_source(tmp_path / "m.tsv", on_error="skip", on_skip=None, limit=2)
    assert [u.id for u in loaded] == ["good1", "good2"]
    assert [Path(s.path).name for s in loaded.skipped] == ["m.tsv:5", "m.tsv:8", "corrupt.wav", "empty.wav"]


def test_a_folder_with_bad_files_skips_them(tmp_path) -> None:
    _dataset_with_bad_files(tmp_path)
    loaded = load_source(tmp_path, on_error="skip", on_skip=None)
    assert [u.id for u in loaded] == ["good1", "good2", "good3"]
    assert sorted(Path(s.path).name for s in loaded.skipped) == ["blip.wav", "corrupt.wav", "empty.wav", "nan.wav"]


def test_a_dataset_with_no_usable_audio_is_an_error_even_when_skipping(tmp_path) -> None:
    (tmp_path / "a.wav").write_bytes(b"junk")
    (tmp_path / "b.wav").write_bytes(b"more junk")
    with pytest.raises(AudioError, match=r"no usable audio: all 2 entries failed .*a.wav: cannot decode"):
        load_source(tmp_path, on_error="skip", on_skip=None)


def test_stream_loads_lazily_and_can_be_iterated_again(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dataset_with_bad_files(tmp_path)
    stream = stream_source(tmp_path / "m.tsv", on_error="skip", on_skip=None)
    assert len(stream.skipped) == 2  # the manifest lines, before any audio is read
    iterator = iter(stream)
    assert next(iterator).id == "good1" and len(stream.skipped) == 2  # corrupt.wav not reached yet
    assert [u.id for u in iterator] == ["good2", "good3"] and len(stream.skipped) == 6
    assert [u.id for u in stream] == ["good1", "good2", "good3"] and len(stream.skipped) == 6


def test_on_error_and_limit_are_checked(tmp_path) -> None:
    _tone_file(tmp_path / "a.wav")
    with pytest.raises(AudioError, match=r"on_error='ignore' \(expected one of \('raise', 'skip'\)\)"):
        load_source(tmp_path, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(AudioError, match="limit=-1"):
        load_source(tmp_path, limit=-1)
    assert load_source(tmp_path, limit=0) == []


def test_load_utterances_skips_and_keeps_backward_compatible_results(tmp_path) -> None:
    _tone_file(tmp_path / "a.wav")
    (tmp_path / "b.wav").write_bytes(b"junk")
    records = [Utterance("a", tmp_path / "a.wav", "X"), Utterance("b", tmp_path / "b.wav", "Y")]
    loaded = load_utterances(records, on_error="skip", on_skip=None)
    assert [u.id for u in loaded] == ["a"] and isinstance(loaded, list)
    assert loaded[0].wave.shape == (1, 3200) and abs(float(loaded[0].wave.std()) - 1.0) < 1e-3
    assert [s.path for s in loaded.skipped] == [str(tmp_path / "b.wav")]
    with pytest.raises(AudioError, match="b.wav: cannot decode"):
        load_utterances(records)
