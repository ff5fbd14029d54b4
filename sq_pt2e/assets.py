"""What ships with the package: evaluation and calibration audio, reference models.

LibriSpeech audio is CC BY 4.0; see assets/LICENSES.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sq_pt2e.data import Utterance, manifest_from_folder, read_manifest
from sq_pt2e.errors import AudioError

__all__ = ["asset_path", "calibration_files", "librispeech_manifest", "reference_model", "synthetic_manifest"]

_ROOT = Path(__file__).resolve().parent / "assets"
_LIBRISPEECH_SUBSETS = ("test-other", "test-clean")


def asset_path(*parts: str) -> Path:
    """Path of a shipped asset (it need not exist), e.g. ``asset_path("librispeech", "transcripts.tsv")``.

    Args:
        *parts: path components below the package's ``assets/`` folder.
    """
    return _ROOT.joinpath(*parts)


def librispeech_manifest(subset: Literal["test-other", "test-clean"] | None = None) -> list[Utterance]:
    """The shipped LibriSpeech utterances with their reference transcripts.

    Args:
        subset: ``"test-other"`` (60 utterances, 10 speakers), ``"test-clean"`` (4), or
            ``None`` for all 64, in the order of ``transcripts.tsv``.

    Raises:
        AudioError: an unknown subset.

    Example:
        >>> refs = [u.text for u in librispeech_manifest("test-other")]
    """
    if subset is not None and subset not in _LIBRISPEECH_SUBSETS:
        raise AudioError(f"unknown LibriSpeech subset {subset!r} (shipped: {', '.join(_LIBRISPEECH_SUBSETS)})")
    utterances = read_manifest(asset_path("librispeech", "transcripts.tsv"))
    if subset is None:
        return utterances
    return [u for u in utterances if u.path.parent.name == subset]


def calibration_files() -> list[Path]:
    """The 24 shipped unlabeled calibration files, sorted by name.

    LibriSpeech train-clean-100, one utterance per speaker, no speaker shared with the
    test sets.
    """
    return [u.path for u in manifest_from_folder(asset_path("calibration"))]


def synthetic_manifest(split: Literal["test", "dev"]) -> list[Utterance]:
    """The shipped slice of the synthetic corpus (espeak-ng voices unseen in training)."""
    return read_manifest(asset_path("synthetic", f"{split}.tsv"))


def synthetic_voices() -> dict[str, str]:
    """The voice of each shipped synthetic utterance: ``{utterance id: "engine:voice"}``.

    Example: ``{"test-00000": "flite:slt", "test-00001": "espeak-ng:linda"}``; the espeak-ng
    accent (``en-gb-x-gbcwmd+linda``) is left out: the voice variant is what the splits keep apart.
    """
    voices = {}
    lines = asset_path("synthetic", "voices.tsv").read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        file, _source, engine, voice, *_ = line.split("\t")
        voices[Path(file).stem] = voice if voice.startswith(f"{engine}:") else f"{engine}:{voice.split('+')[-1]}"
    return voices


def reference_model(name: str = "ref-wav2vec2") -> Path | None:
    """Folder of a shipped reference model, or None if it is not shipped."""
    folder = asset_path("models", name)
    return folder if (folder / "config.json").exists() else None


def language_model() -> Path:
    """The shipped word 3-gram language model (ARPA, gzip): LJ Speech training-split sentences.

    No dev or test sentence of the synthetic corpus, and none of the held-out real
    LJ Speech clips, is in its text (``python -m sq_pt2e.train lm`` rebuilds it).
    """
    return asset_path("lm", "ljspeech-3gram.arpa.gz")
