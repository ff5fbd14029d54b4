"""Load real checkpoints: Hugging Face folders and torchaudio / fairseq-converted state dicts.

- A Hugging Face folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
  as facebook/wav2vec2-base-960h or facebook/hubert-large-ls960-ft ship it, loads with
  transformers, offline.
- A ``.pt`` / ``.pth`` state dict in the key layout of torchaudio's wav2vec2 / HuBERT
  model builders (``feature_extractor.*``, ``encoder.feature_projection.*``,
  ``encoder.transformer.*``, ``aux.*``) is mapped onto the Hugging Face modules without
  importing torchaudio. Such a file carries no config, so ``architecture`` names it.

Every failure is a ``CheckpointError`` naming the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel

from sq_pt2e.errors import CheckpointError

__all__ = ["load_checkpoint", "torchaudio_to_hf_keys"]

_PREFIXES = (
    ("feature_extractor.", "{base}.feature_extractor."),
    ("encoder.feature_projection.", "{base}.feature_projection."),
    ("encoder.transformer.", "{base}.encoder."),
    ("aux.", "lm_head."),
)
_WEIGHT_NORM = {
    "pos_conv_embed.conv.weight_g": "pos_conv_embed.conv.parametrizations.weight.original0",
    "pos_conv_embed.conv.weight_v": "pos_conv_embed.conv.parametrizations.weight.original1",
}


def torchaudio_to_hf_keys(state: dict[str, torch.Tensor], base: str) -> dict[str, torch.Tensor]:
    """Rename torchaudio wav2vec2/HuBERT keys to ``*ForCTC`` keys (``base``: "wav2vec2" or "hubert")."""
    mapped = {}
    for key, value in state.items():
        new = key
        for old_prefix, new_prefix in _PREFIXES:
            if key.startswith(old_prefix):
                new = new_prefix.format(base=base) + key[len(old_prefix) :]
                break
        for old, hf in _WEIGHT_NORM.items():
            new = new.replace(old, hf)
        mapped[new] = value
    return mapped


def _load_folder(folder: Path) -> PreTrainedModel:
    from transformers import AutoModelForCTC

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face checkpoint folder (no config.json)")
    try:
        return AutoModelForCTC.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{folder}: cannot load the checkpoint ({str(exc).splitlines()[0][:300]})") from exc


def _load_state_dict(path: Path, architecture: str | None) -> PreTrainedModel:
    from sq_pt2e.models.build import build_model
    from sq_pt2e.models.configs import ARCHITECTURES

    if architecture is None or architecture not in ARCHITECTURES:
        raise CheckpointError(f"{path}: a state dict has no config: pass architecture= one of {sorted(ARCHITECTURES)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip / pickle: torch raises several types
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    model = build_model(architecture)
    if not any(k.startswith(model.base_model_prefix + ".") for k in state):
        state = torchaudio_to_hf_keys(state, model.base_model_prefix)
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("masked_spec_embed")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match architecture {architecture!r}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, architecture {architecture!r} expects "
                f"{tuple(expected[key].shape)} (wrong architecture?)"
            )
    model.load_state_dict(state, strict=False)
    return model.eval()


def load_checkpoint(path: str | os.PathLike[str], *, architecture: str | None = None) -> PreTrainedModel:
    """Load a CTC model from a Hugging Face folder or a torchaudio-layout state dict.

    Args:
        path: the folder, or a ``.pt`` / ``.pth`` / ``.bin`` state dict file.
        architecture: for state dicts: the architecture name (``wav2vec2-base``, ...).

    Raises:
        CheckpointError: missing, corrupt, or of another architecture.
    """
    target = Path(path)
    if target.is_dir():
        return _load_folder(target)
    if target.is_file():
        return _load_state_dict(target, architecture)
    raise CheckpointError(f"{target}: no such checkpoint (expected a folder or a state dict file)")
