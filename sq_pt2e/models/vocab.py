"""The 32-symbol character vocabulary of facebook/wav2vec2-base-960h.

Every reference model in this project uses it, so real English CTC checkpoints
(wav2vec2-base-960h, hubert-large-ls960-ft, ...) and ours share one decoder.
Index 0 (``<pad>``) is the CTC blank; ``|`` is the word delimiter.
"""

from __future__ import annotations

__all__ = ["VOCAB", "BLANK_ID", "WORD_DELIMITER", "vocab_dict"]

VOCAB: tuple[str, ...] = (
    "<pad>", "<s>", "</s>", "<unk>", "|",
    "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C",
    "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z",
)  # fmt: skip
BLANK_ID = 0
WORD_DELIMITER = "|"


def vocab_dict() -> dict[str, int]:
    """Return the vocabulary as the ``vocab.json`` mapping of Hugging Face checkpoints."""
    return {token: index for index, token in enumerate(VOCAB)}
