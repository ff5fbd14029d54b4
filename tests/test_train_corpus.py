"""The synthetic corpus: disjoint splits, deterministic rendering, real clips held out."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf

from sq_pt2e.data import Utterance, read_manifest
from sq_pt2e.train.corpus import (
    ACCENTS,
    FLITE_SPLIT_VOICES,
    SPLIT_VARIANTS,
    SPLITS,
    CorpusSpec,
    Voice,
    build_corpus,
    render,
    split_sentences,
)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite binary not installed")

SENTENCES = [f"Sentence {chr(65 + i % 26)}{chr(65 + i // 26)} is here." for i in range(60)] + ["Dup it.", "dup it", "x"]


def test_voice_variants_are_disjoint_between_splits() -> None:
    for table in (SPLIT_VARIANTS, FLITE_SPLIT_VOICES):
        train, dev, test = (set(table[s]) for s in SPLITS)
        assert not (train & dev) and not (train & test) and not (dev & test)


def test_the_training_pitch_range_leaves_dev_and_test_voices_unchanged(tmp_path, monkeypatch) -> None:
    from sq_pt2e.train import corpus

    spec = CorpusSpec(train_sentences=10, dev_sentences=10, test_sentences=10, flite_train_sentences=20,
                      flite_dev_sentences=10, flite_test_sentences=10)
    splits = split_sentences(SENTENCES, spec, set())
    before = corpus._other_engine_jobs(tmp_path, splits, spec, "flite")
    monkeypatch.setitem(corpus._PITCH_HZ, "train", (200, 230))
    after = corpus._other_engine_jobs(tmp_path, splits, spec, "flite")
    assert before["dev"] == after["dev"] and before["test"] == after["test"]
    assert all(200 <= job[2].pitch <= 230 for job in after["train"])
    assert {job[2].pitch for job in before["train"]} - set(range(200, 231))


def test_sentence_splits_are_disjoint_normalised_and_seeded() -> None:
    spec = CorpusSpec(train_sentences=30, dev_sentences=5, test_sentences=5, seed=7)
    splits = split_sentences(SENTENCES, spec, excluded={"SENTENCE DA IS HERE"})
    assert [len(splits[s]) for s in SPLITS] == [50, 5, 5]  # 60 + "DUP IT" - excluded; "x" has one word
    all_texts = splits["train"] + splits["dev"] + splits["test"]
    assert len(set(all_texts)) == len(all_texts)
    assert "SENTENCE DA IS HERE" not in all_texts and "X" not in all_texts
    assert all(t == t.upper() and "." not in t for t in all_texts)
    assert split_sentences(SENTENCES, spec, set()) == split_sentences(SENTENCES, spec, set())
    assert split_sentences(SENTENCES, spec, set()) != split_sentences(SENTENCES, CorpusSpec(seed=8), set())


@needs_espeak
def test_rendering_is_deterministic_and_16k() -> None:
    voice = Voice(ACCENTS[0], "m3", 160, 50)
    first = render("HELLO WORLD", voice, noise_db=20.0, seed=1)
    again = render("HELLO WORLD", voice, noise_db=20.0, seed=1)
    assert first.dtype == np.float32 and 0.3 * 16000 < first.size < 3 * 16000
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, render("HELLO WORLD", Voice(ACCENTS[1], "f2", 160, 50)))
    reverberant = render("HELLO WORLD", voice, seed=1, reverb_rt60=0.4)
    assert reverberant.shape == render("HELLO WORLD", voice).shape and np.abs(reverberant).max() <= 1.0


@needs_flite
def test_flite_voices_render_at_16k_with_rate_and_pitch() -> None:
    slow = render("HELLO WORLD", Voice("", "kal", 80, 100, "flite"))  # kal speaks at 8 kHz: resampled
    fast = render("HELLO WORLD", Voice("", "kal", 125, 100, "flite"))
    assert slow.dtype == np.float32 and slow.size > fast.size > 0.3 * 16000


def _voices(corpus, split: str) -> set[str]:
    rows = (corpus / "parts" / f"{split}-espeak-ng.voices.tsv").read_text().splitlines()[1:]
    return {row.split("\t")[2].split("+")[1] for row in rows}


@needs_espeak
def test_corpus_is_deterministic_disjoint_and_holds_out_real_sentences(tmp_path) -> None:
    real = []
    for index, text in enumerate(["Real one is here.", "Real two is here.", "Real three is here."]):
        path = tmp_path / f"LJ{index}.flac"
        sf.write(path, np.zeros(8000, np.float32), 16000)
        real.append(Utterance(f"LJ{index}", path, text))
    sentences = [u.text for u in real] + ["The cat sat down.", "A dog ran off.", "We all went home.",
                                          "Rain fell all day.", "Birds sang at dawn."]
    spec = CorpusSpec(train_sentences=3, dev_sentences=2, test_sentences=2, seed=3, real_test_clips=1)
    built = {}
    for name in ("a", "b"):
        out = tmp_path / name
        manifests = build_corpus(out, sentences, spec, real_clips=real, workers=2, progress=False,
                                 engines=["espeak-ng"])
        built[name] = {split: read_manifest(path) for split, path in manifests.items()}
    first, second = built["a"], built["b"]
    for split in SPLITS:
        assert [(u.id, u.text) for u in first[split]] == [(u.id, u.text) for u in second[split]]
        for a, b in zip(first[split], second[split]):
            np.testing.assert_array_equal(sf.read(a.path)[0], sf.read(b.path)[0])
    texts = {split: {u.text for u in first[split]} for split in SPLITS}
    assert not (texts["train"] & texts["dev"]) and not (texts["train"] & texts["test"])
    assert not (texts["dev"] & texts["test"])
    assert [u.id for u in first["real-test"]] == ["LJ2"] and len(first["real-train"]) == 2
    everything = set().union(*texts.values())
    assert "REAL THREE IS HERE" not in everything  # held-out real clip: in no synthetic split
    assert not ({"REAL ONE IS HERE", "REAL TWO IS HERE"} & (texts["dev"] | texts["test"]))
    # The evaluation splits alone are the same to the sample (the voices drawn for train still drawn).
    alone = build_corpus(tmp_path / "eval", sentences, spec, real_clips=real, progress=False, engines=["espeak-ng"],
                         splits=("dev", "test"))
    assert not (tmp_path / "eval" / "train").exists() and "train" not in alone
    for split in ("dev", "test"):
        utts = read_manifest(alone[split])
        assert [(u.id, u.text) for u in utts] == [(u.id, u.text) for u in first[split]]
        for a, b in zip(utts, first[split]):
            np.testing.assert_array_equal(sf.read(a.path)[0], sf.read(b.path)[0])
    voices = {split: _voices(tmp_path / "a", split) for split in SPLITS}
    assert voices["train"] <= set(SPLIT_VARIANTS["train"]) and voices["test"] <= set(SPLIT_VARIANTS["test"])
    assert not (voices["train"] & voices["test"]) and not (voices["train"] & voices["dev"])


def test_corpus_verb_refuses_missing_real_clips_instead_of_changing_the_splits(tmp_path, monkeypatch) -> None:
    from sq_pt2e.train.cli import main

    monkeypatch.chdir(tmp_path)  # the default path is relative to the working directory: not found here
    with pytest.raises(SystemExit, match="no real clips at .*--no-real-clips"):
        main(["corpus", "--out", str(tmp_path / "corpus")])
    with pytest.raises(SystemExit, match="no real clips at .*missing.tsv"):
        main(["corpus", "--out", str(tmp_path / "corpus"), "--real-clips", str(tmp_path / "missing.tsv")])
    assert not (tmp_path / "corpus").exists()
    with pytest.raises(SystemExit):  # argparse: not both
        main(["corpus", "--no-real-clips", "--real-clips", "x.tsv"])
