"""The benchmark runs on a tiny model and produces a well-formed table (no timing asserts)."""

from __future__ import annotations

import json
import os
import resource
import signal
from dataclasses import replace

import pytest

from sq_pt2e.bench import SAMPLE_RATE, SPREAD_LIMIT, VARIANTS, BenchResult, BenchRow, Built, run_benchmark
from sq_pt2e.framing import cnn_geometry, frame_count
from sq_pt2e.models import build_model


def _segfault(*_args: object) -> Built:
    """A variant whose build kills its process the way a crashing native library does (no core file)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), signal.SIGSEGV)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def result():
    return run_benchmark(build_model("tiny-hubert"), "tiny-hubert", seconds=(1.0,), threads=(1,), runs=2, rounds=1,
                         isolate=False,
                         variants=("fp32-eager", "dynamic-int8", "stablequant-int8-inductor",
                                   "stablequant-int8-inductor-convs", "stablequant-int8-aoti", "executorch-int8",
                                   "executorch-int8-dynamic", "executorch-w4a8"),
                         gemm_ceiling=True, progress=lambda _line: None)


@pytest.fixture(scope="module")
def isolated():
    """Two rounds, a fresh process per cell, one variant that segfaults its process; progress lines kept."""
    lines: list[str] = []
    updates: list[tuple[int, int]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(VARIANTS, "segfault", _segfault)  # the child unpickles it from this module
        outcome = run_benchmark(build_model("tiny-wav2vec2"), "tiny-wav2vec2", seconds=(0.5,), threads=(1,), runs=2,
                                rounds=2, variants=("fp32-eager", "segfault"), progress=lines.append,
                                on_update=lambda r: updates.append((len(r.rows[0].round_medians_ms), len(r.skipped))))
    return outcome, lines, updates


def test_every_requested_variant_has_a_row(result) -> None:
    assert [r.variant for r in result.rows] == ["fp32-eager", "dynamic-int8", "stablequant-int8-inductor",
                                                "stablequant-int8-inductor-convs", "stablequant-int8-aoti",
                                                "executorch-int8",
                                                "executorch-int8-dynamic", "executorch-w4a8"], result.skipped
    assert "any length up to 30.0 s" in result.rows[-2].notes


def test_w4a8_pte_row_stores_linear_weights_packed(result) -> None:
    int8, w4 = (next(r for r in result.rows if r.variant == v) for v in ("executorch-int8", "executorch-w4a8"))
    assert "14 Linears with 4-bit packed weights" in w4.notes  # projection, 2 x 6 Linears, lm_head
    assert w4.size_bytes < int8.size_bytes


def test_ratios_are_relative_to_fp32_eager_of_the_same_run(result) -> None:
    eager = result.rows[0]
    assert eager.vs_fp32_eager == 1.0 and eager.size_vs_fp32 == 1.0
    for row in result.rows:
        assert row.latency_ms > 0 and row.vs_fp32_eager == pytest.approx(eager.latency_ms / row.latency_ms)
        assert row.real_time_factor == pytest.approx(row.latency_ms / 1000.0)
        assert row.round_medians_ms == (row.latency_ms,) and row.spread == 1.0


@pytest.mark.parametrize("variant", ["stablequant-int8-inductor", "stablequant-int8-inductor-convs",
                                     "stablequant-int8-aoti"])
def test_int8_inductor_row_proves_int8_kernels_ran(result, variant: str) -> None:
    row = next(r for r in result.rows if r.variant == variant)
    # CNN convs 1-6 (the first stays float, as in a searched plan), positional conv, projection,
    # 12 Linears, CTC head: as GEMMs or as convolutions, every one an int8 kernel
    assert row.int8_kernels == 21
    assert row.size_vs_fp32 < 0.7


def test_markdown_and_json_are_well_formed(result, tmp_path) -> None:
    json_path, md_path = result.save(tmp_path)
    data = json.loads(json_path.read_text())
    assert data["cpu"] and "one process" in data["method"] and len(data["rows"]) == len(result.rows)
    text = md_path.read_text()
    rows_part, ceiling_part = text.split("GEMM ceiling:")
    table = [line for line in rows_part.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(result.rows)
    assert len({line.count("|") for line in table}) == 1
    ceiling_table = [line for line in ceiling_part.splitlines() if line.startswith("|")]
    assert len(ceiling_table) == 2 + 2 and len({line.count("|") for line in ceiling_table}) == 1
    assert [c["backend"] for c in data["gemm_ceiling"]] == ["inductor", "xnnpack"]


def test_gemm_ceiling_times_the_models_feed_forward_shape_on_both_backends(result) -> None:
    config = build_model("tiny-hubert").config
    frames = frame_count(SAMPLE_RATE, cnn_geometry(build_model("tiny-hubert")))
    assert [(model, c.backend) for model, c in result.ceilings] == [("tiny-hubert", "inductor"),
                                                                      ("tiny-hubert", "xnnpack")]
    for _model, ceiling in result.ceilings:
        assert (ceiling.frames, ceiling.hidden, ceiling.intermediate) == (frames, config.hidden_size,
                                                                          config.intermediate_size)
        assert ceiling.fp32_ms > 0 and ceiling.int8_ms > 0 and ceiling.threads == 1
        assert ceiling.speedup == pytest.approx(ceiling.fp32_ms / ceiling.int8_ms)


def test_isolated_rounds_give_the_variant_a_row_with_one_median_per_round(isolated) -> None:
    result, _lines, _updates = isolated
    (row,) = result.rows
    assert row.variant == "fp32-eager" and row.vs_fp32_eager == 1.0, result.skipped
    assert len(row.round_medians_ms) == 2
    assert min(row.round_medians_ms) <= row.latency_ms <= max(row.round_medians_ms)
    assert row.spread == pytest.approx(max(row.round_medians_ms) / min(row.round_medians_ms))
    assert row.peak_rss_mib is not None and row.peak_rss_mib > 0
    assert "fresh process" in result.method


def test_the_variant_order_rotates_per_round(isolated) -> None:
    _result, lines, _updates = isolated
    order = [line.split("] ")[1].removesuffix(" ...") for line in lines]
    assert order == ["fp32-eager", "segfault", "segfault", "fp32-eager"]
    assert ["round 1/2" in line for line in lines] == [True, True, False, False]


def test_a_crashed_child_is_skipped_with_its_exit_code_and_the_rest_goes_on(isolated) -> None:
    result, _lines, updates = isolated
    crashes = [s for s in result.skipped if "segfault" in s]
    assert len(crashes) == 2 and all("SIGSEGV (exit code -11)" in s for s in crashes), result.skipped
    assert updates == [(1, 0), (1, 1), (1, 2), (2, 2)]  # after every cell; the row grows round by round


def test_a_spread_above_the_limit_is_flagged() -> None:
    row = BenchRow("m", "v", 1.0, 1, 1, 10.0, 0.01, 1.0, None, 1, 1.0, 0.0, None, None, "",
                   round_medians_ms=(10.0, 10.5), spread=1.05)
    result = BenchResult("test CPU", "2.13.0", [row, replace(row, variant="w", round_medians_ms=(10.0, 12.0),
                                                              spread=1.2)])
    assert [r.flagged for r in result.rows] == [False, True] and 1.05 < SPREAD_LIMIT < 1.2
    table = result.to_markdown()
    assert "| 1.05 |" in table and "| 1.20 ! |" in table and "not trustworthy" in table


def test_unknown_variant_or_an_empty_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        run_benchmark(build_model("tiny-hubert"), "x", variants=("fp64-magic",))
    with pytest.raises(ValueError, match="batch must be at least 1, got 0"):
        run_benchmark(build_model("tiny-hubert"), "x", variants=("fp32-eager",), batch=0)


def test_variant_registry_names_every_baseline_of_the_issue() -> None:
    assert set(VARIANTS) >= {"fp32-eager", "fp32-compiled", "bf16-compiled", "dynamic-int8",
                             "x86-default-int8-inductor", "stablequant-int8-inductor", "executorch-fp32",
                             "executorch-int8"}
