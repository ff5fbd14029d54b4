"""Train the reference CTC models on CPU, resumably.

The recipe, chosen for fast convergence on one or two CPU cores:

* Length-homogeneous batches under a budget of audio seconds (little padding), drawn
  at random with replacement; the batch of step ``s`` depends only on ``(seed, s)``, so
  a resumed run sees exactly the batches an uninterrupted one would.
* A length curriculum: the longest utterance allowed grows linearly from
  ``curriculum_start_s`` to ``max_utterance_seconds`` over ``curriculum_steps`` (short
  utterances first gets CTC past the all-blank phase quickly).
* AdamW, linear warm-up to a high peak learning rate, then cosine decay; after a resume
  with a fresh optimizer (from shipped weights) a short re-warm-up.
* SpecAugment time masking and dropout (``TrainConfig.mask_time_prob`` / ``dropout``), ``ctc_zero_infinity``.
* Dropout and SpecAugment noise are seeded per step, so resuming from the state file
  reproduces the uninterrupted run bit for bit (same thread count).

The full training state (model, optimizer, step, history) is saved atomically every
few minutes under the run folder; the best model by dev CER is kept there as a Hugging
Face folder (``best/``) with ``train_state.json``, from which training can also resume
(fresh optimizer, recorded step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from sq_pt2e.asr import cer, greedy_transcript, wer
from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.data import Utterance
from sq_pt2e.errors import ModelError
from sq_pt2e.models.configs import make_config
from sq_pt2e.models.vocab import VOCAB, WORD_DELIMITER

__all__ = [
    "RECIPES",
    "REFERENCE_MODELS",
    "TrainConfig",
    "recipe_changes",
    "model_overrides",
    "default_config",
    "build_reference_model",
    "encode_transcript",
    "evaluate",
    "grow_layers",
    "lr_factor",
    "save_model_folder",
    "train",
]

SAMPLE_RATE = 16000
# The real CNN shape (7 convs, kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2) with a
# channel pyramid: the early, high-frame-rate layers are narrow, which is where a CPU
# spends its time (24.8 vs 16.1 audio s per s at 128 channels throughout, one thread).
_SHAPE: dict[str, Any] = {
    "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
    "conv_dim": (32, 64, 96, 128, 192, 256, 256), "num_conv_pos_embeddings": 64,
    "num_conv_pos_embedding_groups": 16, "mask_time_length": 5, "mask_time_min_masks": 1,
    "final_dropout": 0.0, "layerdrop": 0.0, "ctc_zero_infinity": True, "ctc_loss_reduction": "mean",
}  # fmt: skip
REFERENCE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "ref-wav2vec2": ("tiny-wav2vec2", _SHAPE),  # group-norm CNN, post-norm Transformer
    "ref-hubert": ("tiny-hubert", _SHAPE),  # layer-norm CNN, pre-norm ("stable layer norm") Transformer
}
# Schedule changes per model: the post-norm Transformer stayed on all-blank output for
# 800 steps (3.9 h of audio) at a 2e-3 peak after 300 warm-up steps, where the pre-norm
# one left it after about 450; it gets a lower peak and a longer warm-up.
RECIPES: dict[str, dict[str, Any]] = {
    "ref-wav2vec2": {"lr": 1e-3, "warmup_steps": 600},
    "ref-hubert": {},
}
_CHAR_ID = {c: i for i, c in enumerate(VOCAB) if len(c) == 1}


@dataclass(frozen=True)
class TrainConfig:
    """Schedule, batching and bookkeeping of a training run.

    Attributes:
        lr: peak learning rate.
        warmup_steps: linear warm-up from 0 to ``lr``.
        total_steps: length of the cosine schedule (training stops there).
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``.
        rewarm_steps: linear re-warm-up after resuming with a fresh optimizer.
        batch_seconds: audio per batch, counted with padding (longest x count).
        max_utterance_seconds: longer utterances are skipped.
        curriculum_start_s: longest utterance allowed at step 0.
        curriculum_steps: steps over which the limit grows to ``max_utterance_seconds``.
        weight_decay: AdamW weight decay.
        grad_clip: gradient norm clip.
        save_every_s: seconds between full-state checkpoints.
        eval_every_s: seconds between dev evaluations (and best-model updates).
        eval_utterances: dev utterances evaluated (the first ones).
        seed: seeds batches, dropout and masking.
        threads: ``torch.set_num_threads`` for the run.
        dropout: hidden, attention, activation and feature-projection dropout of the model.
        mask_time_prob: SpecAugment time-masking probability of the model.
        bf16: run the training forward pass under bfloat16 autocast (weights, optimizer and
            loss stay float32); about twice as fast on CPUs with AMX-BF16 or AVX512-BF16.
        speed_perturb: each training clip is resampled by a factor drawn uniformly from
            ``[1 - speed_perturb, 1 + speed_perturb]`` (seeded per step): tempo, pitch and
            formants move together, as with sox ``speed``, which makes new voices of the
            same speakers (0: off).
        layers: Transformer layers. Weights of a shallower model (the shipped folder or the
            run's state) are deepened to this many by :func:`grow_layers`.
    """

    lr: float = 2e-3
    warmup_steps: int = 300
    total_steps: int = 24000
    min_lr_ratio: float = 0.02
    rewarm_steps: int = 100
    batch_seconds: float = 20.0
    max_utterance_seconds: float = 16.0
    curriculum_start_s: float = 3.0
    curriculum_steps: int = 2500
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    save_every_s: float = 240.0
    eval_every_s: float = 480.0
    eval_utterances: int = 80
    seed: int = 0
    threads: int = 1
    dropout: float = 0.05
    mask_time_prob: float = 0.05
    bf16: bool = False
    speed_perturb: float = 0.0
    layers: int = 4


# Fields that change how a run trains (not where or how fast it runs): a resumed run
# records its changes to these in ``train_state.json`` and the model card.
_BOOKKEEPING_FIELDS = ("threads", "save_every_s", "eval_every_s")


def model_overrides(config: TrainConfig) -> dict[str, int | float]:
    """The model-config fields that carry ``config``'s depth, dropout and time masking."""
    return {"num_hidden_layers": config.layers, "hidden_dropout": config.dropout,
            "attention_dropout": config.dropout, "activation_dropout": config.dropout,
            "feat_proj_dropout": config.dropout, "mask_time_prob": config.mask_time_prob}


_LAYER_KEY = re.compile(r"^(.*\.encoder\.layers\.)(\d+)(\..+)$")


def grow_layers(weights: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """``weights`` of a shallower model deepened to ``layers`` Transformer layers, each layer repeated in place.

    New layer ``k`` starts as a copy of old layer ``k * old // layers`` (4 -> 8: 0, 0, 1, 1,
    2, 2, 3, 3), so each stage of the shallow network keeps its position; training then
    adapts the copies. Weights that are not shallower come back unchanged (loading reports
    any other mismatch).
    """
    matches = {key: m for key in weights if (m := _LAYER_KEY.match(key))}
    old = 1 + max((int(m.group(2)) for m in matches.values()), default=-1)
    if old == 0 or old >= layers:
        return dict(weights)
    grown = {key: value for key, value in weights.items() if key not in matches}
    for key, m in matches.items():
        for k in range(layers):
            if k * old // layers == int(m.group(2)):
                grown[f"{m.group(1)}{k}{m.group(3)}"] = weights[key].clone()
    return grown


def recipe_changes(previous: dict[str, Any], config: TrainConfig) -> dict[str, list[Any]]:
    """``{field: [old, new]}`` for the recipe fields of ``config`` that differ from ``previous``.

    Fields missing from ``previous`` (recorded by an older version) count as their defaults.
    """
    defaults = asdict(TrainConfig())
    current = asdict(config)
    return {k: [previous.get(k, defaults[k]), v] for k, v in current.items()
            if k not in _BOOKKEEPING_FIELDS and previous.get(k, defaults[k]) != v}


def default_config(name: str, **changes: Any) -> TrainConfig:
    """The training configuration of reference model ``name`` (``RECIPES``), with ``changes``.

    Raises:
        ModelError: unknown name.
    """
    if name not in RECIPES:
        raise ModelError(f"unknown reference model {name!r} (known: {', '.join(sorted(RECIPES))})")
    return TrainConfig(**{**RECIPES[name], **changes})


def encode_transcript(text: str) -> list[int]:
    """Characters -> vocabulary ids; spaces become the word delimiter, other characters are dropped.

    Args:
        text: a normalised transcript (A-Z, apostrophe, space).

    Returns:
        The label ids.
    """
    return [_CHAR_ID[WORD_DELIMITER if c == " " else c] for c in text if (c == " " or c in _CHAR_ID)]


def lr_factor(step: int, config: TrainConfig, rewarm_from: int | None = None) -> float:
    """Learning-rate multiplier at ``step``: warm-up, cosine decay, optional re-warm-up.

    Args:
        step: the optimizer step about to be taken (0-based).
        config: the schedule.
        rewarm_from: step at which a fresh optimizer started, if any.

    Returns:
        The factor applied to ``config.lr``.
    """
    if step < config.warmup_steps:
        factor = (step + 1) / config.warmup_steps
    else:
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
        factor = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if rewarm_from is not None and 0 <= step - rewarm_from < config.rewarm_steps:
        factor *= (step - rewarm_from + 1) / config.rewarm_steps
    return factor


def build_reference_model(name: str, **overrides: Any) -> PreTrainedModel:
    """A freshly initialised reference model (``ref-wav2vec2`` or ``ref-hubert``).

    Args:
        name: a key of ``REFERENCE_MODELS``.
        **overrides: config fields to change (tests use a smaller shape).

    Raises:
        ModelError: unknown name.
    """
    from transformers import AutoModelForCTC

    if name not in REFERENCE_MODELS:
        raise ModelError(f"unknown reference model {name!r} (known: {', '.join(sorted(REFERENCE_MODELS))})")
    base, shape = REFERENCE_MODELS[name]
    return AutoModelForCTC.from_config(make_config(base, **{**shape, **overrides}))


class _Clips:
    """Utterances with their lengths in samples, sorted by length; audio read on demand."""

    def __init__(self, utterances: Sequence[Utterance], max_seconds: float) -> None:
        import soundfile as sf

        items = []
        for utt in utterances:
            frames = sf.info(str(utt.path)).frames
            if 400 <= frames <= max_seconds * SAMPLE_RATE and encode_transcript(utt.text):
                items.append((utt, frames))
        if not items:
            raise ModelError("no usable training utterance (all too long, too short or without text)")
        items.sort(key=lambda item: (item[1], item[0].id))
        self.items = items
        self.lengths = np.array([frames for _, frames in items])

    def load(self, index: int) -> np.ndarray:
        from sq_pt2e.audio import load_audio, normalize_waveform

        return normalize_waveform(load_audio(self.items[index][0].path).waveform)


def perturb_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """``wave`` played ``factor`` times faster (shorter, higher), normalised again.

    Args:
        wave: a 16 kHz waveform.
        factor: speed factor (1: unchanged).
    """
    import soxr

    from sq_pt2e.audio import normalize_waveform

    if factor == 1.0:
        return wave
    return normalize_waveform(soxr.resample(wave, SAMPLE_RATE * factor, SAMPLE_RATE, quality="HQ"))


def _speed_factors(count: int, step: int, config: TrainConfig) -> np.ndarray:
    """The speed factors of the ``count`` clips of ``step`` (all 1 when perturbation is off)."""
    if config.speed_perturb <= 0.0:
        return np.ones(count)
    rng = np.random.default_rng([config.seed, step, 1])
    return rng.uniform(1.0 - config.speed_perturb, 1.0 + config.speed_perturb, count)


def _batch_for_step(clips: _Clips, step: int, config: TrainConfig) -> list[int]:
    """Indices of the batch of ``step``: a random run of similar lengths under the curriculum limit."""
    rng = np.random.default_rng([config.seed, step])
    ramp = min(1.0, step / max(1, config.curriculum_steps))
    limit = config.curriculum_start_s + ramp * (config.max_utterance_seconds - config.curriculum_start_s)
    eligible = max(1, int(np.searchsorted(clips.lengths, limit * SAMPLE_RATE, side="right")))
    budget = config.batch_seconds * SAMPLE_RATE
    anchor = int(rng.integers(eligible))
    batch, low, high = [anchor], anchor, anchor
    # grow the run downwards (shorter neighbours) and upwards while the padded size fits
    while True:
        grown = False
        if low > 0 and clips.lengths[high] * (len(batch) + 1) <= budget:
            low -= 1
            batch.append(low)
            grown = True
        if high + 1 < eligible and clips.lengths[high + 1] * (len(batch) + 1) <= budget:
            high += 1
            batch.append(high)
            grown = True
        if not grown:
            return sorted(batch)


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
def utterance_logits(model: PreTrainedModel, utterances: Sequence[Utterance], *,
                     progress: bool = False) -> list[torch.Tensor]:
    """``(frames, vocab)`` logits of ``model`` (put in eval mode) on each utterance, one at a time.

    Args:
        model: a ``*ForCTC`` model (restore train mode yourself).
        utterances: audio files.
        progress: show a progress bar.
    """
    from tqdm import tqdm

    from sq_pt2e.audio import load_audio, normalize_waveform

    model.eval()
    logits = []
    for utt in tqdm(utterances, desc="evaluate", disable=not progress, leave=False):
        wave = torch.from_numpy(normalize_waveform(load_audio(utt.path).waveform)).unsqueeze(0)
        logits.append(model(wave).logits[0])
    return logits


def transcribe_utterances(model: PreTrainedModel, utterances: Sequence[Utterance], *,
                          progress: bool = False) -> list[str]:
    """Greedy CTC transcripts of ``utterances`` by ``model`` (put in eval mode), one at a time.

    Args:
        model: a ``*ForCTC`` model (restore train mode yourself).
        utterances: audio files.
        progress: show a progress bar.
    """
    return [greedy_transcript(out) for out in utterance_logits(model, utterances, progress=progress)]


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """``{"wer", "cer", "utterances"}`` (corpus-level, percent) of ``hypotheses`` against ``references``."""
    return {"wer": wer(list(references), list(hypotheses)), "cer": cer(list(references), list(hypotheses)),
            "utterances": float(len(references))}


def evaluate(model: PreTrainedModel, utterances: Sequence[Utterance], *, progress: bool = False) -> dict[str, float]:
    """Greedy-decoded WER and CER (percent) of ``model`` on ``utterances``, one at a time.

    Args:
        model: a ``*ForCTC`` model (put in eval mode; restore train mode yourself).
        utterances: audio files with reference transcripts.
        progress: show a progress bar.

    Returns:
        ``{"wer", "cer", "utterances"}``.
    """
    return error_rates([u.text for u in utterances], transcribe_utterances(model, utterances, progress=progress))


def save_model_folder(model: PreTrainedModel, folder: str | os.PathLike[str], extra: dict | None = None) -> Path:
    """Hugging Face folder (config.json, model.safetensors, vocab.json, ...) plus ``train_state.json``.

    The folder is swapped in atomically by :func:`sq_pt2e.models.checkpoint.save_hf_checkpoint`;
    ``train_state.json`` (the step count and history a resume needs) is then written atomically.

    Args:
        model: the model to save.
        folder: the checkpoint folder.
        extra: the training record written as ``train_state.json``.

    Returns:
        The folder.
    """
    from sq_pt2e.models.checkpoint import save_hf_checkpoint

    target = save_hf_checkpoint(model, folder)
    if extra is not None:
        atomic_write_text(target / "train_state.json", json.dumps(extra, indent=2, sort_keys=True) + "\n")
    return target


class _StopOnSignal:
    """SIGTERM / SIGINT end training after the current step (and its checkpoint), in the main thread."""

    def __init__(self) -> None:
        import signal
        import threading

        self.requested = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._request)

    def _request(self, number: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)


@dataclass
class _State:
    step: int = 0
    best_cer: float = float("inf")
    rewarm_from: int | None = None
    audio_seconds: float = 0.0
    train_seconds: float = 0.0
    dev_key: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    recipe_changes: list[dict[str, Any]] = field(default_factory=list)


def _load_weights(model: PreTrainedModel, weights: dict[str, torch.Tensor]) -> None:
    """Load ``weights`` into ``model``; the time-mask embedding may be on one side only.

    Transformers creates ``masked_spec_embed`` only when time masking is on, so a run that
    turns masking off drops it and one that turns it on keeps its fresh initialisation.
    Weights of a shallower model are deepened first (:func:`grow_layers`).
    """
    weights = grow_layers(weights, model.config.num_hidden_layers)
    own = model.state_dict()
    kept = {k: v for k, v in weights.items() if k in own or not k.endswith("masked_spec_embed")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(not k.endswith("masked_spec_embed") for k in missing):
        raise ModelError(f"checkpoint does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")


def _resume(run: Path, name: str, config: TrainConfig, init_from: str | os.PathLike[str] | None,
            ) -> tuple[PreTrainedModel, torch.optim.Optimizer, _State]:
    """Model, optimizer and counters: from ``run/state.pt``, else ``init_from``, else fresh (seeded)."""
    torch.manual_seed(config.seed)
    model = build_reference_model(name, **model_overrides(config))
    state = _State()
    state_path = run / "state.pt"
    saved = None
    previous: dict[str, Any] | None = None
    if state_path.exists():
        saved = torch.load(state_path, weights_only=False, map_location="cpu")
        _load_weights(model, saved["model"])
        state = _State(**saved["counters"])
        previous = saved.get("config", {})
    elif init_from is not None:
        from sq_pt2e.models.checkpoint import load_checkpoint

        folder = Path(init_from)
        loaded = load_checkpoint(folder)
        _load_weights(model, loaded.state_dict())
        recorded = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
        state = _State(step=int(recorded["step"]), best_cer=float(recorded.get("dev_cer", float("inf"))),
                       rewarm_from=int(recorded["step"]), audio_seconds=float(recorded.get("audio_seconds", 0.0)),
                       train_seconds=float(recorded.get("train_seconds", 0.0)),
                       dev_key=str(recorded.get("dev_key", "")), data=dict(recorded.get("data", {})),
                       history=list(recorded.get("history", [])),
                       recipe_changes=list(recorded.get("recipe_changes", [])))
        previous = recorded.get("config", {})
    if previous is not None and (changes := recipe_changes(previous, config)):
        state.recipe_changes.append({"step": state.step, "changes": changes})
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if saved is not None:
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except ValueError as exc:  # other parameters: time masking toggled (masked_spec_embed) or more layers
            state.rewarm_from = state.step
            warnings.warn(f"{state_path}: the saved optimizer state does not fit this model ({exc}); training goes "
                          f"on from the saved weights with a fresh optimizer (re-warm-up from step {state.step})",
                          stacklevel=2)
    return model, optimizer, state


def _contiguous_norm_conv_outputs(model: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Make the layer-norm CNN layers hand their activation a contiguous ``(B, C, T)`` tensor.

    ``*LayerNormConvLayer`` normalises ``conv(x).transpose(-2, -1)`` and transposes back, so
    GELU and its backward run on a strided view: a third of a HuBERT-style training step on
    one CPU thread. Laying the norm's output out as ``(B, C, T)`` changes values by rounding only
    (vectorised instead of strided GELU).
    """

    def relayout(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output.transpose(-2, -1).contiguous().transpose(-2, -1)

    return [layer.layer_norm.register_forward_hook(relayout) for layer in model.modules()
            if isinstance(getattr(layer, "layer_norm", None), torch.nn.LayerNorm) and hasattr(layer, "conv")]


def train(name: str, train_set: Sequence[Utterance], dev_set: Sequence[Utterance], run_dir: str | os.PathLike[str],
          *, config: TrainConfig = TrainConfig(), minutes: float = 60.0,
          init_from: str | os.PathLike[str] | None = None, progress: bool = True, max_steps: int | None = None,
          data: dict[str, Any] | None = None, on_best: Callable[[Path, dict[str, Any]], None] | None = None,
          ) -> dict[str, Any]:
    """Train (or resume) reference model ``name`` for ``minutes`` of wall time or up to ``config.total_steps``.

    Resumes from ``run_dir/state.pt`` when it exists (exactly: same optimizer state and
    batches), else from the Hugging Face folder ``init_from`` and its ``train_state.json``
    (fresh optimizer at the recorded step, short re-warm-up), else starts fresh.

    Args:
        name: ``ref-wav2vec2`` or ``ref-hubert``.
        train_set: training utterances (repeat an utterance in the list to weight it).
        dev_set: dev utterances; the first ``config.eval_utterances`` are evaluated.
        run_dir: folder of ``state.pt``, ``best/`` and ``history.json``.
        config: schedule and batching.
        minutes: wall-clock budget of this call.
        init_from: shipped model folder to start from when there is no state file.
        progress: show a tqdm progress bar.
        max_steps: stop after this many steps in this call (the schedule is unchanged).
        data: a description of the training data, recorded in ``train_state.json``.
        on_best: called with (``best/`` folder, record) after each new best model.

    Returns:
        The final record: step, losses, last dev WER/CER, throughput.
    """
    from tqdm import tqdm

    torch.set_num_threads(config.threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pt"
    model, optimizer, state = _resume(run, name, config, init_from)
    _contiguous_norm_conv_outputs(model)
    clips = _Clips(train_set, config.max_utterance_seconds)
    dev = list(dev_set)[: config.eval_utterances]
    dev_key = hashlib.sha256("\n".join(f"{u.id}\t{u.text}" for u in dev).encode()).hexdigest()[:16]
    if dev_key != state.dev_key:  # another dev set: earlier scores are not comparable
        state.best_cer, state.dev_key = float("inf"), dev_key
    if data is not None:
        state.data = dict(data)
    stop_at = config.total_steps if max_steps is None else min(config.total_steps, state.step + max_steps)
    deadline = time.monotonic() + minutes * 60.0
    last_save = last_eval = time.monotonic()
    losses: list[float] = []

    def checkpoint() -> None:
        tmp = state_path.with_name(f".{state_path.name}.tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "counters": asdict(state),
                    "config": asdict(config), "name": name}, tmp)
        os.replace(tmp, state_path)

    def evaluate_dev() -> dict[str, Any]:
        record = {"step": state.step, "loss": float(np.mean(losses[-50:])) if losses else float("nan"),
                  "lr": config.lr * lr_factor(max(0, state.step - 1), config, state.rewarm_from),
                  **evaluate(model, dev), "audio_hours": state.audio_seconds / 3600.0,
                  "train_minutes": state.train_seconds / 60.0, "threads": config.threads}
        state.history.append(record)
        if record["cer"] < state.best_cer:
            state.best_cer = record["cer"]
            folder = save_model_folder(model, run / "best", {
                "model": name, "step": state.step, "dev_cer": record["cer"], "dev_wer": record["wer"],
                "audio_seconds": state.audio_seconds, "train_seconds": state.train_seconds, "dev_key": state.dev_key,
                "data": state.data, "config": asdict(config), "history": state.history,
                "recipe_changes": state.recipe_changes})
            if on_best is not None:
                on_best(folder, record)
        return record

    bar = tqdm(desc=f"train {name}", unit="step", initial=state.step, total=config.total_steps, disable=not progress,
               mininterval=5.0)
    record: dict[str, Any] = {}
    stop = _StopOnSignal()
    while time.monotonic() < deadline and state.step < stop_at and not stop.requested:
        started = time.perf_counter()
        torch.manual_seed(config.seed * 1_000_003 + state.step)
        np.random.seed((config.seed * 1_000_003 + state.step) % 2**32)  # transformers' SpecAugment uses numpy
        batch = _batch_for_step(clips, state.step, config)
        factors = _speed_factors(len(batch), state.step, config)
        waves = [perturb_speed(clips.load(i), float(f)) for i, f in zip(batch, factors)]
        inputs = _collate(waves, [clips.items[i][0].text for i in batch])
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(state.step, config, state.rewarm_from)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        state.step += 1
        losses.append(float(loss.item()))
        state.audio_seconds += sum(len(w) for w in waves) / SAMPLE_RATE
        state.train_seconds += time.perf_counter() - started
        bar.update(1)
        speed = state.audio_seconds / max(1e-9, state.train_seconds)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", audio_s_per_s=f"{speed:.1f}", refresh=False)
        now = time.monotonic()
        if dev and now - last_eval >= config.eval_every_s:
            record = evaluate_dev()
            bar.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
            last_eval = time.monotonic()
        if now - last_save >= config.save_every_s:
            checkpoint()
            last_save = now
    if dev and not stop.requested and (not state.history or state.history[-1]["step"] != state.step):
        record = evaluate_dev()
        bar.write(json.dumps(record))
    checkpoint()
    stop.restore()
    bar.close()
    atomic_write_text(run / "history.json", json.dumps(state.history, indent=2) + "\n")
    return {**record, "step": state.step, "losses": losses,
            "audio_s_per_s": state.audio_seconds / max(1e-9, state.train_seconds)}

