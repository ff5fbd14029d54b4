"""Decoding, normalisation, WER/CER, bootstrap intervals and logit agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sq_pt2e.asr import (
    cer,
    ctc_greedy_decode,
    logit_agreement,
    normalize_transcript,
    paired_bootstrap_delta,
    per_utterance_errors,
    wer,
)
from sq_pt2e.errors import NumericsError
from sq_pt2e.models.vocab import VOCAB


def _logits(tokens: list[str]) -> torch.Tensor:
    ids = torch.tensor([VOCAB.index(t) for t in tokens])
    return torch.nn.functional.one_hot(ids, len(VOCAB)).float()


def test_greedy_decoding_collapses_repeats_and_drops_blanks() -> None:
    frames = ["<pad>", "H", "H", "<pad>", "I", "|", "|", "<pad>", "H", "<pad>", "I", "I"]
    assert ctc_greedy_decode(_logits(frames)) == ["HI HI"]


def test_a_blank_separates_a_doubled_letter() -> None:
    assert ctc_greedy_decode(_logits(["L", "<pad>", "L"])) == ["LL"]
    assert ctc_greedy_decode(_logits(["L", "L"])) == ["L"]


def test_special_tokens_and_edge_delimiters_vanish() -> None:
    assert ctc_greedy_decode(_logits(["|", "<s>", "A", "</s>", "<unk>", "|"])) == ["A"]
    assert ctc_greedy_decode(_logits(["<pad>"] * 4)) == [""]


def test_batch_decoding() -> None:
    batch = torch.stack([_logits(["A", "B"]), _logits(["C", "C"])])
    assert ctc_greedy_decode(batch) == ["AB", "C"]
    assert ctc_greedy_decode(batch.numpy()) == ["AB", "C"]


def test_lengths_cut_padding_frames() -> None:
    batch = torch.stack([_logits(["A", "B", "C"]), _logits(["D", "E", "F"])])
    assert ctc_greedy_decode(batch, lengths=[1, 3]) == ["A", "DEF"]
    assert ctc_greedy_decode(batch, lengths=[0, 2]) == ["", "DE"]
    with pytest.raises(ValueError, match="do not fit"):
        ctc_greedy_decode(batch, lengths=[4, 1])


def test_zero_frames_decode_to_empty_strings() -> None:
    assert ctc_greedy_decode(torch.zeros(2, 0, len(VOCAB))) == ["", ""]


def test_decoding_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="33 classes but the vocabulary has 32"):
        ctc_greedy_decode(torch.zeros(4, 33))
    with pytest.raises(ValueError, match="expected logits of shape"):
        ctc_greedy_decode(torch.zeros(1, 1, 4, 32))


def test_custom_vocabulary_drops_its_own_specials() -> None:
    vocab = ("-", "<unk>", "|", "A", "B")
    ids = torch.tensor([3, 1, 3, 0, 3, 2, 4])
    assert ctc_greedy_decode(torch.nn.functional.one_hot(ids, 5).float(), vocab) == ["AAA B"]


def test_librispeech_normalisation() -> None:
    assert normalize_transcript("  Hello, world! It's  a-test. ") == "HELLO WORLD IT'S A TEST"
    assert normalize_transcript("Caf\u00e9 \u2014 \u201cdon\u2019t\u201d  stop\ngap") == "CAFE DON'T STOP GAP"
    assert normalize_transcript("...!?") == ""


def test_wer_and_cer_against_hand_counts() -> None:
    refs = ["THE CAT SAT", "ON THE MAT"]
    hyps = ["THE CAT SAT DOWN", "ON MAT"]  # 1 insertion + 1 deletion over 6 words
    assert wer(refs, hyps) == pytest.approx(100 * 2 / 6)
    assert cer(["ABCD"], ["ABXD"]) == pytest.approx(25.0)
    assert wer(["A B"], ["a, b."]) == 0.0


def test_wer_counts_substitutions_and_empty_hypotheses() -> None:
    # 1 substitution in 4 words, then 3 deletions in 3 words: 4 errors / 7 words
    refs, hyps = ["A B C D", "E F G"], ["A B X D", ""]
    assert wer(refs, hyps) == pytest.approx(100 * 4 / 7)
    np.testing.assert_array_equal(per_utterance_errors(refs, hyps), [[1, 4], [3, 3]])
    assert wer(["A"], ["A B C"]) == pytest.approx(200.0)  # insertions can exceed 100 %


def test_wer_rejects_mismatched_or_empty_references() -> None:
    with pytest.raises(ValueError, match="2 references but 1"):
        wer(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="empty"):
        wer(["..."], ["A"])
    with pytest.raises(ValueError, match="no utterances"):
        cer([], [])
    with pytest.raises(ValueError, match="single string"):
        wer("A B", "A B")


def test_bootstrap_interval_contains_the_delta_and_is_deterministic() -> None:
    refs = ["A B C D"] * 40
    base = ["A B C D"] * 40
    worse = ["A B C X"] * 10 + ["A B C D"] * 30  # 10 errors / 160 words = +6.25 points
    result = paired_bootstrap_delta(refs, base, worse, n=500, seed=3)
    assert result.delta == pytest.approx(6.25) and result.resamples == 500
    assert result.low <= result.delta <= result.high and result.low > 0
    assert paired_bootstrap_delta(refs, base, worse, n=500, seed=3) == result
    assert paired_bootstrap_delta(refs, worse, base, n=500, seed=3).delta == pytest.approx(-6.25)
    same = paired_bootstrap_delta(refs, base, base)
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_covers_the_true_delta_of_a_known_population() -> None:
    # b makes an extra error on each utterance with probability 0.1: true delta = +2.5 points (1 word in 4).
    rng = np.random.default_rng(0)
    refs, base = ["A B C D"] * 200, ["A B C D"] * 200
    covered = 0
    for trial in range(20):
        worse = ["A B C X" if flip else "A B C D" for flip in rng.random(200) < 0.1]
        result = paired_bootstrap_delta(refs, base, worse, n=400, seed=trial)
        covered += result.low <= 2.5 <= result.high
    assert covered >= 16  # 95 % intervals: about 19 of 20


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n=0"):
        paired_bootstrap_delta(["A"], ["A"], ["A"], n=0)
    with pytest.raises(ValueError, match="confidence=1.5"):
        paired_bootstrap_delta(["A"], ["A"], ["A"], confidence=1.5)
    with pytest.raises(ValueError, match="1 hypotheses in a but 2 in b"):
        paired_bootstrap_delta(["A"], ["A"], ["A", "B"])


def test_logit_agreement_identical_and_perturbed() -> None:
    logits = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    same = logit_agreement(logits, logits)
    assert same.cosine == pytest.approx(1.0) and same.kl == pytest.approx(0.0, abs=1e-12)
    assert same.argmax_agreement == 1.0 and same.sqnr_db == float("inf")
    noisy = logit_agreement(logits, logits + 0.1 * torch.randn(50, 32, generator=torch.Generator().manual_seed(1)))
    assert 0.99 < noisy.cosine < 1.0 and noisy.kl > 0 and 15 < noisy.sqnr_db < 25
    with pytest.raises(ValueError, match="shapes differ"):
        logit_agreement(logits, logits[:10])


def test_logit_agreement_against_closed_form_values() -> None:
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    out = torch.tensor([[0.0, 1.0], [0.0, 2.0]])  # first frame changes its best token
    result = logit_agreement(ref, out.numpy())
    assert result.argmax_agreement == 0.5
    p, q = torch.softmax(ref[0], -1), torch.softmax(out[0], -1)
    assert result.kl == pytest.approx(float((p * (p.log() - q.log())).sum()) / 2)  # second frame: KL 0
    assert result.sqnr_db == pytest.approx(10 * np.log10(8.0 / 5.0))
    assert result.cosine == pytest.approx(4.0 / (8**0.5 * 5**0.5))


def test_non_finite_logits_are_an_error_not_a_transcript() -> None:
    logits = torch.zeros(5, len(VOCAB))
    logits[2, 4] = float("nan")
    with pytest.raises(NumericsError, match="1 of 160 logits are NaN or infinite"):
        ctc_greedy_decode(logits)
    with pytest.raises(NumericsError, match="1 quantized logits are NaN"):
        logit_agreement(torch.zeros(5, len(VOCAB)), logits)
    assert ctc_greedy_decode(torch.zeros(5, len(VOCAB), dtype=torch.int64)) == [""]  # integer scores pass


def test_transcribe_consumes_a_stream_and_can_drop_logits(tmp_path) -> None:
    from sq_pt2e.accuracy import transcribe
    from sq_pt2e.inputs import LoadedUtterance

    def forward(wave: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(1, 4, len(VOCAB))
        out[0, :, VOCAB.index("A")] = 1.0 if wave.sum() >= 0 else float("nan")
        return out

    stream = (LoadedUtterance(str(i), tmp_path / f"{i}.wav", "", torch.ones(1, 400)) for i in range(3))
    texts, logits = transcribe(forward, stream, keep_logits=False)
    assert texts == ["A"] * 3 and logits == []
    bad = [LoadedUtterance("x", tmp_path / "x.wav", "", -torch.ones(1, 400))]
    with pytest.raises(NumericsError, match=r"x.wav: 4 of 128 logits are NaN"):
        transcribe(forward, bad)
