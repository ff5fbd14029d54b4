"""The example scripts run end to end (small settings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantize_and_compare_runs_and_writes_results(tmp_path) -> None:
    demo = _load("quantize_and_compare")
    code = demo.main(["--model", "tiny-wav2vec2", "--calibration", "2", "--dev", "2", "--test", "2", "--seconds", "1",
                      "--runs", "1", "--threads", "1", "--output-dir", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["accuracy"]) == {"synthetic-test", "test-other"}
    assert all(0 <= row["float32 with LM"] for row in results["accuracy"].values())
    assert "wer with LM" in results["accuracy"]["synthetic-test"]["StableQuant W8A8"]
    assert "wer with LM" in results["accuracy"]["synthetic-test"]["StableQuant W8A8 as a .pte (XNNPACK)"]
    variants = [row["variant"] for row in results["backends"]["rows"]]
    assert variants == ["float32 eager", "int8 eager (q/dq reference)", "int8 inductor",
                        "int8 inductor, int8 attention", "int8 ExecuTorch .pte (XNNPACK)"]
    assert "StableQuant + int8 attention" in results["accuracy"]["synthetic-test"]
    assert results["backends"]["rows"][-2]["notes"].startswith("2 attention blocks on int8 kernels")
    assert (tmp_path / "plan.json").exists()


def test_train_reference_model_help_lists_its_verbs(capsys) -> None:
    script = _load("train_reference_model")
    try:
        script.main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in ("corpus", "train", "export", "card", "lm"))


def test_quantize_hf_checkpoint_writes_a_program_that_loads_and_matches(tmp_path, capsys) -> None:
    import torch

    from sq_pt2e.models import build_model
    from sq_pt2e.models.checkpoint import save_hf_checkpoint
    from sq_pt2e.pipeline import load_program

    folder = save_hf_checkpoint(build_model("tiny-hubert"), tmp_path / "ckpt")
    script = _load("quantize_hf_checkpoint")
    assert script.main(["--checkpoint", str(folder), "--seconds", "1", "--calibration", "2",
                        "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "float: none" in out and "logit cosine" in out
    program = load_program(tmp_path / "model_int8.pt2")
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "quantized_decomposed.dequantize_per_channel.default" in ops
    assert program(torch.zeros(1, 16000)).shape[-1] == 32


def test_export_and_run_pte_transcribes_with_the_pte(tmp_path, capsys) -> None:
    script = _load("export_and_run_pte")
    pte = tmp_path / "m.pte"
    assert script.main(["--model", "tiny-wav2vec2", "--seconds", "1", "--files", "1", "--threads", "1",
                        "--output", str(pte)]) == 0
    out = capsys.readouterr().out
    assert pte.stat().st_size > 10_000 and "XNNPACK partition" in out and ".pte:" in out


def test_compile_benchmark_prints_ratios_and_kernel_count(capsys) -> None:
    script = _load("compile_benchmark")
    assert script.main(["--model", "tiny-wav2vec2", "--seconds", "1", "--threads", "1", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "float32 torch.compile" in out and "int8 kernels for" in out and "vs float32 eager" in out


def test_transcribe_int8_runs_threads_over_shipped_files(capsys) -> None:
    script = _load("transcribe_int8")
    assert script.main(["--model", "tiny-wav2vec2", "--threads", "2"]) == 0
    assert "WER vs reference: int8" in capsys.readouterr().out


def test_edit_plan_applies_the_hand_edits(tmp_path, capsys) -> None:
    from sq_pt2e.plan import QuantPlan

    script = _load("edit_plan")
    assert script.main(["--model", "tiny-hubert", "--seconds", "1", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| float |" in out and "kept float by hand" in out and "W4A8" in out
    plan = QuantPlan.load(tmp_path / "plan_edited.json")
    assert any(layer.skip for layer in plan.layers) and plan.op_defaults[0].weight_bits == 4


def test_distributed_search_gives_the_same_plan_on_every_backend(tmp_path) -> None:
    script = _load("distributed_search")
    assert script.main(["--model", "tiny-hubert", "--max-dev", "1", "--max-calibration", "1",
                        "--backends", "serial", "process", "--output-dir", str(tmp_path)]) == 0
