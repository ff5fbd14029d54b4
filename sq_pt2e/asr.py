"""Speech recognition metrics: CTC greedy decoding, normalisation, WER/CER, confidence
intervals, and agreement between a quantized model and its float model.

WER and CER are corpus rates in percent (total errors over total reference words or
characters, as jiwer computes them), after LibriSpeech normalisation of both sides.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sq_pt2e.errors import NumericsError
from sq_pt2e.models.vocab import BLANK_ID, VOCAB, WORD_DELIMITER

__all__ = [
    "Agreement",
    "BootstrapDelta",
    "cer",
    "ctc_greedy_decode",
    "greedy_transcript",
    "logit_agreement",
    "normalize_transcript",
    "paired_bootstrap_delta",
    "per_utterance_errors",
    "per_utterance_word_errors",
    "wer",
]

_NOT_ALLOWED = re.compile(r"[^A-Z' ]+")
# Typographic apostrophes and hyphens/dashes that join or separate words.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_WORD_JOINERS = re.compile(r"[-\u2010-\u2015_/]")


def _is_special(token: str) -> bool:
    return len(token) > 2 and token.startswith("<") and token.endswith(">")


def ctc_greedy_decode(logits: torch.Tensor | np.ndarray, vocab: Sequence[str] = VOCAB, *,
                      blank_id: int = BLANK_ID, lengths: Sequence[int] | None = None) -> list[str]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks and specials.

    Special tokens are the ``<...>`` entries of ``vocab`` (``<pad>``, ``<s>``, ``</s>``,
    ``<unk>``); the word delimiter ``|`` becomes a space, and leading, trailing or
    repeated spaces are removed.

    Args:
        logits: ``(frames, vocab)`` or ``(batch, frames, vocab)`` scores (logits,
            log-probabilities or probabilities: only the argmax is used).
        vocab: the token of each output index.
        blank_id: index of the CTC blank.
        lengths: valid frames per batch item (padded batches); all frames if ``None``.

    Returns:
        One transcript per batch item (a list of one for 2-D input).

    Raises:
        ValueError: not 2-D/3-D, last dimension not ``len(vocab)``, or bad ``lengths``.
        NumericsError: NaN/Inf scores (argmax over NaN would decode garbage silently).

    Example:
        >>> ctc_greedy_decode(model(wave).logits)
        ['HELLO WORLD']
    """
    scores = torch.as_tensor(logits)
    if scores.ndim not in (2, 3):
        msg = f"expected logits of shape (frames, vocab) or (batch, frames, vocab), got {tuple(scores.shape)}"
        raise ValueError(msg)
    if scores.shape[-1] != len(vocab):
        raise ValueError(f"logits have {scores.shape[-1]} classes but the vocabulary has {len(vocab)} tokens")
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise NumericsError(f"{bad} of {scores.numel()} logits are NaN or infinite: the model output is unusable")
    ids = scores.argmax(dim=-1)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if lengths is not None and (len(lengths) != ids.shape[0] or any(not 0 <= n <= ids.shape[1] for n in lengths)):
        raise ValueError(f"lengths {list(lengths)} do not fit a batch of {ids.shape[0]} x {ids.shape[1]} frames")
    dropped = {i for i, token in enumerate(vocab) if _is_special(token)} | {blank_id}
    texts = []
    for row_index, row in enumerate(ids):
        if lengths is not None:
            row = row[: lengths[row_index]]
        tokens = [vocab[i] for i in torch.unique_consecutive(row).tolist() if i not in dropped]
        words = "".join(tokens).replace(WORD_DELIMITER, " ")
        texts.append(" ".join(words.split()))
    return texts


def greedy_transcript(logits: torch.Tensor | np.ndarray) -> str:
    """Greedy CTC transcript of one utterance's ``(frames, vocab)`` logits (the default decoder)."""
    return ctc_greedy_decode(logits)[0]


def normalize_transcript(text: str) -> str:
    """LibriSpeech normalisation: upper case, only A-Z, apostrophes and single spaces.

    Accents are stripped (``café`` -> ``CAFE``), typographic apostrophes become ``'``,
    hyphens and dashes separate words, every other character becomes a space.

    Args:
        text: a reference or hypothesis transcript.

    Returns:
        The normalised transcript (``""`` if nothing is left).
    """
    decomposed = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    ascii_text = "".join(c for c in decomposed if not unicodedata.combining(c))
    cleaned = _NOT_ALLOWED.sub(" ", _WORD_JOINERS.sub(" ", ascii_text.upper()))
    return " ".join(cleaned.split())


def _check(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise ValueError("references and hypotheses must be sequences of strings, not a single string")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no utterances: WER is undefined for an empty corpus")
    refs = [normalize_transcript(r) for r in references]
    hyps = [normalize_transcript(h) for h in hypotheses]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"reference(s) {empty[:5]} are empty after normalisation: WER is undefined for them")
    return refs, hyps


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate in percent: total word errors / total reference words.

    Args:
        references: reference transcripts (normalised here).
        hypotheses: recognised transcripts, same order (normalised here).

    Returns:
        WER in percent (can exceed 100 with many insertions).

    Raises:
        ValueError: different lengths, no utterances, or an empty reference.
    """
    import jiwer

    refs, hyps = _check(references, hypotheses)
    return 100.0 * float(jiwer.wer(refs, hyps))


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate in percent (spaces count as characters, as in jiwer).

    Args:
        references: reference transcripts (normalised here).
        hypotheses: recognised transcripts, same order (normalised here).

    Raises:
        ValueError: different lengths, no utterances, or an empty reference.
    """
    import jiwer

    refs, hyps = _check(references, hypotheses)
    return 100.0 * float(jiwer.cer(refs, hyps))


def per_utterance_errors(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """Word errors and reference words of each utterance.

    Args:
        references: reference transcripts (normalised here).
        hypotheses: recognised transcripts, same order.

    Returns:
        ``(utterances, 2)`` float64 array of (substitutions + deletions + insertions,
        reference words); ``100 * a[:, 0].sum() / a[:, 1].sum()`` equals :func:`wer`.

    Raises:
        ValueError: different lengths, no utterances, or an empty reference.
    """
    import jiwer

    refs, hyps = _check(references, hypotheses)
    rows = []
    for ref, hyp in zip(refs, hyps, strict=True):
        out = jiwer.process_words(ref, hyp)
        rows.append((out.substitutions + out.deletions + out.insertions, len(ref.split())))
    return np.asarray(rows, dtype=np.float64)


per_utterance_word_errors = per_utterance_errors  # earlier name, kept for callers


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
                           n: int = 1000, seed: int = 0, *, confidence: float = 0.95) -> BootstrapDelta:
    """Paired bootstrap over utterances of the corpus-WER difference ``b - a``.

    Each resample draws utterances with replacement, the same draw for both systems,
    and recomputes both corpus WERs (errors / words of the drawn utterances). The
    interval is the percentile interval of the resampled differences.

    Args:
        references: reference transcripts.
        hypotheses_a: transcripts of system a (e.g. float), same order.
        hypotheses_b: transcripts of system b (e.g. int8), same order.
        n: number of bootstrap resamples.
        seed: seed of the resampling (same seed, same interval).
        confidence: coverage of the interval, in (0, 1).

    Returns:
        The observed delta in percentage points and its interval.

    Raises:
        ValueError: mismatched inputs, ``n < 1`` or ``confidence`` outside (0, 1).

    Example:
        >>> print(paired_bootstrap_delta(refs, float_texts, int8_texts))
        +0.12 [-0.05, +0.31]
    """
    if n < 1:
        raise ValueError(f"n={n} bootstrap resamples (expected >= 1)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} (expected 0 < confidence < 1)")
    if len(hypotheses_a) != len(hypotheses_b):
        raise ValueError(f"{len(hypotheses_a)} hypotheses in a but {len(hypotheses_b)} in b")
    errors_a = per_utterance_errors(references, hypotheses_a)
    errors_b = per_utterance_errors(references, hypotheses_b)
    words = errors_a[:, 1]
    delta = 100.0 * (errors_b[:, 0].sum() - errors_a[:, 0].sum()) / words.sum()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(words), size=(n, len(words)))
    diffs = 100.0 * (errors_b[picks, 0].sum(1) - errors_a[picks, 0].sum(1)) / words[picks].sum(1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return BootstrapDelta(float(delta), float(low), float(high), confidence, n)


@dataclass(frozen=True)
class Agreement:
    """How closely quantized logits follow float logits.

    Attributes:
        cosine: cosine similarity of the flattened logits.
        kl: mean over frames of KL(softmax(float) || softmax(quantized)), in nats.
        sqnr_db: 10 log10(|float|^2 / |float - quantized|^2); ``inf`` when identical.
        argmax_agreement: share of frames whose best token is the same.
    """

    cosine: float
    kl: float
    sqnr_db: float
    argmax_agreement: float


def logit_agreement(float_logits: torch.Tensor | np.ndarray, quant_logits: torch.Tensor | np.ndarray) -> Agreement:
    """Compare quantized logits with float logits of the same input.

    Args:
        float_logits: reference logits ``(..., vocab)``.
        quant_logits: logits of the quantized model, same shape.

    Returns:
        Cosine, KL, SQNR and argmax agreement, computed in float64.

    Raises:
        ValueError: the shapes differ or are empty.
        NumericsError: either side holds NaN/Inf (a cosine of NaN would compare as no match, silently).
    """
    ref = torch.as_tensor(float_logits).detach().double()
    out = torch.as_tensor(quant_logits).detach().double()
    if ref.shape != out.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    if ref.numel() == 0 or ref.ndim == 0:
        raise ValueError(f"logits of shape {tuple(ref.shape)} have nothing to compare")
    for label, tensor in (("float", ref), ("quantized", out)):
        if not bool(torch.isfinite(tensor).all()):
            raise NumericsError(f"{int((~torch.isfinite(tensor)).sum())} {label} logits are NaN or infinite")
    cosine = float(torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0))
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    noise = float(((ref - out) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0:
        sqnr = float("inf")
    elif signal == 0:
        sqnr = float("-inf")
    else:
        sqnr = 10.0 * float(np.log10(signal / noise))
    agree = float((ref.argmax(-1) == out.argmax(-1)).double().mean())
    return Agreement(cosine, kl, sqnr, agree)
