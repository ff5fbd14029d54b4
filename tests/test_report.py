"""The report: per-layer numbers from histograms, Markdown sections, figures; the statistics file."""

from __future__ import annotations

import dataclasses

import json
import math

import numpy as np
import pytest

from sq_pt2e.accuracy import AccuracyCell, AccuracyTable, PairedComparison
from sq_pt2e.bench import BenchResult, BenchRow
from sq_pt2e.errors import QuantizationError
from sq_pt2e.observers import AbsHistogram
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.report import _search_section, activation_sqnr_db, clipped_share, layer_rows, write_report
from sq_pt2e.stablequant import Score, SearchReport
from sq_pt2e.stats_file import load_statistics, save_statistics

CONV = "wav2vec2.feature_extractor.conv_layers.2.conv"
FC = "wav2vec2.encoder.layers.0.feed_forward.output_dense"


def _spike(bins: int = 100, at: int = 9, upper: float = 10.0) -> AbsHistogram:
    counts = np.zeros(bins)
    counts[at] = 1000.0
    return AbsHistogram(counts, upper, (at + 1) * upper / bins)


def _heavy_tail() -> AbsHistogram:
    counts = np.exp(-np.arange(200) / 8.0) * 1e6
    return AbsHistogram(counts, 20.0, 20.0)


def test_sqnr_of_a_point_mass_is_the_rounding_noise_closed_form() -> None:
    hist = _spike()  # every value at the centre 0.95 of bin 9
    clip, qmax = 2.0, 127
    expected = 10 * math.log10(0.95**2 / ((clip / qmax) ** 2 / 12))
    assert activation_sqnr_db(hist, clip, qmax) == pytest.approx(expected)


def test_sqnr_on_an_affine_grid_uses_its_finer_step() -> None:
    hist = _spike()
    clip, qmax, floor = 2.0, 127, -0.17
    expected = 10 * math.log10(0.95**2 / (((clip - floor) / (2 * qmax)) ** 2 / 12))
    assert activation_sqnr_db(hist, clip, qmax, floor) == pytest.approx(expected)
    assert expected - activation_sqnr_db(hist, clip, qmax) == pytest.approx(20 * math.log10(2 * clip / (clip - floor)))


def test_sqnr_counts_clipping_error_above_the_range() -> None:
    hist = _spike()
    clip, qmax = 0.5, 127  # every value (0.95) is clipped to 0.5
    assert activation_sqnr_db(hist, clip, qmax) == pytest.approx(10 * math.log10(0.95**2 / 0.45**2))
    with pytest.raises(ValueError, match="clip=0"):
        activation_sqnr_db(hist, 0.0, qmax)


def test_sqnr_of_an_outlier_split_rounds_the_clipped_values_on_the_outlier_grid() -> None:
    hist = _spike()  # every value at 0.95
    clip, qmax = 0.5, 127
    expected = 10 * math.log10(0.95**2 / ((2.0 / qmax) ** 2 / 12))  # 0.95 lies on the [-2, 2] outlier grid
    assert activation_sqnr_db(hist, clip, qmax, outlier_range=2.0) == pytest.approx(expected)
    short = 10 * math.log10(0.95**2 / 0.35**2)  # the outlier grid ends at 0.6: 0.95 is clipped to it
    assert activation_sqnr_db(hist, clip, qmax, outlier_range=0.1) == pytest.approx(short)


def test_clipped_share_of_a_uniform_histogram() -> None:
    hist = AbsHistogram(np.ones(100), 1.0, 1.0)
    assert clipped_share(hist, 0.5) == pytest.approx(50.0)
    assert clipped_share(hist, 1.0) == 0.0


def _plan() -> QuantPlan:
    return QuantPlan(model="tiny", layers=(
        LayerPlan(CONV, op="conv1d", calibration="percentile", clip_percentile=99.9, act_range=5.0, reason="sensitive"),
        LayerPlan(FC, op="linear", calibration="mse", act_range=0.9, reason="not sensitive"),
        LayerPlan("lm_head", op="linear", skip=True, reason="kept float for the test"),
    ))


def _search(tmp_path) -> object:
    report = SearchReport(Score(10.0, 0.0), all_max_score=Score(14.0, 0.02), final_score=Score(10.2, 0.001),
                          sensitivity={CONV: {"kl": 0.01, "wer": 13.0, "delta_wer": 3.0},
                                       "wav2vec2.encoder.layers.0": {"kl": 1e-4, "wer": 10.0, "delta_wer": 0.0}},
                          sensitive_groups=[CONV], chosen_percentiles={CONV: 99.9}, evaluations=12, seconds=3.5,
                          config={"criterion": "wer", "gamma": 0.25, "granularity": "block", "reading": "mse-rest",
                                  "weight_bits": 8, "act_bits": 8})
    path = tmp_path / "search_report.json"
    path.write_text(json.dumps(report.to_dict()))
    return path


def test_layer_rows_join_plan_histograms_and_sensitivity(tmp_path) -> None:
    statistics = {CONV: _heavy_tail(), FC: _spike()}
    rows = layer_rows(_plan(), statistics, json.loads(_search(tmp_path).read_text()))
    conv, fc, head = rows
    assert conv.sensitive and conv.sensitivity == 3.0 and conv.clip_ratio == pytest.approx(0.25)
    assert conv.clipped_percent > 0 and conv.sqnr_db > 0
    assert not fc.sensitive and fc.sensitivity == 0.0 and fc.clip_ratio == pytest.approx(0.9)
    assert head.skip and head.bits == "float" and head.sqnr_db is None


def test_write_report_has_every_section_and_readable_figures(tmp_path) -> None:
    table = AccuracyTable("tiny", {"synthetic": 10.0}, {"synthetic": 5}, [
        AccuracyCell(method, bits, "synthetic", wer, wer - 10, wer - 11, wer - 9, 1.0, 0.99)
        for method, bits, wer in [("max", "W8A8", 11.0), ("stablequant", "W8A8", 10.1), ("max", "W4A8", 30.0),
                                  ("stablequant", "W4A8", 12.0)]],
        comparisons=[PairedComparison("stablequant", "max", "W8A8", "synthetic", -0.9, -1.6, -0.2)])
    (tmp_path / "accuracy.json").write_text(table.to_json())
    bench = BenchResult("test CPU", "2.13.0", [
        BenchRow("tiny", "fp32-eager", s, 1, 1, 10.0 * s, 0.01, 1.0, None, 1000, 1.0, 0.1, None, None, "")
        for s in (1.0, 2.0)])
    (tmp_path / "bench.json").write_text(bench.to_json())
    written = write_report(tmp_path / "out", _plan(), statistics={CONV: _heavy_tail(), FC: _spike()},
                           search_path=_search(tmp_path), accuracy_path=tmp_path / "accuracy.json",
                           bench_path=tmp_path / "bench.json")
    names = [p.name for p in written]
    assert names == ["report.md", "sensitivity.png", "histograms.png", "wer_vs_bits.png", "latency_vs_length.png"]
    assert all(p.stat().st_size > 5000 for p in written[1:])
    text = written[0].read_text()
    for needle in ("## Search", "12 model evaluations", f"`{CONV}` (clip p99.9)", "## Layers", "## Accuracy",
                   "-0.90 [-1.60, -0.20] vs max", "## Speed", "Float layer `lm_head`: kept float for the test",
                   "| 0 | `" + CONV):
        assert needle in text, needle


def test_report_without_statistics_or_search_still_lists_every_layer(tmp_path) -> None:
    (report,) = write_report(tmp_path, _plan())
    text = report.read_text()
    assert all(name in text for name in (CONV, FC, "lm_head")) and "No calibration statistics" in text
    assert "Attention is quantized" not in text
    (report,) = write_report(tmp_path, dataclasses.replace(_plan(), attention="int8"))
    assert "Attention is quantized too" in report.read_text() and "scored this plan" not in report.read_text()
    (report,) = write_report(tmp_path, dataclasses.replace(_plan(), scored_for="xnnpack"))
    assert "scored this plan in the ExecuTorch .pte's" in report.read_text()


def test_report_names_a_missing_input(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        write_report(tmp_path, _plan(), accuracy_path=tmp_path / "nope.json")


def test_statistics_file_round_trips_exactly(tmp_path) -> None:
    statistics = {CONV: _heavy_tail(), FC: _spike()}
    loaded = load_statistics(save_statistics(tmp_path / "s.npz", statistics))
    assert list(loaded) == [CONV, FC]
    for name, hist in statistics.items():
        assert np.array_equal(loaded[name].counts, hist.counts)
        assert (loaded[name].upper, loaded[name].max_abs) == (hist.upper, hist.max_abs)


def test_statistics_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_statistics(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(QuantizationError, match="not an sq-pt2e statistics file"):
        load_statistics(other)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(QuantizationError, match="junk.npz"):
        load_statistics(junk)


def test_search_section_lists_the_upgraded_groups() -> None:
    search = {"float_score": {"kl": 0.0},
              "config": {"promote_weight_bits": 8, "promote_share": 0.25, "float_share": 0.3},
              "promotion_trials": {"g1": {"kl": 0.1}}, "promoted_groups": ["g1"], "promoted_share": 0.12,
              "float_trials": {"g2": {"kl": 0.1}}, "float_groups": ["g2"], "kept_float_share": 0.29}
    text = "\n".join(_search_section(search))
    assert "mixed precision: weights of `g1` at 8 bits (12% of the weights, at most 25%)" in text
    assert "float fallback: `g2` kept float (29% of the searched layers' FLOPs, at most 30%)" in text


def test_search_section_says_which_weight_reconstruction_the_plan_kept() -> None:
    before, refit, rounded = {"kl": 0.039}, {"kl": 0.030}, {"kl": 0.018}
    search = {"float_score": {"kl": 0.0}, "config": {},
              "refit_layers": ["c1", "c2"], "refit_kept": False,
              "refit_trial": {"before": before, "after": refit, "seconds": 10.0},
              "rounding_kept": True,
              "rounding_trial": {"layers": ["c1", "c2", "l1"], "before": before, "after": rounded, "seconds": 250.0}}
    text = "\n".join(_search_section(search))
    assert "2 layer(s) refit to their int8 inputs in 10.0 s, dev logit KL 0.039 -> 0.03: not kept" in text
    assert ("with GPTQ rounding: 3 layer(s) refit and rounded to their weight grid in 250.0 s, "
            "dev logit KL 0.039 -> 0.018: kept") in text
