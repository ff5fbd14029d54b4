"""The synthetic corpus: disjoint splits, deterministic rendering."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sq_pt2e.train.corpus import ACCENTS, SPLIT_VARIANTS, CorpusSpec, Voice, render, split_sentences

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed")

SENTENCES = [f"Sentence {chr(65 + i % 26)}{chr(65 + i // 26)} is here." for i in range(60)] + ["Dup it.", "dup it", "x"]


def test_voice_variants_are_disjoint_between_splits() -> None:
    train, dev, test = (set(SPLIT_VARIANTS[s]) for s in ("train", "dev", "test"))
    assert not (train & dev) and not (train & test) and not (dev & test)


def test_sentence_splits_are_disjoint_normalised_and_seeded() -> None:
    spec = CorpusSpec(train_sentences=30, dev_sentences=5, test_sentences=5, seed=7)
    splits = split_sentences(SENTENCES, spec, excluded={"SENTENCE DA IS HERE"})
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [30, 5, 5]
    all_texts = splits["train"] + splits["dev"] + splits["test"]
    assert len(set(all_texts)) == len(all_texts)
    assert "SENTENCE DA IS HERE" not in all_texts
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
