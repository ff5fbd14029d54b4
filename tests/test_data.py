"""Manifests and the shipped assets."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from sq_pt2e.asr import normalize_transcript
from sq_pt2e.assets import asset_path, calibration_files, librispeech_manifest
from sq_pt2e.audio import load_audio
from sq_pt2e.data import Utterance, manifest_from_folder, read_manifest, write_manifest
from sq_pt2e.errors import AudioError


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


def test_shipped_audio_is_16k_mono_speech() -> None:
    for path in (librispeech_manifest("test-clean")[0].path, calibration_files()[0]):
        audio = load_audio(path)
        assert (audio.original_sample_rate, audio.channels, audio.resampled) == (16000, 1, False)
        assert 1.0 < audio.seconds < 35.0 and audio.clipped_fraction < 0.01
