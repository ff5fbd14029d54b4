"""CTC beam search over a word lexicon, scored by a word n-gram language model.

The search is flashlight-text's lexicon decoder (the one behind torchaudio's
``ctc_decoder``); the language model is an :class:`sq_pt2e.lm.NgramLM` queried from
Python. Words are spelled with the model's character vocabulary; a word of the
language model that cannot be spelled with it is left out of the lexicon.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from sq_pt2e.errors import LanguageModelError, NumericsError
from sq_pt2e.lm import BOS, EOS, NgramLM
from sq_pt2e.models.vocab import BLANK_ID, VOCAB, WORD_DELIMITER

__all__ = ["DEFAULT_LM_WEIGHT", "DEFAULT_WORD_SCORE", "BeamSearchDecoder"]

# the lowest summed dev WER of both reference models with the shipped LM (synthetic dev split, 184
# utterances; grid lm_weight 0.5 / 0.7 / 0.9 x word_score -1 / 0 / 1)
DEFAULT_LM_WEIGHT = 0.7
DEFAULT_WORD_SCORE = -1.0
_LN10 = math.log(10.0)


def _flashlight_lm(lm: NgramLM, words: Sequence[str]) -> object:
    """A flashlight ``LM`` whose states carry their word history (natural-log scores)."""
    from flashlight.lib.text.decoder import LM, LMState

    class _NgramState(LM):
        def __init__(self) -> None:
            LM.__init__(self)
            self._history: dict[LMState, tuple[str, ...]] = {}
            self._keep = max(lm.order - 1, 0)

        def start(self, start_with_nothing: bool) -> LMState:
            state = LMState()
            self._history = {state: (BOS,)}
            return state

        def _advance(self, state: LMState, index: int, word: str) -> tuple[LMState, float]:
            history = self._history[state]
            child = state.child(index)
            self._history[child] = (*history, word)[-self._keep:] if self._keep else ()
            return child, lm.log10_prob(history, word) * _LN10

        def score(self, state: LMState, index: int) -> tuple[LMState, float]:
            return self._advance(state, index, words[index])

        def finish(self, state: LMState) -> tuple[LMState, float]:
            return self._advance(state, -1, EOS)

    return _NgramState()


class BeamSearchDecoder:
    """Logits -> transcript by lexicon-constrained CTC beam search with an n-gram LM.

    Calls from several threads are safe; they decode one at a time.

    Args:
        lm: the word language model; its vocabulary is the lexicon.
        lm_weight: weight of the LM's natural-log probability against the acoustic score.
        word_score: added per emitted word (positive favours more words).
        beam_size: hypotheses kept per frame.
        beam_threshold: hypotheses scoring this far below the best are pruned.
        vocab: the model's output tokens (blank ``<pad>``, word delimiter ``|``).

    Raises:
        LanguageModelError: no LM word can be spelled with ``vocab``, or a bad setting.
    """

    def __init__(self, lm: NgramLM, *, lm_weight: float = DEFAULT_LM_WEIGHT,
                 word_score: float = DEFAULT_WORD_SCORE, beam_size: int = 100, beam_threshold: float = 25.0,
                 vocab: Sequence[str] = VOCAB) -> None:
        from flashlight.lib.text.decoder import (CriterionType, LexiconDecoder, LexiconDecoderOptions,
                                                 SmearingMode, Trie)

        if beam_size < 1:
            raise LanguageModelError(f"beam_size must be at least 1, got {beam_size}")
        if not math.isfinite(lm_weight) or not math.isfinite(word_score):
            raise LanguageModelError(f"lm_weight and word_score must be finite, got {lm_weight}, {word_score}")
        token = {t: i for i, t in enumerate(vocab)}
        delimiter = token[WORD_DELIMITER]
        self.words = [w for w in lm.words() if all(c in token and c != WORD_DELIMITER for c in w)]
        if not self.words:
            raise LanguageModelError("no word of the language model can be spelled with the model's vocabulary "
                                     f"(first words: {lm.words()[:5]}); the reference models spell upper case")
        self.vocab_size, self._delimiter = len(vocab), delimiter
        self._settings = (f"beam search lm_weight={lm_weight!r} word_score={word_score!r} beam_size={beam_size} "
                          f"beam_threshold={beam_threshold!r} vocab={list(vocab)}")
        self._ngram = lm
        self._lm = _flashlight_lm(lm, self.words)  # the decoder holds it, but Python must keep it alive too
        trie = Trie(len(vocab), delimiter)
        start = self._lm.start(False)
        for index, word in enumerate(self.words):
            _, score = self._lm.score(start, index)
            trie.insert([token[c] for c in word] + [delimiter], index, score)
        trie.smear(SmearingMode.MAX)
        options = LexiconDecoderOptions(beam_size=beam_size, beam_size_token=len(vocab),
                                        beam_threshold=beam_threshold, lm_weight=lm_weight, word_score=word_score,
                                        unk_score=-math.inf, sil_score=0.0, log_add=False,
                                        criterion_type=CriterionType.CTC)
        self._decoder = LexiconDecoder(options, trie, self._lm, delimiter, BLANK_ID, -1, [], False)
        # the search and the LM's state table serve one utterance at a time (flashlight-text 0.0.7
        # keeps the GIL while decoding; the lock keeps that true if a release stops doing so)
        self._lock = threading.Lock()

    @functools.cached_property
    def identity(self) -> str:
        """The settings and the LM's digest: what the transcripts depend on besides the logits."""
        return f"{self._settings} lm={self._ngram.digest()}"

    def __call__(self, logits: torch.Tensor | np.ndarray) -> str:
        """The best transcript of one utterance's ``(frames, vocab)`` logits (upper case, single spaces).

        Raises:
            NumericsError: NaN/Inf logits.
            ValueError: wrong shape.
        """
        scores = torch.as_tensor(logits).detach().float()
        if scores.dim() != 2 or scores.shape[1] != self.vocab_size:
            raise ValueError(f"expected (frames, {self.vocab_size}) logits, got shape {tuple(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise NumericsError("logits contain NaN/Inf values")
        if scores.shape[0] == 0:
            return ""
        # a last frame that is surely the word delimiter: the utterance's end also ends its last word
        end = torch.full((1, self.vocab_size), -1e4)
        end[0, self._delimiter] = 0.0
        emissions = torch.cat([torch.log_softmax(scores, dim=-1), end]).contiguous()
        with self._lock:
            best = self._decoder.decode(emissions.data_ptr(), emissions.shape[0], emissions.shape[1])[0]
        return " ".join(self.words[i] for i in best.words if i >= 0)
