"""Manifests and the shipped assets."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from sq_pt2e.assets import calibration_files, librispeech_manifest
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


def test_bad_manifest_lines_name_file_and_line(tmp_path) -> None:
    (tmp_path / "m.tsv").write_text("only-one-field\n")
    with pytest.raises(AudioError, match=r"m.tsv:1: expected 2 or 3"):
        read_manifest(tmp_path / "m.tsv")
    (tmp_path / "n.tsv").write_text("\nmissing.wav\tTEXT\n")
    with pytest.raises(AudioError, match=r"n.tsv:2: audio file .*missing.wav does not exist"):
        read_manifest(tmp_path / "n.tsv")


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
    assert len(calibration_files()) == 24
