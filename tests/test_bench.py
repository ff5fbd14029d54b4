"""The benchmark runs on a tiny model and produces a well-formed table (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from sq_pt2e.bench import VARIANTS, run_benchmark
from sq_pt2e.models import build_model


@pytest.fixture(scope="module")
def result():
    return run_benchmark(build_model("tiny-hubert"), "tiny-hubert", seconds=(1.0,), threads=(1,), runs=2,
                         variants=("fp32-eager", "dynamic-int8", "stablequant-int8-inductor", "executorch-int8"),
                         progress=lambda _line: None)


def test_every_requested_variant_has_a_row(result) -> None:
    assert [r.variant for r in result.rows] == ["fp32-eager", "dynamic-int8", "stablequant-int8-inductor",
                                                "executorch-int8"], result.skipped


def test_ratios_are_relative_to_fp32_eager_of_the_same_run(result) -> None:
    eager = result.rows[0]
    assert eager.vs_fp32_eager == 1.0 and eager.size_vs_fp32 == 1.0
    for row in result.rows:
        assert row.latency_ms > 0 and row.vs_fp32_eager == pytest.approx(eager.latency_ms / row.latency_ms)
        assert row.real_time_factor == pytest.approx(row.latency_ms / 1000.0)


def test_int8_inductor_row_proves_int8_kernels_ran(result) -> None:
    row = next(r for r in result.rows if r.variant == "stablequant-int8-inductor")
    assert row.int8_kernels == 22  # 7 CNN convs, positional conv, projection, 12 Linears, CTC head
    assert row.size_vs_fp32 < 0.7


def test_markdown_and_json_are_well_formed(result, tmp_path) -> None:
    json_path, md_path = result.save(tmp_path)
    data = json.loads(json_path.read_text())
    assert data["cpu"] and len(data["rows"]) == len(result.rows)
    table = [line for line in md_path.read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(result.rows)
    assert len({line.count("|") for line in table}) == 1


def test_unknown_variant_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        run_benchmark(build_model("tiny-hubert"), "x", variants=("fp64-magic",))


def test_variant_registry_names_every_baseline_of_the_issue() -> None:
    assert set(VARIANTS) >= {"fp32-eager", "fp32-compiled", "bf16-compiled", "dynamic-int8",
                             "x86-default-int8-inductor", "stablequant-int8-inductor", "executorch-fp32",
                             "executorch-int8"}
