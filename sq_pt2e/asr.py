"""Speech recognition metrics: CTC greedy decoding, normalisation, WER/CER, confidence
intervals, and agreement between a quantized model and its float model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sq_pt2e.models.vocab import BLANK_ID, VOCAB, WORD_DELIMITER

__all__ = [
    "Agreement",
    "BootstrapDelta",
    "cer",
    "ctc_greedy_decode",
    "logit_agreement",
    "normalize_transcript",
    "paired_bootstrap_delta",
    "per_utterance_word_errors",
    "wer",
]

_SPECIAL = {i for i, token in enumerate(VOCAB) if token.startswith("<")}
_NOT_ALLOWED = re.compile(r"[^A-Z' ]+")


def ctc_greedy_decode(logits: torch.Tensor | np.ndarray, vocab: Sequence[str] = VOCAB) -> list[str]:
    """Best path: argmax per frame, collapse repeats, drop blanks and special tokens.

    Args:
        logits: ``(frames, vocab)`` or ``(batch, frames, vocab)``.

    Returns:
        One transcript per batch item, words separated by single spaces.
    """
    ids = torch.as_tensor(logits).argmax(dim=-1)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    texts = []
    for row in ids.tolist():
        tokens, previous = [], None
        for index in row:
            if index != previous and index != BLANK_ID and index not in _SPECIAL:
                tokens.append(vocab[index])
            previous = index
        words = "".join(tokens).replace(WORD_DELIMITER, " ")
        texts.append(" ".join(words.split()))
    return texts


def normalize_transcript(text: str) -> str:
    """LibriSpeech normalisation: upper case, punctuation except apostrophes removed."""
    cleaned = _NOT_ALLOWED.sub(" ", text.upper().replace("-", " "))
    return " ".join(cleaned.split())


def _check(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize_transcript(r) for r in references]
    hyps = [normalize_transcript(h) for h in hypotheses]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"reference(s) {empty[:5]} are empty after normalisation: WER is undefined for them")
    return refs, hyps


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate in percent (total errors / total reference words)."""
    import jiwer

    refs, hyps = _check(references, hypotheses)
    return 100.0 * jiwer.wer(refs, hyps)


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate in percent."""
    import jiwer

    refs, hyps = _check(references, hypotheses)
    return 100.0 * jiwer.cer(refs, hyps)


def per_utterance_word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """``(utterances, 2)`` array of (word errors, reference words) per utterance."""
    import jiwer

    refs, hyps = _check(references, hypotheses)
    rows = []
    for ref, hyp in zip(refs, hyps, strict=True):
        out = jiwer.process_words(ref, hyp)
        rows.append((out.substitutions + out.deletions + out.insertions, len(ref.split())))
    return np.asarray(rows, dtype=np.float64)


@dataclass(frozen=True)
class BootstrapDelta:
    """WER(b) - WER(a) in percentage points with a paired bootstrap confidence interval."""

    delta: float
    low: float
    high: float
    confidence: float
    resamples: int

    def __str__(self) -> str:
        return f"{self.delta:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_bootstrap_delta(references: Sequence[str], hypotheses_a: Sequence[str], hypotheses_b: Sequence[str],
                           *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> BootstrapDelta:
    """Paired bootstrap over utterances of the corpus-WER difference b - a (points)."""
    errors_a = per_utterance_word_errors(references, hypotheses_a)
    errors_b = per_utterance_word_errors(references, hypotheses_b)
    words = errors_a[:, 1]
    delta = 100.0 * (errors_b[:, 0].sum() - errors_a[:, 0].sum()) / words.sum()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(words), size=(resamples, len(words)))
    diffs = 100.0 * (errors_b[picks, 0].sum(1) - errors_a[picks, 0].sum(1)) / words[picks].sum(1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return BootstrapDelta(float(delta), float(low), float(high), confidence, resamples)


@dataclass(frozen=True)
class Agreement:
    """How closely quantized logits follow float logits."""

    cosine: float
    kl: float  # mean over frames of KL(float || quantized) of the softmax
    sqnr_db: float
    argmax_agreement: float  # share of frames with the same best token


def logit_agreement(float_logits: torch.Tensor, quant_logits: torch.Tensor) -> Agreement:
    """Compare two logit tensors of the same shape (..., vocab)."""
    if float_logits.shape != quant_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(float_logits.shape)} vs {tuple(quant_logits.shape)}")
    ref, out = float_logits.detach().double(), quant_logits.detach().double()
    cosine = float(torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0))
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    noise = float(((ref - out) ** 2).sum())
    sqnr = float("inf") if noise == 0 else 10.0 * float(np.log10(float((ref**2).sum()) / noise))
    agree = float((ref.argmax(-1) == out.argmax(-1)).double().mean())
    return Agreement(cosine, kl, sqnr, agree)
