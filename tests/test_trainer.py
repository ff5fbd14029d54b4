"""Training: the schedule, batching, loss going down, exact resume, the model folder format."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch

from sq_pt2e.data import Utterance
from sq_pt2e.errors import ModelError
from sq_pt2e.models.vocab import VOCAB
from sq_pt2e.train.trainer import (
    REFERENCE_MODELS,
    TrainConfig,
    _batch_for_step,
    _Clips,
    _speed_factors,
    _contiguous_norm_conv_outputs,
    build_reference_model,
    encode_transcript,
    lr_factor,
    perturb_speed,
    save_model_folder,
    train,
)


def test_encode_transcript_uses_the_word_delimiter() -> None:
    assert [VOCAB[i] for i in encode_transcript("AB C'")] == ["A", "B", "|", "C", "'"]


def test_reference_models_keep_the_real_cnn_shape_and_norm_styles() -> None:
    wav2vec2, hubert = build_reference_model("ref-wav2vec2"), build_reference_model("ref-hubert")
    for model in (wav2vec2, hubert):
        assert tuple(model.config.conv_kernel) == (10, 3, 3, 3, 3, 2, 2)
        assert tuple(model.config.conv_stride) == (5, 2, 2, 2, 2, 2, 2)
        assert 2e6 < sum(p.numel() for p in model.parameters()) < 20e6
    assert wav2vec2.config.feat_extract_norm == "group" and not wav2vec2.config.do_stable_layer_norm
    assert hubert.config.feat_extract_norm == "layer" and hubert.config.do_stable_layer_norm
    assert set(REFERENCE_MODELS) == {"ref-wav2vec2", "ref-hubert"}
    with pytest.raises(ModelError, match="unknown reference model"):
        build_reference_model("ref-nothing")


def test_schedule_warms_up_decays_and_rewarms() -> None:
    config = TrainConfig(warmup_steps=10, total_steps=110, min_lr_ratio=0.1, rewarm_steps=4)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.55) and lr_factor(110, config) == pytest.approx(0.1)
    assert lr_factor(60, config, rewarm_from=59) == pytest.approx(0.55 * 2 / 4)
    assert lr_factor(70, config, rewarm_from=59) == lr_factor(70, config)


def _clips(tmp_path, seconds: tuple[float, ...] = (0.5, 0.6, 0.7, 1.2, 1.5)) -> list[Utterance]:
    rng = np.random.default_rng(0)
    utts = []
    for i, length in enumerate(seconds):
        path = tmp_path / f"u{i}.flac"
        sf.write(path, (0.1 * rng.standard_normal(int(16000 * length))).astype(np.float32), 16000)
        utts.append(Utterance(f"u{i}", path, "HI THERE"))
    return utts


def test_batches_are_seeded_fit_the_budget_and_follow_the_curriculum(tmp_path) -> None:
    clips = _Clips(_clips(tmp_path), max_seconds=16.0)
    config = TrainConfig(batch_seconds=1.3, curriculum_start_s=0.65, curriculum_steps=100, max_utterance_seconds=2.0)
    for step in range(30):
        batch = _batch_for_step(clips, step, config)
        assert batch == _batch_for_step(clips, step, config)
        assert len(batch) == 1 or clips.lengths[max(batch)] * len(batch) <= 1.3 * 16000
    early = {i for step in range(3) for i in _batch_for_step(clips, step, config)}
    assert early <= {0, 1}  # only clips <= 0.65 s at the start
    late = {i for step in range(100, 140) for i in _batch_for_step(clips, step, config)}
    assert late == {0, 1, 2, 3, 4}


def _config(**changes) -> TrainConfig:
    fields = {"lr": 1e-3, "warmup_steps": 1, "total_steps": 50, "batch_seconds": 1.5, "curriculum_steps": 1,
              "eval_every_s": 1e9, "save_every_s": 1e9, "eval_utterances": 1, **changes}
    return TrainConfig(**fields)


def test_training_steps_decrease_the_loss(tmp_path) -> None:
    utts = _clips(tmp_path, (0.6,))
    record = train("ref-hubert", utts, utts, tmp_path / "run", config=_config(), max_steps=6, progress=False)
    assert record["step"] == 6 and record["losses"][-1] < 0.8 * record["losses"][0]
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "best" / "train_state.json").read_text())["step"] == 6


def test_speed_perturbation_shortens_and_raises_the_pitch_by_its_factor() -> None:
    t = np.arange(16000) / 16000
    tone = np.sin(2 * np.pi * 200 * t).astype(np.float32)
    faster = perturb_speed(tone, 1.25)
    assert abs(len(faster) - 16000 / 1.25) <= 2
    assert abs(np.argmax(np.abs(np.fft.rfft(faster))) * 16000 / len(faster) - 250) <= 2
    assert abs(float(faster.std()) - 1.0) < 1e-3 and perturb_speed(tone, 1.0) is tone
    config = TrainConfig(speed_perturb=0.15)
    factors = _speed_factors(64, 7, config)
    assert np.array_equal(factors, _speed_factors(64, 7, config))
    assert not np.array_equal(factors, _speed_factors(64, 8, config))
    assert factors.min() >= 0.85 and factors.max() <= 1.15 and factors.std() > 0.05
    assert np.array_equal(_speed_factors(5, 7, TrainConfig()), np.ones(5))


def test_speed_perturbed_training_decreases_the_loss(tmp_path) -> None:
    utts = _clips(tmp_path, (0.6,))
    record = train("ref-wav2vec2", utts, utts, tmp_path / "run", config=_config(speed_perturb=0.1), max_steps=6,
                   progress=False)
    assert record["losses"][-1] < 0.8 * record["losses"][0]


def test_bf16_autocast_training_decreases_the_loss_and_keeps_float32_weights(tmp_path) -> None:
    utts = _clips(tmp_path, (0.6,))
    record = train("ref-wav2vec2", utts, utts, tmp_path / "run", config=_config(bf16=True), max_steps=6,
                   progress=False)
    assert record["losses"][-1] < 0.8 * record["losses"][0]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["config"]["bf16"] and all(v.dtype == torch.float32 for v in state["model"].values())


def test_layer_norm_conv_outputs_are_laid_out_contiguously_without_changing_values() -> None:
    torch.manual_seed(0)
    model = build_reference_model("ref-hubert").eval()
    wave = torch.randn(2, 4000)
    layer = model.hubert.feature_extractor.conv_layers[1]
    with torch.no_grad():
        before = model(wave).logits
        handles = _contiguous_norm_conv_outputs(model)
        after = model(wave).logits
        assert layer(torch.randn(2, 32, 50)).is_contiguous()
    assert len(handles) == 7
    torch.testing.assert_close(after, before)
    assert _contiguous_norm_conv_outputs(build_reference_model("ref-wav2vec2")) == []  # group norm, first layer only


def test_resume_from_the_state_file_reproduces_the_uninterrupted_run(tmp_path) -> None:
    utts = _clips(tmp_path)
    straight = train("ref-wav2vec2", utts, utts[:1], tmp_path / "a", config=_config(), max_steps=4, progress=False)
    train("ref-wav2vec2", utts, utts[:1], tmp_path / "b", config=_config(), max_steps=2, progress=False)
    resumed = train("ref-wav2vec2", utts, utts[:1], tmp_path / "b", config=_config(), max_steps=2, progress=False)
    assert resumed["step"] == 4 and resumed["losses"] == straight["losses"][2:]
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    torch.testing.assert_close(b["optimizer"]["state"][0]["exp_avg"], a["optimizer"]["state"][0]["exp_avg"])


def test_resume_from_a_shipped_folder_keeps_the_step_count(tmp_path) -> None:
    utts = _clips(tmp_path, (0.6,))
    train("ref-hubert", utts, utts, tmp_path / "run", config=_config(), max_steps=3, progress=False)
    shipped = tmp_path / "shipped"
    shutil.copytree(tmp_path / "run" / "best", shipped)
    record = train("ref-hubert", utts, utts, tmp_path / "fresh", config=_config(), max_steps=2, progress=False,
                   init_from=shipped)
    assert record["step"] == 5
    state = torch.load(tmp_path / "fresh" / "state.pt", weights_only=False)
    assert state["counters"]["rewarm_from"] == 3


def test_a_resumed_run_records_its_recipe_changes_and_applies_its_regularization(tmp_path) -> None:
    utts = _clips(tmp_path, (0.6,))
    train("ref-hubert", utts, utts, tmp_path / "run", config=_config(), max_steps=2, progress=False)
    shipped = tmp_path / "shipped"
    shutil.copytree(tmp_path / "run" / "best", shipped)
    changed = _config(dropout=0.0, mask_time_prob=0.0, total_steps=80)
    other_dev = [Utterance("d", utts[0].path, "HI")]  # a new dev set: the first evaluation saves best/
    train("ref-hubert", utts, other_dev, tmp_path / "more", config=changed, max_steps=1, progress=False,
          init_from=shipped)
    config = json.loads((tmp_path / "more" / "best" / "config.json").read_text())
    assert config["hidden_dropout"] == 0.0 and config["mask_time_prob"] == 0.0
    state = torch.load(tmp_path / "more" / "state.pt", weights_only=False)
    assert state["counters"]["recipe_changes"] == [
        {"step": 2, "changes": {"total_steps": [50, 80], "dropout": [0.05, 0.0], "mask_time_prob": [0.05, 0.0]}}]
    train("ref-hubert", utts, other_dev, tmp_path / "more", config=changed, max_steps=1, progress=False)
    resumed = torch.load(tmp_path / "more" / "state.pt", weights_only=False)
    assert len(resumed["counters"]["recipe_changes"]) == 1  # the same recipe again is no change


def test_a_resume_that_toggles_time_masking_gets_a_fresh_optimizer(tmp_path) -> None:
    """The time-mask embedding exists only with masking on: the saved optimizer no longer fits."""
    utts = _clips(tmp_path, (0.6,))
    train("ref-hubert", utts, utts, tmp_path / "run", config=_config(mask_time_prob=0.0), max_steps=2, progress=False)
    with pytest.warns(UserWarning, match="fresh optimizer"):
        record = train("ref-hubert", utts, utts, tmp_path / "run", config=_config(mask_time_prob=0.05), max_steps=1,
                       progress=False)
    assert record["step"] == 3
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["counters"]["rewarm_from"] == 2


def test_recipe_changes_ignore_bookkeeping_and_default_missing_fields() -> None:
    from sq_pt2e.train.trainer import model_overrides, recipe_changes

    assert recipe_changes({"lr": 2e-3}, TrainConfig(threads=2, eval_every_s=1.0)) == {}
    assert recipe_changes({}, TrainConfig(dropout=0.1)) == {"dropout": [0.05, 0.1]}
    assert model_overrides(TrainConfig(dropout=0.1, mask_time_prob=0.0, layers=6)) == {
        "num_hidden_layers": 6, "hidden_dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1,
        "feat_proj_dropout": 0.1, "mask_time_prob": 0.0}


def test_grow_layers_repeats_each_layer_in_place_and_leaves_the_rest() -> None:
    from sq_pt2e.train.trainer import grow_layers

    weights = {"w.encoder.layers.0.fc.weight": torch.zeros(2), "w.encoder.layers.1.fc.weight": torch.ones(2),
               "w.encoder.layer_norm.weight": torch.full((2,), 7.0), "lm_head.bias": torch.full((3,), 5.0)}
    grown = grow_layers(weights, 4)
    assert sorted(grown) == sorted(["w.encoder.layers.0.fc.weight", "w.encoder.layers.1.fc.weight",
                                    "w.encoder.layers.2.fc.weight", "w.encoder.layers.3.fc.weight",
                                    "w.encoder.layer_norm.weight", "lm_head.bias"])
    assert [float(grown[f"w.encoder.layers.{k}.fc.weight"][0]) for k in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert grown["w.encoder.layers.1.fc.weight"] is not weights["w.encoder.layers.0.fc.weight"]
    assert float(grown["lm_head.bias"][0]) == 5.0
    assert grow_layers(weights, 2).keys() == weights.keys()


def test_a_run_deepened_from_a_shallower_folder_starts_from_its_layers(tmp_path) -> None:
    utts = _clips(tmp_path, (0.6,))
    train("ref-wav2vec2", utts, utts, tmp_path / "run", config=_config(layers=2), max_steps=1, progress=False)
    shipped = tmp_path / "shipped"
    shutil.copytree(tmp_path / "run" / "best", shipped)
    other_dev = [Utterance("d", utts[0].path, "HI")]  # a new dev set: the first evaluation saves best/
    record = train("ref-wav2vec2", utts, other_dev, tmp_path / "deep", config=_config(layers=3, lr=0.0),
                   max_steps=1, progress=False, init_from=shipped)
    assert record["step"] == 2
    deep = json.loads((tmp_path / "deep" / "best" / "config.json").read_text())
    assert deep["num_hidden_layers"] == 3
    state = torch.load(tmp_path / "deep" / "state.pt", weights_only=False)
    assert state["counters"]["recipe_changes"] == [{"step": 1, "changes": {"lr": [1e-3, 0.0], "layers": [2, 3]}}]
    shallow = torch.load(tmp_path / "run" / "state.pt", weights_only=False)["model"]
    for new, old in ((0, 0), (1, 0), (2, 1)):  # 2 -> 3 layers: 0, 0, 1 (weights unchanged at lr 0)
        key = "wav2vec2.encoder.layers.{}.feed_forward.output_dense.weight"
        torch.testing.assert_close(state["model"][key.format(new)], shallow[key.format(old)])


def test_model_folder_has_the_hugging_face_layout(tmp_path) -> None:
    from transformers import AutoModelForCTC

    from sq_pt2e.models import build_model

    model = build_model("tiny-wav2vec2").eval()
    folder = save_model_folder(model, tmp_path / "m", {"step": 5})
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "train_state.json"}
    assert json.loads((folder / "vocab.json").read_text())["<pad>"] == 0
    assert json.loads((folder / "train_state.json").read_text()) == {"step": 5}
    loaded = AutoModelForCTC.from_pretrained(folder).eval()
    wave = torch.randn(1, 8000)
    torch.testing.assert_close(loaded(wave).logits, model(wave).logits)


def test_model_card_lists_the_recipe_and_every_evaluation_row(tmp_path) -> None:
    from sq_pt2e.models import build_model
    from sq_pt2e.train.card import write_model_card
    from sq_pt2e.train.trainer import error_rates

    state = {"step": 7, "dev_cer": 12.0, "dev_wer": 40.0, "config": {**asdict(TrainConfig(speed_perturb=0.15))},
             "history": [{"step": 7, "wer": 40.0, "cer": 12.0}]}
    folder = save_model_folder(build_model("tiny-wav2vec2").eval(), tmp_path / "m", state)
    overall = error_rates(["A B", "C D"], ["A B", "C X"])
    assert overall == {"wer": 25.0, "cer": pytest.approx(100 / 6), "utterances": 2.0}
    results = {"synthetic test, shipped (unseen sentences and voices)": overall,
               "synthetic test, shipped: flite:slt": error_rates(["C D"], ["C X"])}
    card = write_model_card(folder, "ref-wav2vec2", results).read_text()
    assert "speed perturbation +-0.15" in card and "| synthetic test, shipped: flite:slt | 1 | 50.0 | 33.3 |" in card
    assert "still in progress" in card and "language model" not in card
    lm_results = {"synthetic test, shipped (unseen sentences and voices)": error_rates(["A B"], ["A X"])}
    card = write_model_card(folder, "ref-wav2vec2", results, lm_results).read_text()
    lm_section = card[card.index("word 3-gram language model"):]
    assert "| synthetic test, shipped (unseen sentences and voices) | 1 | 50.0 | 33.3 |" in lm_section


def test_the_train_command_passes_only_the_recipe_fields_given_and_turns_bf16_on_or_off() -> None:
    from sq_pt2e.train.cli import _parser, _recipe_arguments

    def recipe(*flags: str) -> dict[str, object]:
        return _recipe_arguments(_parser().parse_args(["train", "--model", "ref-wav2vec2", *flags]))

    assert recipe() == {}
    assert recipe("--bf16") == {"bf16": True} and recipe("--no-bf16") == {"bf16": False}
    assert recipe("--total-steps", "900", "--dropout", "0.1") == {"total_steps": 900, "dropout": 0.1}


def test_the_lm_verb_estimates_from_training_sentences_and_refuses_evaluation_sentences(tmp_path, capsys) -> None:
    import random

    from sq_pt2e.lm import NgramLM
    from sq_pt2e.train.cli import main
    from sq_pt2e.train.corpus import CorpusSpec, split_sentences

    words = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL", "INDIA", "JULIET"]
    rng = random.Random(0)
    sentences = sorted({" ".join(rng.choices(words, k=5)) for _ in range(600)})
    (tmp_path / "sentences.txt").write_text("\n".join(sentences + ["REAL CLIP ONE"]) + "\n")
    splits = split_sentences(sentences, CorpusSpec(), set())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sf.write(corpus / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    manifests = {"dev": splits["dev"][0], "test": splits["test"][0], "real-test": "REAL CLIP ONE"}
    for split, text in manifests.items():
        (corpus / f"{split}.tsv").write_text(f"a.wav\t{text}\n")
    out = tmp_path / "lm.arpa"
    args = ["lm", "--corpus", str(corpus), "--sentences", str(tmp_path / "sentences.txt"), "--out", str(out)]
    assert main(args) == 0
    lm = NgramLM.load(out)
    assert lm.order == 3 and "REAL" not in lm.words()  # the held-out real clip's sentence is left out
    (corpus / "dev.tsv").write_text(f"a.wav\t{splits['train'][0]}\n")
    assert main(args) == 1
    assert "1 evaluation sentence(s) would be in the LM" in capsys.readouterr().out
