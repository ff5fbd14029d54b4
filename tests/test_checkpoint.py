"""Checkpoints: Hugging Face folders and torchaudio-layout state dicts load back exactly;
every broken or mismatched file is a CheckpointError naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sq_pt2e.errors import CheckpointError
from sq_pt2e.models import build_model
from sq_pt2e.models.checkpoint import load_checkpoint, save_hf_checkpoint, torchaudio_to_hf_keys
from sq_pt2e.models.configs import ARCHITECTURES
from sq_pt2e.models.vocab import VOCAB

WAVE = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))
ARCHS = ["tiny-wav2vec2", "tiny-hubert"]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(WAVE).logits


def _hf_to_torchaudio(state: dict[str, torch.Tensor], base: str, *,
                      legacy_weight_norm: bool = True) -> dict[str, torch.Tensor]:
    """The inverse mapping, written independently: what torchaudio's builders name each tensor."""
    out = {}
    for key, value in state.items():
        if key.endswith("masked_spec_embed"):
            continue  # torchaudio's Wav2Vec2Model has no mask embedding
        key = key.replace(f"{base}.feature_extractor.", "feature_extractor.")
        key = key.replace(f"{base}.feature_projection.", "encoder.feature_projection.")
        key = key.replace(f"{base}.encoder.", "encoder.transformer.")
        key = key.replace("lm_head.", "aux.")
        if legacy_weight_norm:  # torch.nn.utils.weight_norm, as the published .pth files were written
            key = key.replace("parametrizations.weight.original0", "weight_g")
            key = key.replace("parametrizations.weight.original1", "weight_v")
        out[key] = value.clone()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_hugging_face_folder_round_trip(tmp_path: Path, arch: str) -> None:
    model = build_model(arch, seed=3)
    folder = save_hf_checkpoint(model, tmp_path / "ckpt")
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "model.safetensors", "vocab.json", "tokenizer_config.json", "preprocessor_config.json"}
    assert json.loads((folder / "vocab.json").read_text()) == {t: i for i, t in enumerate(VOCAB)}
    loaded = load_checkpoint(folder)
    assert type(loaded) is type(model) and not loaded.training
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left


def test_saved_folder_loads_with_the_transformers_processor(tmp_path: Path) -> None:
    from transformers import Wav2Vec2Processor

    folder = save_hf_checkpoint(build_model("tiny-wav2vec2"), tmp_path / "ckpt")
    processor = Wav2Vec2Processor.from_pretrained(folder, local_files_only=True)
    ids = [VOCAB.index(c) for c in ["H", "I", "|", "Y", "O", "U"]]
    assert processor.tokenizer.decode(ids) == "HI YOU"
    assert processor.feature_extractor.sampling_rate == 16000 and processor.feature_extractor.do_normalize


def test_legacy_pytorch_model_bin_with_weight_g_and_weight_v(tmp_path: Path) -> None:
    """The layout facebook/wav2vec2-base-960h's pytorch_model.bin has (pre-parametrization weight norm)."""
    model = build_model("tiny-wav2vec2", seed=5)
    folder = save_hf_checkpoint(model, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    legacy = {k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in legacy
    (folder / "model.safetensors").unlink()
    torch.save(legacy, folder / "pytorch_model.bin")
    torch.testing.assert_close(_logits(load_checkpoint(folder)), _logits(model), rtol=0, atol=1e-5)


def test_model_with_folded_weight_norm_saves_and_loads(tmp_path: Path) -> None:
    """What sq_pt2e.passes.fold_weight_norm does to the model before export."""
    from torch.nn.utils import parametrize

    model = build_model("tiny-wav2vec2", seed=9)
    expected = _logits(model)
    parametrize.remove_parametrizations(model.wav2vec2.encoder.pos_conv_embed.conv, "weight")
    torch.testing.assert_close(_logits(load_checkpoint(save_hf_checkpoint(model, tmp_path / "ckpt"))), expected,
                               rtol=0, atol=1e-5)
    state = _hf_to_torchaudio(model.state_dict(), "wav2vec2")
    assert "encoder.transformer.pos_conv_embed.conv.weight" in state
    torch.save(state, tmp_path / "folded.pt")
    torch.testing.assert_close(_logits(load_checkpoint(tmp_path / "folded.pt")), expected, rtol=0, atol=1e-5)


def test_saving_replaces_an_existing_checkpoint(tmp_path: Path) -> None:
    save_hf_checkpoint(build_model("tiny-hubert", seed=1), tmp_path / "ckpt")
    second = build_model("tiny-hubert", seed=2)
    save_hf_checkpoint(second, tmp_path / "ckpt")
    torch.testing.assert_close(_logits(load_checkpoint(tmp_path / "ckpt")), _logits(second), rtol=0, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_saving_refuses_to_replace_an_unrelated_folder_or_a_wrapper(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty and not a checkpoint folder"):
        save_hf_checkpoint(build_model("tiny-hubert"), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="expected a Hugging Face \\*ForCTC model, got Linear"):
        save_hf_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("legacy", [True, False], ids=["weight_g", "parametrizations"])
def test_torchaudio_layout_state_dict_loads_with_the_same_outputs(tmp_path: Path, arch: str, legacy: bool) -> None:
    model = build_model(arch, seed=4)
    state = _hf_to_torchaudio(model.state_dict(), model.base_model_prefix, legacy_weight_norm=legacy)
    assert "encoder.transformer.layers.0.attention.q_proj.weight" in state and "aux.weight" in state
    torch.save(state, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt", architecture=arch)
    assert type(loaded) is type(model) and not loaded.training
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_is_inferred_from_the_shapes(tmp_path: Path, arch: str) -> None:
    model = build_model(arch, seed=6)
    save_file(_hf_to_torchaudio(model.state_dict(), model.base_model_prefix), tmp_path / "model.safetensors")
    loaded = load_checkpoint(tmp_path / "model.safetensors")
    assert loaded.config.model_type == model.config.model_type
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)


def test_hugging_face_key_layout_state_dict_with_a_wrapper_dict(tmp_path: Path) -> None:
    model = build_model("tiny-hubert", seed=7)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    torch.testing.assert_close(_logits(load_checkpoint(tmp_path / "m.pth")), _logits(model), rtol=0, atol=1e-5)


def test_ambiguous_shapes_ask_for_the_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Like wav2vec2-large-lv60 vs hubert-large in torchaudio layout: same shapes.
    monkeypatch.setitem(ARCHITECTURES, "tiny-wav2vec2-twin", ARCHITECTURES["tiny-wav2vec2"])
    model = build_model("tiny-wav2vec2")
    torch.save(_hf_to_torchaudio(model.state_dict(), "wav2vec2"), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"fit \['tiny-wav2vec2', 'tiny-wav2vec2-twin'\]: pass architecture="):
        load_checkpoint(tmp_path / "m.pt")
    assert load_checkpoint(tmp_path / "m.pt", architecture="tiny-wav2vec2-twin") is not None


def test_torchaudio_asr_bundle_head_with_29_labels_is_widened(tmp_path: Path) -> None:
    """torchaudio's ASR bundles keep fairseq outputs 0 and 4..31 (labels '-', '|', 'E', ...)."""
    model = build_model("tiny-hubert", seed=8)
    kept = [0, *range(4, len(VOCAB))]
    state = _hf_to_torchaudio(model.state_dict(), "hubert")
    state["aux.weight"], state["aux.bias"] = state["aux.weight"][kept], state["aux.bias"][kept]
    torch.save(state, tmp_path / "bundle.pth")
    got, want = _logits(load_checkpoint(tmp_path / "bundle.pth", architecture="tiny-hubert")), _logits(model)
    torch.testing.assert_close(got[..., kept], want[..., kept], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[..., 1:4], (got[..., :1] - 10.0).expand(-1, -1, 3), rtol=0, atol=1e-5)


def test_key_mapping_names() -> None:
    mapped = torchaudio_to_hf_keys({
        "aux.weight": torch.zeros(1),
        "encoder.transformer.pos_conv_embed.conv.weight_g": torch.zeros(1),
        "encoder.feature_projection.projection.bias": torch.zeros(1),
        "feature_extractor.conv_layers.0.layer_norm.weight": torch.zeros(1),
        "encoder.transformer.layers.1.attention.out_proj.weight": torch.zeros(1),
    }, "hubert")
    assert set(mapped) == {
        "lm_head.weight",
        "hubert.encoder.pos_conv_embed.conv.parametrizations.weight.original0",
        "hubert.feature_projection.projection.bias",
        "hubert.feature_extractor.conv_layers.0.layer_norm.weight",
        "hubert.encoder.layers.1.attention.out_proj.weight",
    }


def test_wrong_architecture_names_the_keys_and_shapes(tmp_path: Path) -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    torch.save(_hf_to_torchaudio(model.state_dict(), "wav2vec2"), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m.pt: does not match architecture 'tiny-hubert': \d+ missing key"):
        load_checkpoint(tmp_path / "m.pt", architecture="tiny-hubert")
    wide = build_model("tiny-wav2vec2", seed=0, hidden_size=48)
    torch.save(_hf_to_torchaudio(wide.state_dict(), "wav2vec2"), tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"wav2vec2.feature_projection.projection.weight has shape \(48, 32\) "
                                              r"but the model expects \(32, 32\)"):
        load_checkpoint(tmp_path / "s.pt", architecture="tiny-wav2vec2")
    with pytest.raises(CheckpointError, match="matches none of the known architectures; closest is 'tiny-wav2vec2'"):
        load_checkpoint(tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="unknown architecture 'tiny-bert'"):
        load_checkpoint(tmp_path / "m.pt", architecture="tiny-bert")


def test_missing_head_and_extra_keys_are_listed(tmp_path: Path) -> None:
    state = _hf_to_torchaudio(build_model("tiny-hubert").state_dict(), "hubert")
    del state["aux.weight"], state["aux.bias"]
    state["quantizer.codevectors"] = torch.zeros(1)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\) \['lm_head.bias', 'lm_head.weight'\] \(no CTC head.*"
                                              r"1 unexpected key\(s\) \['quantizer.codevectors'\]"):
        load_checkpoint(tmp_path / "m.pt", architecture="tiny-hubert")


def test_hugging_face_folder_problems_name_file_key_and_shapes(tmp_path: Path) -> None:
    folder = save_hf_checkpoint(build_model("tiny-wav2vec2"), tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "lm_head.weight": torch.zeros(32, 7)}, weights)
    with pytest.raises(CheckpointError, match=r"model.safetensors: lm_head.weight has shape \(32, 7\) but config.json "
                                              r"describes \(32, 32\)"):
        load_checkpoint(folder)
    save_file({k: v for k, v in state.items() if k != "lm_head.bias"} | {"extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \['lm_head.bias'\]; 1 unexpected key\(s\) "
                                              r"\['extra.weight'\]"):
        load_checkpoint(folder)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"does not match architecture 'tiny-hubert': it is a Wav2Vec2ForCTC"):
        load_checkpoint(folder, architecture="tiny-hubert")
    assert load_checkpoint(folder, architecture="tiny-wav2vec2") is not None


def test_other_vocabularies_and_model_types_are_refused(tmp_path: Path) -> None:
    folder = save_hf_checkpoint(build_model("tiny-wav2vec2"), tmp_path / "ckpt")
    swapped = {t: i for i, t in enumerate(VOCAB)} | {"E": 6, "T": 5}
    (folder / "vocab.json").write_text(json.dumps(swapped))
    with pytest.raises(CheckpointError, match=r"vocab.json: the vocabulary differs .* at id 5: 'T' instead of 'E'"):
        load_checkpoint(folder)
    (folder / "vocab.json").unlink()  # optional: the head size is still checked
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "data2vec-audio"}))
    with pytest.raises(CheckpointError, match="model_type 'data2vec-audio' is not supported"):
        load_checkpoint(folder)


def test_missing_corrupt_and_configless_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt: corrupt, or holds objects other than tensors"):
        load_checkpoint(tmp_path / "bad.pt", architecture="tiny-hubert")
    torch.save(build_model("tiny-hubert").state_dict(), tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable PyTorch or safetensors state dict"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable"):
        load_checkpoint(tmp_path / "bad.safetensors")
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match=r"opt.pt: 2 entries are not tensors"):
        load_checkpoint(tmp_path / "opt.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")


def test_corrupt_hugging_face_folder_files(tmp_path: Path) -> None:
    folder = save_hf_checkpoint(build_model("tiny-hubert"), tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot load the weights"):
        load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(folder)
    torch.save({}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read the config"):
        load_checkpoint(folder)


def test_shipped_reference_models_load_by_name() -> None:
    from sq_pt2e.assets import reference_model
    from sq_pt2e.models import load_model

    for name, cls in (("ref-wav2vec2", "Wav2Vec2ForCTC"), ("ref-hubert", "HubertForCTC")):
        model = load_model(name)
        assert type(model).__name__ == cls and not model.training
        loaded = load_model(str(reference_model(name)))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
