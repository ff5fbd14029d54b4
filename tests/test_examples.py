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
                      "--runs", "1", "--threads", "1", "--no-executorch", "--output-dir", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["accuracy"]) == {"synthetic-test", "test-other"}
    variants = [row["variant"] for row in results["backends"]["rows"]]
    assert variants == ["float32 eager", "int8 eager (q/dq reference)", "int8 inductor"]
    assert (tmp_path / "plan.json").exists()


def test_train_reference_model_help_lists_its_verbs(capsys) -> None:
    script = _load("train_reference_model")
    try:
        script.main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in ("corpus", "train", "export"))
