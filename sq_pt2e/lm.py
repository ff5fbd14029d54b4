"""Word n-gram language models in the ARPA back-off format, for CTC beam search.

:class:`NgramLM` estimates an interpolated Kneser-Ney model from sentences (the
estimate KenLM's ``lmplz`` makes, with one fixed discount), reads and writes ARPA
files (plain or ``.gz``; models from other toolkits load too) and answers back-off
queries. :mod:`sq_pt2e.beam` decodes CTC output with it.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sq_pt2e.atomic import atomic_write_bytes
from sq_pt2e.errors import LanguageModelError

__all__ = ["BOS", "EOS", "UNK", "NgramLM"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_NEVER = -99.0  # ARPA's log10 probability of <s>, which is never predicted

Ngram = tuple[str, ...]


def _adjusted_counts(sentences: Iterable[str], order: int) -> list[collections.Counter[Ngram]]:
    """Kneser-Ney counts per order (index k-1): raw counts at the highest order and for
    n-grams starting with <s>, distinct left extensions (continuation counts) otherwise."""
    raw: list[collections.Counter[Ngram]] = [collections.Counter() for _ in range(order)]
    for sentence in sentences:
        tokens = [BOS, *sentence.split(), EOS]
        for k in range(1, order + 1):
            for start in range(len(tokens) - k + 1):
                ngram = tuple(tokens[start:start + k])
                if ngram != (BOS,):
                    raw[k - 1][ngram] += 1
    adjusted = [collections.Counter() for _ in range(order - 1)] + [raw[order - 1]]
    for k in range(2, order + 1):
        for ngram in raw[k - 1]:
            adjusted[k - 2][ngram[1:]] += 1
    for k in range(1, order):
        for ngram, count in raw[k - 1].items():
            if ngram[0] == BOS:
                adjusted[k - 1][ngram] = count
    return adjusted


@dataclass(frozen=True)
class NgramLM:
    """A back-off word n-gram model: log10 probabilities and back-off weights per n-gram.

    ``log10_probs`` holds every listed n-gram (unigrams include ``</s>`` and ``<unk>``),
    ``log10_backoffs`` the back-off weight of each listed n-gram that has one.
    """

    order: int
    log10_probs: dict[Ngram, float]
    log10_backoffs: dict[Ngram, float]

    @classmethod
    def from_sentences(cls, sentences: Iterable[str], *, order: int = 3, discount: float = 0.75) -> NgramLM:
        """Interpolated Kneser-Ney estimate from whitespace-tokenised sentences.

        Args:
            sentences: one sentence per item (``<s>`` / ``</s>`` are added).
            order: the longest n-gram (at least 1).
            discount: absolute discount subtracted from every count (0 < discount < 1).

        Raises:
            LanguageModelError: bad order or discount, or no words.
        """
        if order < 1:
            raise LanguageModelError(f"n-gram order must be at least 1, got {order}")
        if not 0.0 < discount < 1.0:
            raise LanguageModelError(f"discount must be in (0, 1), got {discount}")
        counts = _adjusted_counts(sentences, order)
        if not set(counts[0]) - {(EOS,)}:
            raise LanguageModelError("no words to estimate a language model from")
        # per context: total count and number of distinct continuations, order by order
        totals = [collections.Counter() for _ in range(order)]
        types = [collections.Counter() for _ in range(order)]
        for k, table in enumerate(counts):
            for ngram, count in table.items():
                totals[k][ngram[:-1]] += count
                types[k][ngram[:-1]] += 1
        vocabulary = [ngram[0] for ngram in counts[0]] + ([UNK] if (UNK,) not in counts[0] else [])
        uniform = 1.0 / len(vocabulary)
        probs: dict[Ngram, float] = {}
        backoffs: dict[Ngram, float] = {}
        for k, table in enumerate(counts):
            for context in totals[k]:
                backoffs[context] = discount * types[k][context] / totals[k][context]
            for ngram, count in sorted(table.items()):
                context = ngram[:-1]
                lower = uniform if k == 0 else probs[ngram[1:]]
                probs[ngram] = (count - discount) / totals[k][context] + backoffs[context] * lower
            if k == 0:
                probs[(UNK,)] = probs.get((UNK,), backoffs[()] * uniform)
        return cls(order, {g: math.log10(p) for g, p in probs.items()} | {(BOS,): _NEVER},
                   {g: math.log10(b) for g, b in backoffs.items() if g})

    def digest(self) -> str:
        """SHA-256 of the model's n-grams, probabilities and back-off weights."""
        digest = hashlib.sha256(f"order={self.order}".encode())
        for ngram in sorted(self.log10_probs):
            digest.update(f"{' '.join(ngram)}\t{self.log10_probs[ngram]!r}\t{self.log10_backoffs.get(ngram)!r}\n"
                          .encode())
        return digest.hexdigest()

    def words(self) -> list[str]:
        """The vocabulary, without ``<s>``, ``</s>`` and ``<unk>``, sorted."""
        return sorted(g[0] for g in self.log10_probs if len(g) == 1 and g[0] not in (BOS, EOS, UNK))

    def log10_prob(self, context: Sequence[str], word: str) -> float:
        """log10 P(word | context) by back-off; words outside the vocabulary score as ``<unk>``.

        Only the last ``order - 1`` words of ``context`` are used.

        Raises:
            LanguageModelError: the model has no ``<unk>`` and ``word`` is unknown.
        """
        if (word,) not in self.log10_probs:
            word = UNK
            if (UNK,) not in self.log10_probs:
                raise LanguageModelError(f"word {word!r} is not in the language model, which has no <unk>")
        history = tuple(context)[-(self.order - 1):] if self.order > 1 else ()
        penalty = 0.0
        while (*history, word) not in self.log10_probs:
            penalty += self.log10_backoffs.get(history, 0.0)
            history = history[1:]
        return penalty + self.log10_probs[(*history, word)]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the ARPA file atomically (gzip-compressed when the name ends in ``.gz``)."""
        lines = ["\\data\\"]
        by_order = [sorted(g for g in self.log10_probs if len(g) == k) for k in range(1, self.order + 1)]
        lines += [f"ngram {k}={len(ngrams)}" for k, ngrams in enumerate(by_order, 1)]
        for k, ngrams in enumerate(by_order, 1):
            lines += ["", f"\\{k}-grams:"]
            for ngram in ngrams:
                backoff = self.log10_backoffs.get(ngram)
                fields = [f"{self.log10_probs[ngram]:.7g}", " ".join(ngram)]
                lines.append("\t".join(fields + ([f"{backoff:.7g}"] if backoff is not None else [])))
        data = ("\n".join(lines + ["", "\\end\\", ""])).encode()
        if str(path).endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NgramLM:
        """Read an ARPA file (plain or ``.gz``).

        Raises:
            FileNotFoundError: no such file.
            LanguageModelError: not an ARPA file, or a malformed line (named with its number).
        """
        path = Path(path)
        raw = path.read_bytes()
        try:
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
        except (OSError, UnicodeDecodeError, EOFError) as exc:
            raise LanguageModelError(f"{path}: not a readable ARPA file ({exc})") from exc
        return _parse_arpa(io.StringIO(text), path)


def _parse_arpa(lines: Iterable[str], path: Path) -> NgramLM:
    declared: dict[int, int] = {}
    probs: dict[Ngram, float] = {}
    backoffs: dict[Ngram, float] = {}
    section: int | None = None
    seen_data = ended = False
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or ended:
            continue
        if not seen_data and line != "\\data\\":
            raise LanguageModelError(f"{path}: not an ARPA file (no \\data\\ header before line {number})")
        try:
            if line == "\\data\\":
                seen_data = True
            elif line == "\\end\\":
                ended = True
            elif line.startswith("ngram ") and section is None:
                order, count = line[6:].split("=")
                declared[int(order)] = int(count)
            elif line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:-7])
                if section not in declared:
                    raise ValueError(f"section {line} is not declared in \\data\\")
            elif section is not None:
                fields = line.split()
                ngram = tuple(fields[1:1 + section])
                if len(ngram) != section or len(fields) > section + 2:
                    raise ValueError(f"expected a log10 probability, {section} word(s) and an optional back-off")
                probs[ngram] = float(fields[0])
                if len(fields) == section + 2:
                    backoffs[ngram] = float(fields[-1])
            else:
                raise ValueError("text outside any section")
        except ValueError as exc:
            raise LanguageModelError(f"{path}, line {number}: {exc}: {line[:80]!r}") from exc
    if not declared:
        raise LanguageModelError(f"{path}: not an ARPA file (no n-gram counts in \\data\\)")
    found = collections.Counter(len(g) for g in probs)
    for order, count in declared.items():
        if found[order] != count:
            raise LanguageModelError(f"{path}: \\data\\ declares {count} {order}-grams, the file lists {found[order]}")
    if not ended:
        raise LanguageModelError(f"{path}: truncated (no \\end\\)")
    return NgramLM(max(declared), probs, backoffs)
