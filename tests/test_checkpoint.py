"""Checkpoints: Hugging Face folders and torchaudio-layout state dicts load back exactly."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.errors import CheckpointError
from sq_pt2e.models import build_model
from sq_pt2e.models.checkpoint import load_checkpoint, torchaudio_to_hf_keys
from sq_pt2e.train.trainer import save_model_folder

WAVE = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))


def _hf_to_torchaudio(state: dict[str, torch.Tensor], base: str) -> dict[str, torch.Tensor]:
    """The inverse mapping, written independently: what torchaudio's builders name each tensor."""
    out = {}
    for key, value in state.items():
        if key.endswith("masked_spec_embed"):
            continue
        key = key.replace(f"{base}.feature_extractor.", "feature_extractor.")
        key = key.replace(f"{base}.feature_projection.", "encoder.feature_projection.")
        key = key.replace(f"{base}.encoder.", "encoder.transformer.")
        key = key.replace("lm_head.", "aux.")
        key = key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        out[key] = value
    return out


@pytest.mark.parametrize("arch", ["tiny-wav2vec2", "tiny-hubert"])
def test_hugging_face_folder_round_trip(tmp_path, arch: str) -> None:
    model = build_model(arch, seed=3)
    folder = save_model_folder(model, tmp_path / "ckpt")
    loaded = load_checkpoint(folder)
    torch.testing.assert_close(loaded(WAVE).logits, model(WAVE).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["tiny-wav2vec2", "tiny-hubert"])
def test_torchaudio_layout_state_dict_loads_with_the_same_outputs(tmp_path, arch: str) -> None:
    model = build_model(arch, seed=4)
    state = _hf_to_torchaudio(model.state_dict(), model.base_model_prefix)
    assert any(k.startswith("encoder.transformer.layers.0.attention.q_proj") for k in state)
    torch.save(state, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt", architecture=arch)
    torch.testing.assert_close(loaded(WAVE).logits, model(WAVE).logits, rtol=0, atol=1e-6)


def test_key_mapping_names() -> None:
    mapped = torchaudio_to_hf_keys({"aux.weight": torch.zeros(1), "encoder.transformer.pos_conv_embed.conv.weight_g":
                                    torch.zeros(1)}, "hubert")
    assert set(mapped) == {"lm_head.weight", "hubert.encoder.pos_conv_embed.conv.parametrizations.weight.original0"}


def test_wrong_architecture_names_the_key_and_shapes(tmp_path) -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    torch.save(_hf_to_torchaudio(model.state_dict(), "wav2vec2"), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="m.pt: does not match architecture 'tiny-hubert'"):
        load_checkpoint(tmp_path / "m.pt", architecture="tiny-hubert")
    small = build_model("tiny-wav2vec2", seed=0, hidden_size=48)
    torch.save(_hf_to_torchaudio(small.state_dict(), "wav2vec2"), tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"has shape \(48"):
        load_checkpoint(tmp_path / "s.pt", architecture="tiny-wav2vec2")


def test_missing_corrupt_and_configless_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        load_checkpoint(tmp_path / "bad.pt", architecture="tiny-hubert")
    with pytest.raises(CheckpointError, match="pass architecture="):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
