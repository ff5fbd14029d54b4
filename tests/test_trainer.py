"""Training steps, resume, and the model folder format."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
import torch

from sq_pt2e.data import Utterance
from sq_pt2e.models.vocab import VOCAB
from sq_pt2e.train.trainer import TrainConfig, encode_transcript, save_model_folder, train


def test_encode_transcript_uses_the_word_delimiter() -> None:
    assert [VOCAB[i] for i in encode_transcript("AB C'")] == ["A", "B", "|", "C", "'"]


def _clips(tmp_path, count: int = 3) -> list[Utterance]:
    rng = np.random.default_rng(0)
    utts = []
    for i in range(count):
        path = tmp_path / f"u{i}.flac"
        sf.write(path, (0.1 * rng.standard_normal(8000 + 1600 * i)).astype(np.float32), 16000)
        utts.append(Utterance(f"u{i}", path, "HELLO WORLD"))
    return utts


def test_training_runs_checkpoints_and_resumes(tmp_path) -> None:
    utts = _clips(tmp_path)
    config = TrainConfig(total_steps=2, warmup_steps=1, batch_seconds=2.0, eval_every_s=0.0, eval_utterances=1)
    record = train("ref-hubert", utts, utts[:1], tmp_path / "run", config=config, minutes=5.0)
    assert record["step"] >= 1 and (tmp_path / "run" / "best" / "model.safetensors").exists()
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["step"] == 2
    resumed = TrainConfig(total_steps=3, warmup_steps=1, batch_seconds=2.0, eval_every_s=1e9)
    train("ref-hubert", utts, utts[:1], tmp_path / "run", config=resumed, minutes=5.0)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["step"] == 3


def test_model_folder_has_the_hugging_face_layout(tmp_path) -> None:
    from transformers import AutoModelForCTC

    from sq_pt2e.models import build_model

    model = build_model("tiny-wav2vec2")
    folder = save_model_folder(model, tmp_path / "m", {"step": 5})
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "train_state.json"}
    assert json.loads((folder / "vocab.json").read_text())["<pad>"] == 0
    loaded = AutoModelForCTC.from_pretrained(folder).eval()
    wave = torch.randn(1, 8000)
    torch.testing.assert_close(loaded(wave).logits, model(wave).logits)
