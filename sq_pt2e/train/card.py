"""Model cards (README.md) of the shipped reference models."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.train.corpus import ACCENTS, SPLIT_VARIANTS

__all__ = ["write_model_card"]

_STYLE = {
    "ref-wav2vec2": "Wav2Vec2ForCTC, wav2vec2-style: group-norm CNN feature encoder, post-norm Transformer",
    "ref-hubert": "HubertForCTC, HuBERT-large-style: layer-norm CNN feature encoder, pre-norm (stable layer norm) "
                  "Transformer",
}


def _trajectory(history: list[dict[str, Any]], rows: int = 12) -> str:
    if not history:
        return "(no dev evaluation yet)"
    picked = history if len(history) <= rows else [history[round(i * (len(history) - 1) / (rows - 1))]
                                                   for i in range(rows)]
    lines = ["| step | training minutes (wall) | threads | audio hours seen | train loss | dev WER % | dev CER % |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in picked:
        lines.append(f"| {r['step']} | {r.get('train_minutes', 0.0):.0f} | {r.get('threads', '?')} | "
                     f"{r.get('audio_hours', 0.0):.1f} | {r.get('loss', float('nan')):.3f} | {r['wer']:.1f} | "
                     f"{r['cer']:.1f} |")
    return "\n".join(lines)


def _recipe_change_lines(changes: list[dict[str, Any]]) -> list[str]:
    """One line per resumed run that changed the recipe, e.g. ``From step 7480: dropout 0.05 -> 0.0.``"""
    return [f"From step {c['step']}: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in c["changes"].items())
            + "." for c in changes]


def _results_rows(results: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"| {k} | {int(v['utterances'])} | {v['wer']:.1f} | {v['cer']:.1f} |" for k, v in results.items())


def write_model_card(folder: str | os.PathLike[str], name: str, results: dict[str, dict[str, float]],
                     lm_results: dict[str, dict[str, float]] | None = None) -> Path:
    """Write ``README.md`` beside the weights: architecture, data, training so far, WER/CER.

    Args:
        folder: the model folder (with ``config.json`` and ``train_state.json``).
        name: ``ref-wav2vec2`` or ``ref-hubert``.
        results: ``{evaluation set: {"wer", "cer", "utterances"}}``, greedy decoding.
        lm_results: the same with beam search and the shipped word 3-gram LM, if measured.

    Returns:
        The card's path.
    """
    from sq_pt2e.models.checkpoint import load_checkpoint

    target = Path(folder)
    state = json.loads((target / "train_state.json").read_text(encoding="utf-8"))
    model = load_checkpoint(target)
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    schedule = state.get("config", {})
    rows = _results_rows(results)
    lm_section = "" if lm_results is None else f"""
With beam search over the words of the shipped word 3-gram language model
(`sq_pt2e/assets/lm`, LJ Speech training-split sentences only; `sq-pt2e eval --lm shipped`):

| evaluation set | utterances | WER % | CER % |
|---|---:|---:|---:|
{_results_rows(lm_results)}
"""
    synthetic = next((v for k, v in results.items() if k.startswith("synthetic test")), None)
    reached = synthetic is not None and synthetic["wer"] <= 15.0 and synthetic["cer"] <= 5.0
    status = ("It meets the target (synthetic test WER <= 15 %, CER <= 5 %)." if reached else
              "Training is still in progress: the target is WER <= 15 % and CER <= 5 % on the synthetic test.")
    cnn = (f"7 conv layers, kernels {tuple(config.conv_kernel)}, strides {tuple(config.conv_stride)}, "
           f"channels {tuple(config.conv_dim)}, {config.feat_extract_norm} norm")
    norm = "pre-norm" if config.do_stable_layer_norm else "post-norm"
    transformer = (f"{config.num_hidden_layers} layers x {config.hidden_size}, {config.num_attention_heads} heads, "
                   f"FFN {config.intermediate_size}, {norm}, positional conv kernel {config.num_conv_pos_embeddings} / "
                   f"{config.num_conv_pos_embedding_groups} groups")
    voices_line = f"{len(ACCENTS)} English accents x {len(SPLIT_VARIANTS['train'])} training voice variants"
    counts = state.get("data", {}).get("training utterances", {})
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "not recorded"
    s = schedule.get
    training = "\n".join([
        f"AdamW (peak learning rate {s('lr', '?')}, {s('warmup_steps', '?')} warm-up steps, cosine decay over "
        f"{s('total_steps', '?')} steps), batches of about {s('batch_seconds', '?')} s of audio of similar length,",
        f"a length curriculum (longest utterance {s('curriculum_start_s', '?')} s growing to "
        f"{s('max_utterance_seconds', '?')} s over {s('curriculum_steps', '?')} steps), SpecAugment time masking",
        f"(p = {s('mask_time_prob', config.mask_time_prob)}), dropout {s('dropout', config.hidden_dropout)}, "
        f"speed perturbation +-{s('speed_perturb', 0.0):g}, "
        f"{s('threads', 1)} CPU thread(s){' with bfloat16 autocast' if s('bf16', False) else ''} in the latest run.",
        *_recipe_change_lines(state.get("recipe_changes", [])),
        "",
        f"This checkpoint: step {state.get('step')}, {state.get('train_seconds', 0.0) / 3600:.2f} h of training "
        f"wall time, {state.get('audio_seconds', 0.0) / 3600:.1f} h of audio seen. Best dev CER",
        f"{state.get('dev_cer', float('nan')):.1f} % (dev WER {state.get('dev_wer', float('nan')):.1f} %, "
        "first 80 dev utterances).",
    ])
    card = f"""# {name}

A small CTC speech recognizer trained from scratch on CPU as a reference model for
sq-pt2e: quantization accuracy (WER) is measured on it.
{_STYLE.get(name, "")}.

| | |
|---|---|
| CNN feature encoder | {cnn} |
| Transformer | {transformer} |
| parameters | {params:,} ({params / 1e6:.2f} M), float32 safetensors |
| vocabulary | the 32 symbols of facebook/wav2vec2-base-960h (blank = `<pad>` = 0, word delimiter `\\|`) |
| input | 16 kHz mono, zero mean / unit variance per utterance |

## Data

Synthetic English speech of LJ Speech sentences (public domain), normalised to A-Z,
apostrophe and space: espeak-ng ({voices_line}, random rate 130-200 wpm and
pitch), flite (awb, rms, kal16) and festival (kal_diphone) with
random rate and pitch (mean F0 80-230 Hz); 30 % with white noise (SNR 10-30 dB), 20 % of the flite/festival
utterances with synthetic reverberation. Plus 345 real LJ Speech clips (one speaker),
weighted 3x. Dev and test sentences and voices are unseen in training (test voices:
espeak-ng m4, f3, klatt3, david, linda, victor and flite slt); 40 real LJ Speech clips
(LJ002-0161 to LJ002-0200) are held out. Corpus: `python -m sq_pt2e.train corpus`.
Utterances per corpus folder in the latest run: {parts}.

## Training

{training}

Dev trajectory:

{_trajectory(state.get("history", []))}

## Results (greedy CTC decoding, corpus-level WER / CER in percent)

| evaluation set | utterances | WER % | CER % |
|---|---:|---:|---:|
{rows}
{lm_section}
{status}
The model is trained on synthetic speech and one real speaker; it is not meant to
transcribe real speech in general (see the LibriSpeech row).

## Reproduce or continue

    python -m sq_pt2e.train corpus --out corpus --real-clips LJ.tsv   # needs espeak-ng (flite, festival optional)
    python -m sq_pt2e.train train --model {name} --minutes 600   # resumes runs/{name}/state.pt, else these weights
    python -m sq_pt2e.train export --model {name}      # copies runs/{name}/best here, evaluates, rewrites this card

`LJ.tsv` is a manifest of the 385 real LJ Speech 1.1 clips the models were trained with
(LJ001-0001 to LJ002-0200 without LJ002-0115); their sentences stay out of dev and test, so
`--no-real-clips` gives other splits than the ones measured here.

Without `runs/{name}/state.pt`, training resumes from the weights in this folder with a
fresh optimizer at the step recorded in `train_state.json` (short re-warm-up).

License: LJ Speech text is in the public domain; the audio was synthesized with
espeak-ng, flite and festival, whose output is not restricted by their licenses.
"""
    return atomic_write_text(target / "README.md", card)
