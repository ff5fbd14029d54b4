"""Decoding, normalisation, WER/CER, bootstrap intervals and logit agreement."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.asr import (
    cer,
    ctc_greedy_decode,
    logit_agreement,
    normalize_transcript,
    paired_bootstrap_delta,
    wer,
)
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


def test_librispeech_normalisation() -> None:
    assert normalize_transcript("  Hello, world! It's  a-test. ") == "HELLO WORLD IT'S A TEST"


def test_wer_and_cer_against_hand_counts() -> None:
    refs = ["THE CAT SAT", "ON THE MAT"]
    hyps = ["THE CAT SAT DOWN", "ON MAT"]  # 1 insertion + 1 deletion over 6 words
    assert wer(refs, hyps) == pytest.approx(100 * 2 / 6)
    assert cer(["ABCD"], ["ABXD"]) == pytest.approx(25.0)
    assert wer(["A B"], ["a, b."]) == 0.0


def test_wer_rejects_mismatched_or_empty_references() -> None:
    with pytest.raises(ValueError, match="2 references but 1"):
        wer(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="empty"):
        wer(["..."], ["A"])


def test_bootstrap_interval_contains_the_delta_and_is_deterministic() -> None:
    refs = ["A B C D"] * 40
    base = ["A B C D"] * 40
    worse = ["A B C X"] * 10 + ["A B C D"] * 30  # 10 errors / 160 words = +6.25 points
    result = paired_bootstrap_delta(refs, base, worse, resamples=500, seed=3)
    assert result.delta == pytest.approx(6.25)
    assert result.low <= result.delta <= result.high and result.low > 0
    assert paired_bootstrap_delta(refs, base, worse, resamples=500, seed=3) == result
    same = paired_bootstrap_delta(refs, base, base)
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0)


def test_logit_agreement_identical_and_perturbed() -> None:
    logits = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    same = logit_agreement(logits, logits)
    assert same.cosine == pytest.approx(1.0) and same.kl == pytest.approx(0.0, abs=1e-12)
    assert same.argmax_agreement == 1.0 and same.sqnr_db == float("inf")
    noisy = logit_agreement(logits, logits + 0.1 * torch.randn(50, 32, generator=torch.Generator().manual_seed(1)))
    assert 0.99 < noisy.cosine < 1.0 and noisy.kl > 0 and 15 < noisy.sqnr_db < 25
    with pytest.raises(ValueError, match="shapes differ"):
        logit_agreement(logits, logits[:10])
