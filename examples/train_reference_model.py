"""Render the synthetic corpus and train (or resume) a reference CTC model on CPU.

Usage:
    python examples/train_reference_model.py corpus --out corpus
    python examples/train_reference_model.py train --model ref-wav2vec2 --minutes 600
    python examples/train_reference_model.py export --model ref-wav2vec2
    python examples/train_reference_model.py card --model ref-wav2vec2
    python examples/train_reference_model.py lm --corpus corpus

``corpus`` needs espeak-ng (flite and festival add voices when installed). ``train``
resumes from runs/<model>/state.pt when present, else from the shipped model folder.
``export`` copies the best checkpoint into the package and rewrites its model card;
``card`` evaluates the shipped weights again and rewrites the card; ``lm`` estimates the
word 3-gram language model of the training sentences.
The same verbs are available as ``python -m sq_pt2e.train``.
"""

from __future__ import annotations

from sq_pt2e.train.cli import main as _cli_main


def main(argv: list[str] | None = None) -> int:
    """Run one verb (``corpus``, ``train``, ``ship``, ``export``, ``card`` or ``lm``); returns the exit status.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    return _cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
