"""The sq-pt2e command: help, exit codes, one subprocess run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from sq_pt2e.backends.inductor import load_aot_package
from sq_pt2e.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from sq_pt2e.recipes import default_plan


def test_help_exits_zero(capsys) -> None:
    assert main(["--help"]) == EXIT_OK
    assert "bench" in capsys.readouterr().out


def test_unknown_verb_is_a_usage_error() -> None:
    assert main(["frobnicate"]) == EXIT_USAGE


def test_bad_model_name_fails_with_a_named_error(capsys) -> None:
    assert main(["bench", "--models", "nope", "--threads", "1"]) == EXIT_FAILED
    assert "unknown model 'nope': not an architecture (" in capsys.readouterr().err


def test_bench_verb_writes_json_and_markdown(tmp_path) -> None:
    code = main(["bench", "--models", "tiny-wav2vec2", "--seconds", "1", "--threads", "1", "--runs", "2",
                 "--rounds", "1", "--variants", "fp32-eager", "dynamic-int8", "--output-dir", str(tmp_path)])
    assert code == EXIT_OK
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.md").exists()


def test_bench_plan_must_belong_to_the_one_benchmarked_model(tmp_path, capsys) -> None:
    from sq_pt2e.plan import QuantPlan

    path = QuantPlan(model="tiny-hubert").save(tmp_path / "plan.json")
    assert main(["bench", "--models", "tiny-hubert", "tiny-wav2vec2", "--plan", str(path)]) == EXIT_FAILED
    assert "belongs to one model" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny-wav2vec2", "--plan", str(path), "--threads", "1"]) == EXIT_FAILED
    assert "tiny-hubert" in capsys.readouterr().err


def test_console_script_runs_in_a_subprocess() -> None:
    done = subprocess.run([sys.executable, "-m", "sq_pt2e.cli", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and "sq-pt2e" in done.stdout
    # torchao's and torch's import-time warnings about CUDA extensions and Enum pytrees stay silent
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr


def test_quantize_verb_writes_a_plan_that_loads(tmp_path, capsys) -> None:
    from sq_pt2e.plan import QuantPlan
    from sq_pt2e.report import reconstruction_trials

    code = main(["quantize", "--model", "tiny-hubert", "--max-calibration", "4", "--int8-attention",
                 "--output-dir", str(tmp_path)])
    assert code == EXIT_OK
    (refit, *_) = reconstruction_trials(json.loads((tmp_path / "search_report.json").read_text()))
    assert f"weight reconstruction of {len(refit.layers)} layer(s) in {refit.seconds:.1f} s" in capsys.readouterr().out
    plan = QuantPlan.load(tmp_path / "plan.json")
    assert plan.layers and all(layer.act_range is not None for layer in plan.layers if not layer.skip)
    assert not plan.needs_calibration()
    assert plan.attention == "int8" and len(plan.attention_scales) == 2  # fixed, as the layer ranges are
    assert [layer.name for layer in plan.layers if layer.skip] == ["hubert.feature_extractor.conv_layers.0.conv"]
    assert (tmp_path / "search_report.json").exists() and (tmp_path / "sensitivity.png").stat().st_size > 1000


def test_quantize_verb_passes_its_search_options_to_the_search(tmp_path, monkeypatch) -> None:
    import torch

    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    code = main(["quantize", "--model", "tiny-hubert", "--max-calibration", "4", "--passes", "1", "--smooth-alpha",
                 "0", "--kl-share", "0.1", "--threads", "1", "--target", "xnnpack", "--output-dir", str(tmp_path)])
    assert code == EXIT_OK
    config = json.loads((tmp_path / "search_report.json").read_text())["config"]
    assert config["passes"] == 1 and config["smooth_alpha"] == 0.0 and config["kl_share"] == 0.1
    assert config["target"] == "xnnpack"
    assert json.loads((tmp_path / "plan.json").read_text())["scored_for"] == "xnnpack"
    assert threads == [1]


def test_a_thread_count_below_one_is_refused(capsys) -> None:
    assert main(["eval", "--model", "tiny-wav2vec2", "--threads", "0"]) == EXIT_FAILED
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_quantize_verb_reports_a_missing_audio_source(tmp_path, capsys) -> None:
    code = main(["quantize", "--model", "tiny-hubert", "--calibration", str(tmp_path / "nope"),
                 "--output-dir", str(tmp_path)])
    assert code == EXIT_FAILED
    assert "does not exist" in capsys.readouterr().err


def test_transcribe_and_export_verbs(tmp_path, capsys) -> None:
    import json as json_module

    from sq_pt2e.assets import librispeech_manifest

    assert main(["quantize", "--model", "tiny-hubert", "--max-calibration", "3", "--output-dir", str(tmp_path)]) == 0
    audio = str(librispeech_manifest("test-clean")[1].path)
    capsys.readouterr()
    assert main(["transcribe", "--model", "tiny-hubert", audio, "--plan", str(tmp_path / "plan.json"), "--json"]) == 0
    (row,) = json_module.loads(capsys.readouterr().out)
    assert row["file"] == audio and isinstance(row["text"], str)
    assert main(["eval", "--model", "tiny-hubert", "--eval", "synthetic-test", "--max-eval", "1", "--plan",
                 str(tmp_path / "plan.json"), "--output-dir", str(tmp_path / "eval")]) == 0
    (entry,) = json_module.loads((tmp_path / "eval" / "eval.json").read_text())["synthetic-test"]["transcripts"]
    assert isinstance(entry["int8"], str)
    assert main(["eval", "--model", "tiny-hubert", "--eval", "synthetic-test", "--max-eval", "1", "--plan",
                 str(tmp_path / "plan.json"), "--target", "xnnpack", "--output-dir", str(tmp_path / "eval-pte")]) == 0
    assert (tmp_path / "eval-pte" / "eval.json").exists()
    pte = tmp_path / "m.pte"
    assert main(["export", "--model", "tiny-hubert", "--plan", str(tmp_path / "plan.json"), "--seconds", "1",
                 "--max-calibration", "2", "--threads", "1", "--output", str(pte)]) == 0
    assert pte.stat().st_size > 10_000 and "exactly 16000 samples" in capsys.readouterr().out
    assert main(["export", "--model", "tiny-hubert", "--plan", str(tmp_path / "plan.json"), "--seconds", "1",
                 "--dynamic", "--max-calibration", "2", "--threads", "1", "--output", str(pte)]) == 0
    assert "720 to 15760 samples" in capsys.readouterr().out
    default_plan("tiny-hubert", weight_bits=4).save(tmp_path / "w4.json")
    assert main(["export", "--model", "tiny-hubert", "--plan", str(tmp_path / "w4.json"), "--seconds", "1",
                 "--max-calibration", "2", "--threads", "1", "--output", str(pte)]) == 0
    assert "14 Linears with 4-bit packed weights" in capsys.readouterr().out
    package = tmp_path / "m.pt2"
    assert main(["export", "--model", "tiny-hubert", "--plan", str(tmp_path / "plan.json"), "--seconds", "0.5",
                 "--format", "aoti", "--max-calibration", "2", "--threads", "1", "--output", str(package)]) == 0
    out = capsys.readouterr().out
    assert "exactly 8000 samples" in out and "oneDNN int8 kernel calls" in out
    with torch.no_grad():
        logits = load_aot_package(package)(torch.zeros(1, 8000))
    assert logits.shape == (1, 24, 32) and bool(torch.isfinite(logits).all())
    assert main(["export", "--model", "tiny-hubert", "--format", "aoti", "--dynamic", "--output", str(package)]) != 0
    assert "one input length" in capsys.readouterr().err


def test_a_plan_from_another_model_is_refused_before_work(tmp_path, capsys) -> None:
    assert main(["quantize", "--model", "tiny-hubert", "--max-calibration", "3", "--output-dir", str(tmp_path)]) == 0
    from sq_pt2e.assets import librispeech_manifest

    audio = str(librispeech_manifest("test-clean")[0].path)
    plan = str(tmp_path / "plan.json")
    code = main(["transcribe", "--model", "tiny-wav2vec2", audio, "--plan", plan])
    assert code == EXIT_FAILED
    assert "was made for model 'tiny-hubert', not 'tiny-wav2vec2'" in capsys.readouterr().err
    # A plan whose recorded model is cleared is still checked layer by layer.
    _clear_model(plan)
    code = main(["transcribe", "--model", "tiny-wav2vec2", audio, "--plan", plan])
    assert code == EXIT_FAILED
    assert "did you mean 'wav2vec2.feature_extractor" in capsys.readouterr().err


def _clear_model(path: str) -> None:
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["model"] = ""
    Path(path).write_text(json.dumps(data), encoding="utf-8")


def test_eval_verb_reports_float_wer_per_shipped_set(tmp_path, capsys) -> None:
    import json as json_module

    code = main(["eval", "--model", "tiny-wav2vec2", "--eval", "synthetic-test", "test-clean", "--max-eval", "2",
                 "--output-dir", str(tmp_path)])
    assert code == EXIT_OK
    results = json_module.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"synthetic-test", "test-clean"}
    assert all(r["utterances"] == 2 and r["float_wer"] >= 0 for r in results.values())
    first = results["synthetic-test"]["transcripts"][0]  # per utterance, to compare runs with
    assert set(first) == {"id", "reference", "float32"} and first["reference"]
    assert main(["eval", "--model", "tiny-wav2vec2", "--eval", "nonsense"]) == EXIT_FAILED


def test_eval_and_transcribe_decode_with_a_word_language_model(tmp_path, capsys) -> None:
    import json as json_module

    from sq_pt2e.assets import synthetic_manifest
    from sq_pt2e.lm import NgramLM

    utterance = synthetic_manifest("test")[0]
    lm = NgramLM.from_sentences(["HELLO WORLD", utterance.text]).save(tmp_path / "lm.arpa")
    code = main(["eval", "--model", "tiny-wav2vec2", "--eval", "synthetic-test", "--max-eval", "1",
                 "--lm", str(lm), "--output-dir", str(tmp_path)])
    assert code == EXIT_OK
    assert f"decoding: beam search with the word LM {lm}" in capsys.readouterr().out
    assert json_module.loads((tmp_path / "eval.json").read_text())["synthetic-test"]["decoding"] == f"lm:{lm}"
    assert main(["transcribe", "--model", "tiny-wav2vec2", str(utterance.path), "--lm", str(lm), "--json"]) == EXIT_OK
    (row,) = json_module.loads(capsys.readouterr().out)
    assert set(row["text"].split()) <= {"HELLO", "WORLD", *utterance.text.split()}  # lexicon words only
    (tmp_path / "bad.arpa").write_text("not an ARPA file")
    assert main(["eval", "--model", "tiny-wav2vec2", "--eval", "synthetic-test", "--lm",
                 str(tmp_path / "bad.arpa")]) == EXIT_FAILED
    assert "not an ARPA file" in capsys.readouterr().err


def test_transcribe_with_the_inductor_backend_uses_compiled_int8_buckets(tmp_path, capsys) -> None:
    import json as json_module

    from sq_pt2e.assets import librispeech_manifest

    audio = str(min(librispeech_manifest("test-clean"), key=lambda u: u.path.stat().st_size).path)
    code = main(["transcribe", "--model", "tiny-wav2vec2", audio, "--backend", "inductor", "--buckets", "5", "10",
                 "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert code == EXIT_OK
    (row,) = json_module.loads(capsys.readouterr().out)
    assert row["file"] == audio and "error" not in row
    assert any((tmp_path / "cache").iterdir())
    assert main(["transcribe", "--model", "tiny-wav2vec2", audio, "--backend", "inductor",
                 "--checkpoint", str(tmp_path / "c.jsonl")]) == EXIT_FAILED


def test_quantize_skips_a_bad_calibration_file_only_when_asked(tmp_path, capsys) -> None:
    import shutil

    from sq_pt2e.assets import calibration_files

    folder = tmp_path / "calib"
    folder.mkdir()
    for path in calibration_files()[:4]:
        shutil.copy(path, folder / path.name)
    (folder / "0000-broken.flac").write_bytes(b"not audio at all")
    args = ["quantize", "--model", "tiny-hubert", "--calibration", str(folder), "--program-seconds", "0",
            "--output-dir", str(tmp_path / "out")]
    assert main(args) == EXIT_FAILED
    assert "0000-broken.flac" in capsys.readouterr().err
    assert main([*args, "--on-error", "skip"]) == EXIT_OK
    assert (tmp_path / "out" / "plan.json").exists()


def test_accuracy_verb_passes_its_sensitivity_thresholds_to_the_search(monkeypatch) -> None:
    import sq_pt2e.accuracy
    from sq_pt2e.assets import asset_path

    seen = {}

    def capture(*args, search, decoders, **kwargs):
        seen["search"], seen["decoders"] = search, decoders
        raise ValueError("captured")

    monkeypatch.setattr(sq_pt2e.accuracy, "build_accuracy_table", capture)
    dev = str(asset_path("synthetic", "dev.tsv"))
    args = ["accuracy", "--model", "tiny-hubert", "--dev", dev, "--eval", f"dev={dev}", "--max-dev", "2",
            "--max-eval", "2", "--max-calibration", "2", "--gamma", "0.5", "--kl-share", "0.1"]
    assert main(args) == EXIT_FAILED
    assert seen["search"].gamma == 0.5 and seen["search"].kl_share == 0.1 and seen["decoders"] == {}
    assert main([*args, "--lm", "shipped", "--lm-weight", "0.5"]) == EXIT_FAILED
    (label, decoder), = seen["decoders"].items()
    assert label == "LM shipped" and "lm_weight=0.5 " in decoder.identity


def test_accuracy_update_writes_the_merged_table_back_to_its_folder(monkeypatch, tmp_path) -> None:
    import dataclasses

    import sq_pt2e.accuracy
    from sq_pt2e.accuracy import AccuracyTable
    from sq_pt2e.assets import asset_path

    shipped = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accuracy-ref-hubert" / "accuracy.json"
    earlier = AccuracyTable.from_json(shipped.read_text())
    target = tmp_path / "accuracy.json"
    target.write_text(earlier.to_json())
    first = earlier.cells[0]
    rerun = dataclasses.replace(earlier, cells=[dataclasses.replace(first, wer=first.wer + 1.0)], comparisons=[],
                                search={})
    monkeypatch.setattr(sq_pt2e.accuracy, "build_accuracy_table", lambda *args, **kwargs: rerun)
    dev = str(asset_path("synthetic", "dev.tsv"))
    code = main(["accuracy", "--model", "tiny-hubert", "--dev", dev, "--eval", f"dev={dev}", "--max-dev", "2",
                 "--max-eval", "2", "--max-calibration", "2", "--update", str(target)])
    assert code == EXIT_OK
    merged = AccuracyTable.from_json(target.read_text())
    assert merged.cells[0].wer == first.wer + 1.0 and merged.cells[1:] == [
        dataclasses.replace(c, best=merged.cells[i + 1].best) for i, c in enumerate(earlier.cells[1:])]
    assert (tmp_path / "accuracy.md").read_text().startswith("Model: ref-hubert")
