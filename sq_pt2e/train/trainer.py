"""Train the reference CTC models on CPU, resumably.

Batches are built by length (little padding) under a budget of audio seconds,
shortest first in the first epoch (a length curriculum), then shuffled buckets.
AdamW with linear warm-up and cosine decay; SpecAugment time masking from the model
config. The full training state is saved atomically every few minutes and the best
model (dev CER) is kept as a Hugging Face folder. ``train`` resumes from the state
file, or from a shipped model folder plus its ``train_state.json`` (fresh optimizer,
same schedule position).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from sq_pt2e.asr import cer, ctc_greedy_decode, wer
from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.data import Utterance
from sq_pt2e.models.configs import make_config
from sq_pt2e.models.vocab import VOCAB, WORD_DELIMITER, vocab_dict

__all__ = ["REFERENCE_MODELS", "TrainConfig", "encode_transcript", "evaluate", "save_model_folder", "train"]

# The two reference architectures: the real CNN shape (7 convs, strides 5,2,2,2,2,2,2),
# narrow enough to train on two CPU cores.
_SHAPE = {
    "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
    "conv_dim": (128,) * 7, "num_conv_pos_embeddings": 64, "num_conv_pos_embedding_groups": 16,
    "mask_time_prob": 0.05, "mask_time_length": 5, "hidden_dropout": 0.05, "attention_dropout": 0.05,
    "activation_dropout": 0.05, "feat_proj_dropout": 0.05, "final_dropout": 0.0, "layerdrop": 0.0,
}  # fmt: skip
REFERENCE_MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "ref-wav2vec2": ("tiny-wav2vec2", _SHAPE),  # group-norm CNN, post-norm Transformer
    "ref-hubert": ("tiny-hubert", _SHAPE),  # layer-norm CNN, pre-norm Transformer
}
_CHAR_ID = {c: i for i, c in enumerate(VOCAB) if len(c) == 1}


@dataclass(frozen=True)
class TrainConfig:
    """Schedule and batching."""

    lr: float = 1.5e-3
    warmup_steps: int = 800
    total_steps: int = 40000
    min_lr_ratio: float = 0.05
    batch_seconds: float = 40.0
    max_utterance_seconds: float = 16.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    save_every_s: float = 300.0
    eval_every_s: float = 600.0
    eval_utterances: int = 80
    seed: int = 0
    threads: int = 1


def encode_transcript(text: str) -> list[int]:
    """Characters -> vocabulary ids; spaces become the word delimiter."""
    return [_CHAR_ID[WORD_DELIMITER if c == " " else c] for c in text if (c == " " or c in _CHAR_ID)]


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Clips:
    """Lazily loaded, normalised waveforms with their lengths (read once from the files)."""

    def __init__(self, utterances: Sequence[Utterance], max_seconds: float) -> None:
        import soundfile as sf

        self.items = []
        for utt in utterances:
            frames = sf.info(str(utt.path)).frames
            if frames <= max_seconds * 16000 and encode_transcript(utt.text):
                self.items.append((utt, frames))

    def load(self, index: int) -> np.ndarray:
        from sq_pt2e.audio import load_audio, normalize_waveform

        return normalize_waveform(load_audio(self.items[index][0].path).waveform)


def _batches(clips: _Clips, seconds: float, rng: random.Random, curriculum: bool) -> list[list[int]]:
    order = sorted(range(len(clips.items)), key=lambda i: clips.items[i][1])
    batches, current, longest = [], [], 0
    for index in order:
        length = clips.items[index][1]
        if current and max(longest, length) * (len(current) + 1) > seconds * 16000:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if not curriculum:
        rng.shuffle(batches)
    return batches


def _collate(waves: list[np.ndarray], texts: list[str]) -> dict[str, torch.Tensor]:
    longest = max(len(w) for w in waves)
    values = torch.zeros(len(waves), longest)
    mask = torch.zeros(len(waves), longest, dtype=torch.long)
    for row, wave in enumerate(waves):
        values[row, : len(wave)] = torch.from_numpy(wave)
        mask[row, : len(wave)] = 1
    encoded = [encode_transcript(t) for t in texts]
    labels = torch.full((len(texts), max(len(e) for e in encoded)), -100, dtype=torch.long)
    for row, ids in enumerate(encoded):
        labels[row, : len(ids)] = torch.tensor(ids)
    return {"input_values": values, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def evaluate(model: PreTrainedModel, utterances: Sequence[Utterance]) -> dict[str, float]:
    """Greedy-decoded WER / CER (percent) of ``model`` on ``utterances``, one at a time."""
    from sq_pt2e.audio import load_audio, normalize_waveform

    model.eval()
    hyps = []
    for utt in utterances:
        wave = torch.from_numpy(normalize_waveform(load_audio(utt.path).waveform)).unsqueeze(0)
        hyps.append(ctc_greedy_decode(model(wave).logits[0])[0])
    refs = [u.text for u in utterances]
    return {"wer": wer(refs, hyps), "cer": cer(refs, hyps), "utterances": float(len(utterances))}


def save_model_folder(model: PreTrainedModel, folder: str | os.PathLike[str], extra: dict | None = None) -> Path:
    """Hugging Face folder (config.json, model.safetensors, vocab.json[, train_state.json]), swapped in atomically."""
    target = Path(folder)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab_dict(), indent=2) + "\n")
    if extra is not None:
        (tmp / "train_state.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _new_model(name: str) -> PreTrainedModel:
    from transformers import AutoModelForCTC

    base, shape = REFERENCE_MODELS[name]
    return AutoModelForCTC.from_config(make_config(base, **shape))


def train(name: str, train_set: Sequence[Utterance], dev_set: Sequence[Utterance], run_dir: str | os.PathLike[str],
          *, config: TrainConfig = TrainConfig(), minutes: float = 60.0, init_from: str | None = None) -> dict:
    """Train (or resume) reference model ``name`` for ``minutes`` of wall time.

    Returns the last evaluation record.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCTC

    torch.set_num_threads(config.threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pt"
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    model = _new_model(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, epoch, best_cer, history = 0, 0, float("inf"), []
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, best_cer, history = state["step"], state["epoch"], state["best_cer"], state["history"]
        rng.setstate(state["rng"])
    elif init_from is not None:
        model = AutoModelForCTC.from_pretrained(init_from)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        recorded = json.loads((Path(init_from) / "train_state.json").read_text())
        step, epoch, best_cer = recorded["step"], recorded["epoch"], recorded.get("dev_cer", float("inf"))
        history = recorded.get("history", [])
    clips = _Clips(train_set, config.max_utterance_seconds)
    dev = list(dev_set)[: config.eval_utterances]
    deadline = time.monotonic() + minutes * 60.0
    last_save = last_eval = time.monotonic()
    seconds_trained, started = 0.0, time.perf_counter()

    def checkpoint() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                    "best_cer": best_cer, "history": history, "rng": rng.getstate(),
                    "config": asdict(config)}, tmp)
        os.replace(tmp, state_path)

    bar = tqdm(desc=f"train {name}", unit="step", initial=step)
    record: dict = {}
    while time.monotonic() < deadline and step < config.total_steps:
        for batch in _batches(clips, config.batch_seconds, rng, curriculum=epoch == 0):
            if time.monotonic() >= deadline or step >= config.total_steps:
                break
            model.train()
            waves = [clips.load(i) for i in batch]
            inputs = _collate(waves, [clips.items[i][0].text for i in batch])
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(step, config)
            loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            seconds_trained += sum(len(w) for w in waves) / 16000.0
            rate = seconds_trained / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch, audio_s_per_s=f"{rate:.1f}")
            now = time.monotonic()
            if now - last_eval >= config.eval_every_s:
                record = {"step": step, "epoch": epoch, "loss": float(loss.item()), **evaluate(model, dev),
                          "wall_minutes": (time.perf_counter() - started) / 60.0}
                history.append(record)
                bar.write(json.dumps(record))
                if record["cer"] < best_cer:
                    best_cer = record["cer"]
                    save_model_folder(model, run / "best", {"step": step, "epoch": epoch, "dev_cer": record["cer"],
                                                            "dev_wer": record["wer"], "history": history})
                last_eval = now
            if now - last_save >= config.save_every_s:
                checkpoint()
                last_save = now
        else:
            epoch += 1
    checkpoint()
    bar.close()
    atomic_write_text(run / "history.json", json.dumps(history, indent=2) + "\n")
    return record
