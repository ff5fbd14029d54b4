"""The accuracy table on a tiny model: every cell present, best marked, well-formed output."""

from __future__ import annotations

import json

import pytest

from sq_pt2e.accuracy import build_accuracy_table
from sq_pt2e.baselines import Bits
from sq_pt2e.inputs import load_source
from sq_pt2e.models import build_model


@pytest.fixture(scope="module")
def table():
    clean = load_source(None, shipped="test-clean")
    return build_accuracy_table(
        build_model("tiny-wav2vec2", seed=0), "tiny-wav2vec2", load_source(None, limit=2), clean[:2],
        {"test-clean": clean}, bit_widths=(Bits(8, 8), Bits(4, 4)),
        methods=("max", "dynamic-int8", "stablequant-paper", "stablequant"),
        progress=lambda _line: None,
    )


def test_every_supported_method_and_width_has_a_cell(table) -> None:
    cells = {(c.method, c.bits) for c in table.cells}
    assert cells == {("max", "W8A8"), ("dynamic-int8", "W8A8"), ("stablequant", "W8A8"), ("max", "W4A4"),
                     ("stablequant", "W4A4"), ("stablequant-paper", "W8A8"), ("stablequant-paper", "W4A4")}
    assert set(table.search) == {"W8A8 stablequant", "W4A4 stablequant", "W8A8 stablequant-paper",
                                 "W4A4 stablequant-paper"}


def test_exactly_the_lowest_wer_per_column_is_marked_best(table) -> None:
    for width in ("W8A8", "W4A4"):
        column = [c for c in table.cells if c.bits == width]
        lowest = min(c.wer for c in column)
        assert [c.best for c in column] == [c.wer == lowest for c in column]


def test_deltas_are_relative_to_float_and_inside_their_interval(table) -> None:
    float_wer = table.float_wer["test-clean"]
    for cell in table.cells:
        assert cell.delta == pytest.approx(cell.wer - float_wer, abs=1e-6)
        assert cell.delta_low <= cell.delta <= cell.delta_high


def test_markdown_and_json(table) -> None:
    data = json.loads(table.to_json())
    assert data["utterances"] == {"test-clean": 4} and len(data["cells"]) == 7
    rows = [line for line in table.to_markdown().splitlines() if line.startswith("| ")]
    assert len(rows) == (1 + 4) + (1 + 1)  # header + one row per method; the same for the paired comparisons
    assert "n/a" in table.to_markdown()  # dynamic int8 has no W4A4


def test_stablequant_is_compared_pair_by_pair_with_every_other_method_of_its_column(table) -> None:
    pairs = {(c.against, c.bits) for c in table.comparisons}
    assert pairs == {("max", "W8A8"), ("dynamic-int8", "W8A8"), ("stablequant-paper", "W8A8"), ("max", "W4A4"),
                     ("stablequant-paper", "W4A4")}
    wer_of = {(c.method, c.bits): c.wer for c in table.cells}
    for c in table.comparisons:
        assert c.method == "stablequant" and c.eval_set == "test-clean" and c.low <= c.delta <= c.high
        assert c.delta == pytest.approx(wer_of[("stablequant", c.bits)] - wer_of[(c.against, c.bits)], abs=1e-6)
    text = table.to_markdown()
    best = min((c for c in table.comparisons if c.bits == "W8A8"), key=lambda c: wer_of[(c.against, "W8A8")])
    assert "Paired against the best other method" in text and f"{best} vs {best.against}" in text


def test_paired_comparisons_say_which_method_is_better_beyond_chance() -> None:
    from sq_pt2e.accuracy import paired_comparisons

    refs = [f"WORD{i} MORE WORDS HERE" for i in range(40)]
    wrong = ["X MORE WORDS HERE"] * 40
    transcripts = {("stablequant", "W8A8", "s"): refs, ("max", "W8A8", "s"): wrong, ("max", "W4A4", "s"): refs,
                   ("stablequant-fallback", "W8A8", "s"): wrong}
    found = {(c.method, c.against): c for c in paired_comparisons(transcripts, {"s": refs})}
    assert set(found) == {("stablequant", "max"), ("stablequant-fallback", "max")}
    assert found[("stablequant", "max")].high < 0 and found[("stablequant", "max")].delta == pytest.approx(-25.0)
    assert found[("stablequant-fallback", "max")].delta == 0.0


def test_wer_against_float_leaves_out_utterances_with_an_empty_float_transcript() -> None:
    import math

    from sq_pt2e.accuracy import wer_against_float

    assert wer_against_float(["A B", "", "C D"], ["A B", "X", "C E"]) == pytest.approx(25.0)
    assert math.isnan(wer_against_float(["", " "], ["A", ""]))


def test_an_update_replaces_the_cells_it_measures_again_and_keeps_the_rest(table) -> None:
    from dataclasses import replace

    from sq_pt2e.accuracy import AccuracyTable

    earlier = AccuracyTable.from_json(table.to_json())
    assert earlier == table
    perfect = table.references["test-clean"]
    rerun = AccuracyTable(table.model, dict(table.float_wer), dict(table.utterances),
                          [replace(c, wer=-1.0, best=False, transcripts=list(perfect))
                           for c in table.cells if c.method == "max"],
                          {"W8A8 max": {"evaluations": 0}}, 1.0, references=dict(table.references))
    updated = earlier.updated_with(rerun)
    assert [(c.method, c.bits) for c in updated.cells] == [(c.method, c.bits) for c in table.cells]  # same order
    for old, new in zip(table.cells, updated.cells, strict=True):
        assert new.wer == (-1.0 if old.method == "max" else old.wer)
        assert new.best == (old.method == "max")  # the new lowest WER of both columns
    assert set(updated.search) == set(table.search) | {"W8A8 max"}
    untouched = {c for c in table.comparisons if c.against != "max"}
    assert {c for c in updated.comparisons if c.against != "max"} == untouched
    against_max = [c for c in updated.comparisons if c.against == "max"]
    wer_of = {(c.method, c.bits): c.wer for c in table.cells}
    assert len(against_max) == 2  # recomputed from the transcripts: max is now transcribed perfectly
    assert all(c.delta == pytest.approx(wer_of[(c.method, c.bits)]) for c in against_max)
    for other in (AccuracyTable("tiny-hubert", dict(table.float_wer), dict(table.utterances)),
                  replace(rerun, references={"test-clean": ["OTHER WORDS"] * 4})):
        with pytest.raises(ValueError, match="rerun the whole table"):
            earlier.updated_with(other)


def test_an_update_of_a_table_without_transcripts_drops_the_out_of_date_comparisons(table) -> None:
    from dataclasses import replace

    from sq_pt2e.accuracy import AccuracyTable

    older = replace(table, cells=[replace(c, transcripts=[]) for c in table.cells], references={})
    rerun = AccuracyTable(table.model, dict(table.float_wer), dict(table.utterances),
                          [replace(c, wer=-1.0, transcripts=[]) for c in table.cells if c.method == "max"])
    updated = AccuracyTable.from_json(older.to_json()).updated_with(rerun)
    assert updated.comparisons == [c for c in table.comparisons if c.against != "max"]


def test_each_method_runs_only_where_it_has_a_cell() -> None:
    from sq_pt2e.accuracy import method_applies
    from sq_pt2e.baselines import Bits

    assert method_applies("stablequant", Bits(4, 8)) and method_applies("stablequant-fallback", Bits(8, 8))
    assert method_applies("stablequant-mixed", Bits(4, 8)) and not method_applies("stablequant-mixed", Bits(8, 8))
    assert method_applies("max", Bits(6, 6)) and method_applies("dynamic-int8", Bits(8, 8))
    assert not method_applies("dynamic-int8", Bits(4, 8))


def test_a_decoder_scores_the_same_logits_as_one_more_evaluation_set() -> None:
    from sq_pt2e.beam import BeamSearchDecoder
    from sq_pt2e.lm import NgramLM

    clean = load_source(None, shipped="test-clean")[:2]
    lm = NgramLM.from_sentences([u.text for u in clean])
    table = build_accuracy_table(
        build_model("tiny-wav2vec2", seed=0), "tiny-wav2vec2", load_source(None, limit=2), clean[:1],
        {"test-clean": clean}, methods=("max",), decoders={"LM": BeamSearchDecoder(lm)}, progress=lambda _line: None)
    assert set(table.float_wer) == {"test-clean", "test-clean, LM"} and table.utterances["test-clean, LM"] == 2
    assert table.references["test-clean, LM"] == table.references["test-clean"]
    greedy, beam = (next(c for c in table.cells if c.eval_set == name) for name in ("test-clean", "test-clean, LM"))
    assert greedy.logit_cosine == beam.logit_cosine  # one forward pass, two decodings
    assert all(set(text.split()) <= set(lm.words()) for text in beam.transcripts)
    assert "### test-clean, LM (2 utterances" in table.to_markdown()
