"""Word n-gram language model (Kneser-Ney estimate, ARPA files) and the CTC beam search decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sq_pt2e.asr import ctc_greedy_decode
from sq_pt2e.beam import BeamSearchDecoder
from sq_pt2e.errors import LanguageModelError, NumericsError
from sq_pt2e.lm import EOS, UNK, NgramLM
from sq_pt2e.models.vocab import VOCAB

SENTENCES = ["THE CAT SAT", "THE CAT RAN", "A DOG SAT ON THE MAT", "THE DOG RAN", "HELLO WORLD", "HELLO THERE"]


def test_kneser_ney_matches_hand_computed_probabilities() -> None:
    lm = NgramLM.from_sentences(["A B", "A C"], order=2, discount=0.75)
    # unigram continuation counts A 1, B 1, C 1, </s> 2 (total 5, 4 types); 5 words with <unk>
    p_a = 0.25 / 5 + 0.75 * 4 / 5 / 5
    assert 10 ** lm.log10_prob((), "A") == pytest.approx(p_a)
    assert 10 ** lm.log10_prob((), EOS) == pytest.approx(1.25 / 5 + 0.12)
    assert 10 ** lm.log10_prob((), "ZEBRA") == pytest.approx(0.12)  # unknown words score as <unk>
    assert 10 ** lm.log10_prob(("<s>",), "A") == pytest.approx(1.25 / 2 + 0.375 * p_a)
    assert 10 ** lm.log10_prob(("A",), "B") == pytest.approx(0.25 / 2 + 0.75 * p_a)
    assert 10 ** lm.log10_prob(("B",), "C") == pytest.approx(0.75 * p_a)  # unseen bigram: back-off


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_sum_to_one_in_every_context(order: int) -> None:
    lm = NgramLM.from_sentences(SENTENCES, order=order)
    predicted = [*lm.words(), EOS, UNK]
    for context in [(), ("<s>",), ("THE",), ("THE", "CAT"), ("DOG", "SAT"), ("NEVER", "SEEN"), ("<s>", "HELLO")]:
        assert sum(10 ** lm.log10_prob(context, w) for w in predicted) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", ["lm.arpa", "lm.arpa.gz"])
def test_arpa_round_trip_keeps_every_probability_and_writes_the_same_bytes(tmp_path, name: str) -> None:
    lm = NgramLM.from_sentences(SENTENCES, order=3)
    path = lm.save(tmp_path / name)
    loaded = NgramLM.load(path)
    assert loaded.order == 3 and loaded.words() == lm.words() and loaded.digest() != ""
    for context, word in [(("THE", "CAT"), "SAT"), (("A",), "DOG"), (("CAT", "SAT"), EOS), (("X", "Y"), "ZEBRA")]:
        assert loaded.log10_prob(context, word) == pytest.approx(lm.log10_prob(context, word), abs=1e-6)
    first = path.read_bytes()
    assert lm.save(tmp_path / name).read_bytes() == first


@pytest.mark.parametrize("text, problem", [
    ("just words\n", "no \\data\\ header"),
    ("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\tA\n\\end\\\n", "declares 2 1-grams, the file lists 1"),
    ("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0\tA\n", "truncated"),
    ("\\data\\\nngram 1=1\n\n\\1-grams:\nminus-one\tA\n\\end\\\n", "line 5"),
    ("\\data\\\nngram 1=1\n\n\\2-grams:\n-1.0\tA B\n\\end\\\n", "not declared"),
])
def test_malformed_arpa_files_are_refused_with_the_problem_named(tmp_path, text: str, problem: str) -> None:
    path = tmp_path / "bad.arpa"
    path.write_text(text)
    with pytest.raises(LanguageModelError, match=problem.replace("\\", "\\\\")):
        NgramLM.load(path)
    path.write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(LanguageModelError, match="not a readable ARPA file"):
        NgramLM.load(path)


def test_bad_estimation_settings_are_refused() -> None:
    with pytest.raises(LanguageModelError, match="order"):
        NgramLM.from_sentences(SENTENCES, order=0)
    with pytest.raises(LanguageModelError, match="discount"):
        NgramLM.from_sentences(SENTENCES, discount=1.0)
    with pytest.raises(LanguageModelError, match="no words"):
        NgramLM.from_sentences(["", "  "])


def _spelled_logits(frames: list[str | tuple[str, str]]) -> torch.Tensor:
    """One frame per entry: the token is likely (log-prob ~ 0); ``(a, b)``: a slightly above b."""
    token = {t: i for i, t in enumerate(VOCAB)}
    logits = torch.full((len(frames), len(VOCAB)), -10.0)
    for t, frame in enumerate(frames):
        if isinstance(frame, tuple):
            logits[t, token[frame[0]]], logits[t, token[frame[1]]] = 1.0, 0.9
        else:
            logits[t, token[frame]] = 5.0
    return logits


def test_beam_search_spells_lexicon_words_where_greedy_decoding_misspells() -> None:
    # HEL(L|blank)LO: greedy takes L on the blank frame and collapses the double L
    frames = ["H", "E", "L", ("L", "<pad>"), "L", "O", "|", "W", "O", "R", "L", "D"]
    logits = _spelled_logits(frames)
    assert ctc_greedy_decode(logits)[0] == "HELO WORLD"
    decoder = BeamSearchDecoder(NgramLM.from_sentences(SENTENCES, order=3))
    assert decoder(logits) == "HELLO WORLD"
    assert decoder(logits.numpy()) == "HELLO WORLD"
    assert decoder(torch.zeros(0, len(VOCAB))) == ""


def test_beam_search_refuses_bad_logits_and_unusable_language_models() -> None:
    decoder = BeamSearchDecoder(NgramLM.from_sentences(SENTENCES, order=2))
    with pytest.raises(NumericsError, match="NaN"):
        decoder(torch.full((4, len(VOCAB)), math.nan))
    with pytest.raises(ValueError, match="expected \\(frames, 32\\) logits"):
        decoder(np.zeros((1, 4, len(VOCAB))))
    with pytest.raises(LanguageModelError, match="can be spelled"):
        BeamSearchDecoder(NgramLM.from_sentences(["lower case words"]))
    with pytest.raises(LanguageModelError, match="beam_size"):
        BeamSearchDecoder(NgramLM.from_sentences(SENTENCES), beam_size=0)


def test_the_decoder_identity_changes_with_its_settings_and_language_model() -> None:
    lm = NgramLM.from_sentences(SENTENCES)
    base = BeamSearchDecoder(lm).identity
    assert BeamSearchDecoder(lm).identity == base
    assert BeamSearchDecoder(lm, lm_weight=1.0).identity != base
    assert BeamSearchDecoder(NgramLM.from_sentences(SENTENCES[:-1])).identity != base


def test_the_shipped_language_model_loads_and_spells_with_the_reference_vocabulary() -> None:
    from sq_pt2e.assets import language_model

    lm = NgramLM.load(language_model())
    assert lm.order == 3 and len(lm.words()) > 10_000
    decoder = BeamSearchDecoder(lm)
    assert len(decoder.words) == len(lm.words())


def test_decoding_from_several_threads_gives_each_utterance_its_own_transcript() -> None:
    from concurrent.futures import ThreadPoolExecutor

    decoder = BeamSearchDecoder(NgramLM.from_sentences(SENTENCES, order=3))
    utterances = [_spelled_logits([f for c in "|".join(s.split()) for f in (c, "<pad>")]) for s in SENTENCES] * 4
    expected = [decoder(x) for x in utterances]
    assert expected[:len(SENTENCES)] == SENTENCES
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(decoder, utterances)) == expected
