"""QuantPlan / LayerPlan: JSON round trip, deterministic bytes, precedence, messages, atomic save."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sq_pt2e.errors import PlanError
from sq_pt2e.plan import SCHEMA_VERSION, LayerPlan, QuantPlan, w8a8_plan

FC1 = "wav2vec2.encoder.layers.3.feed_forward.intermediate_dense"
K_PROJ = "wav2vec2.encoder.layers.3.attention.k_proj"
MODEL_LAYERS = (
    "wav2vec2.feature_extractor.conv_layers.0.conv",
    K_PROJ,
    FC1,
    "lm_head",
)


def _rich_plan() -> QuantPlan:
    return QuantPlan(
        default=LayerPlan("*", weight_bits=7, calibration="mse"),
        op_defaults=(LayerPlan("*", op="linear", act_bits=6, calibration="entropy"),),
        layers=(
            LayerPlan(
                FC1,
                op="linear",
                weight_bits=4,
                calibration="percentile",
                clip_percentile=99.99,
                weight_calibration="mse",
                act_range=3.25,
                reason="outliers",
                evidence=(("kl", 0.00125), ("wer", 12.5)),
            ),
            LayerPlan(K_PROJ, skip=True, reason="sensitive"),
        ),
        model="tiny-wav2vec2",
    )


# ------------------------------------------------------------------ JSON round trip
def test_dict_round_trip_gives_an_equal_plan() -> None:
    plan = _rich_plan()
    assert QuantPlan.from_dict(plan.to_dict()) == plan


def test_save_then_load_gives_an_equal_plan(tmp_path: Path) -> None:
    plan = _rich_plan()
    path = plan.save(tmp_path / "nested" / "plan.json")
    assert path == tmp_path / "nested" / "plan.json"
    assert QuantPlan.load(path) == plan


def test_to_json_is_byte_identical_for_equal_plans_and_matches_the_saved_file(tmp_path: Path) -> None:
    first, second = _rich_plan(), _rich_plan()
    assert first is not second
    assert first.to_json().encode() == second.to_json().encode()
    path = first.save(tmp_path / "plan.json")
    assert path.read_bytes() == second.to_json().encode("utf-8")
    # Sorted keys, 2-space indent, trailing newline: diffable by hand.
    text = first.to_json()
    assert text.endswith("}\n")
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_to_json_ignores_evidence_order() -> None:
    a = LayerPlan(FC1, reason="x", evidence=(("wer", 1.0), ("kl", 2.0)))
    b = LayerPlan(FC1, reason="x", evidence=(("kl", 2.0), ("wer", 1.0)))
    assert QuantPlan(layers=(a,)).to_json() == QuantPlan(layers=(b,)).to_json()


def test_round_trip_is_equal_for_evidence_in_any_order() -> None:
    plan = QuantPlan(layers=(LayerPlan(FC1, evidence=(("wer", 1.0), ("kl", 2.0))),))
    assert QuantPlan.from_dict(plan.to_dict()) == plan


_layer_plans = st.builds(
    LayerPlan,
    name=st.sampled_from(MODEL_LAYERS),
    op=st.sampled_from([None, "conv1d", "grouped_conv1d", "linear"]),
    weight_bits=st.integers(2, 8),
    act_bits=st.integers(2, 8),
    calibration=st.sampled_from(["max", "mse", "entropy"]),
    weight_calibration=st.sampled_from(["max", "mse"]),
    act_range=st.none() | st.floats(1e-6, 1e6, allow_nan=False),
    reason=st.text(max_size=10),
)


@settings(max_examples=60, deadline=None)
@given(layer=_layer_plans)
def test_any_valid_layer_plan_survives_the_json_round_trip(layer: LayerPlan) -> None:
    plan = QuantPlan(layers=(layer,))
    again = QuantPlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    assert again.to_json() == plan.to_json()


# ------------------------------------------------------------------ precedence
def test_resolve_prefers_exact_name_over_op_default_over_default() -> None:
    plan = QuantPlan(
        default=LayerPlan("*", weight_bits=8, act_bits=8),
        op_defaults=(LayerPlan("*", op="linear", weight_bits=6),),
        layers=(LayerPlan(FC1, weight_bits=4),),
    )
    exact = plan.resolve(FC1, "linear")
    by_op = plan.resolve(K_PROJ, "linear")
    fallback = plan.resolve("wav2vec2.feature_extractor.conv_layers.0.conv", "conv1d")
    assert (exact.name, exact.op, exact.weight_bits) == (FC1, "linear", 4)
    assert (by_op.name, by_op.op, by_op.weight_bits) == (K_PROJ, "linear", 6)
    assert (fallback.name, fallback.op, fallback.weight_bits) == (
        "wav2vec2.feature_extractor.conv_layers.0.conv",
        "conv1d",
        8,
    )


def test_resolve_rejects_a_layer_whose_op_differs_from_the_model() -> None:
    plan = QuantPlan(layers=(LayerPlan(FC1, op="conv1d"),))
    with pytest.raises(PlanError, match=rf"'{FC1}' is a linear in the model but the plan says op='conv1d'"):
        plan.resolve(FC1, "linear")


def test_with_skipped_keeps_other_settings_of_an_existing_entry() -> None:
    plan = QuantPlan(layers=(LayerPlan(FC1, weight_bits=4),)).with_skipped([FC1, K_PROJ], "too sensitive")
    assert plan.explicit_names() == (FC1, K_PROJ)
    assert plan.resolve(FC1, "linear") == LayerPlan(FC1, op="linear", weight_bits=4, skip=True, reason="too sensitive")
    assert plan.resolve(K_PROJ, "linear").skip


def test_w8a8_plan_skips_exactly_the_named_layers() -> None:
    plan = w8a8_plan("tiny", skip={FC1: "outliers"})
    assert plan.model == "tiny"
    assert plan.layers == (LayerPlan(FC1, skip=True, reason="outliers"),)
    assert plan.resolve(K_PROJ, "linear") == LayerPlan(K_PROJ, op="linear")


@pytest.mark.parametrize(("bits", "qrange"), [(8, (-127, 127)), (7, (-63, 63)), (4, (-7, 7)), (2, (-1, 1))])
def test_qranges_are_signed_symmetric(bits: int, qrange: tuple[int, int]) -> None:
    layer = LayerPlan(FC1, weight_bits=bits, act_bits=bits)
    assert layer.weight_qrange == qrange
    assert layer.act_qrange == qrange


# ------------------------------------------------------------------ validation messages
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weight_bits": 9}, "weight_bits=9 for '{name}'"),
        ({"act_bits": 1}, "act_bits=1 for '{name}'"),
        ({"weight_bits": True}, "weight_bits=True for '{name}'"),
        ({"act_bits": 8.0}, "act_bits=8.0 for '{name}'"),
        (
            {"calibration": "percentile", "clip_percentile": 101.0},
            "clip_percentile=101.0 for '{name}' (expected 0 < p <= 100",
        ),
        ({"calibration": "percentile", "clip_percentile": 0.0}, "clip_percentile=0.0 for '{name}'"),
        ({"calibration": "percentile"}, "clip_percentile=None for '{name}'"),
        ({"clip_percentile": 99.9}, "clip_percentile=99.9 for '{name}' is only used with calibration='percentile'"),
        ({"act_range": 0.0}, "act_range=0.0 for '{name}'"),
        ({"act_range": float("inf")}, "act_range=inf for '{name}'"),
        ({"act_range": float("nan")}, "act_range=nan for '{name}'"),
        ({"op": "conv2d"}, "op='conv2d' for '{name}'"),
        ({"calibration": "minmax"}, "calibration='minmax' for '{name}'"),
        ({"weight_calibration": "entropy"}, "weight_calibration='entropy' for '{name}'"),
        ({"skip": True}, "layer '{name}' is skipped without a reason"),
    ],
)
def test_invalid_layer_plan_message_names_layer_and_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError) as info:
        LayerPlan(FC1, **fields)  # type: ignore[arg-type]
    assert message.format(name=FC1) in str(info.value)


def test_plan_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError, match="weight_bits=1"):
        LayerPlan(FC1, weight_bits=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"default": LayerPlan(FC1)}, "default layer plan must be named '*'"),
        ({"layers": (LayerPlan(FC1), LayerPlan(FC1, weight_bits=4))}, f"more than once in the plan: ['{FC1}']"),
        ({"layers": (LayerPlan("*"),)}, "'*' is reserved for the default"),
        ({"op_defaults": (LayerPlan("*"),)}, "op default must have name '*' and an op"),
        ({"op_defaults": (LayerPlan(FC1, op="linear"),)}, f"got name='{FC1}' op='linear'"),
        (
            {"op_defaults": (LayerPlan("*", op="linear"), LayerPlan("*", op="linear", weight_bits=4))},
            "op default for 'linear' listed more than once",
        ),
    ],
)
def test_inconsistent_plan_is_rejected_with_the_reason(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError) as info:
        QuantPlan(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


# ------------------------------------------------------------------ names in the model
def test_unknown_layer_name_raises_with_a_did_you_mean_hint() -> None:
    plan = QuantPlan(layers=(LayerPlan("wav2vec2.encoder.layers.3.attention.k_prj"),))
    with pytest.raises(PlanError) as info:
        plan.check_names(MODEL_LAYERS, source="plan.json")
    text = str(info.value)
    assert "layer 'wav2vec2.encoder.layers.3.attention.k_prj' in plan.json not in exported graph" in text
    assert f"(4 quantizable layers; did you mean '{K_PROJ}'?)" in text


def test_unknown_layer_name_with_nothing_close_has_no_hint() -> None:
    plan = QuantPlan(layers=(LayerPlan("decoder.attn"),))
    with pytest.raises(PlanError, match=r"not in exported graph \(4 quantizable layers\)$"):
        plan.check_names(MODEL_LAYERS)


def test_known_layer_names_pass_the_check() -> None:
    _rich_plan().check_names(MODEL_LAYERS)


# ------------------------------------------------------------------ schema and file errors
def test_schema_version_mismatch_is_rejected_in_the_constructor() -> None:
    with pytest.raises(PlanError, match=rf"schema_version=2 is not supported \(this sq-pt2e reads {SCHEMA_VERSION}\)"):
        QuantPlan(schema_version=SCHEMA_VERSION + 1)


@pytest.mark.parametrize("version", [None, 0, SCHEMA_VERSION + 1, "1"])
def test_loading_another_schema_version_names_the_file(tmp_path: Path, version: object) -> None:
    data = _rich_plan().to_dict()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=rf"{path}: schema_version={version!r} is not supported"):
        QuantPlan.load(path)


def test_unknown_fields_are_named() -> None:
    data = _rich_plan().to_dict()
    data["layers"][0]["bitz"] = 4
    with pytest.raises(PlanError, match=rf"unknown field\(s\) \['bitz'\] in layer '{FC1}'"):
        QuantPlan.from_dict(data, source="p.json")
    data = _rich_plan().to_dict()
    data["extra"] = 1
    with pytest.raises(PlanError, match=r"p.json: unknown top-level field\(s\) \['extra'\]"):
        QuantPlan.from_dict(data, source="p.json")


def test_invalid_json_and_missing_file_raise_plan_error_naming_the_path(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PlanError, match=rf"{broken} is not valid JSON"):
        QuantPlan.load(broken)
    missing = tmp_path / "missing.json"
    with pytest.raises(PlanError, match=rf"cannot read plan {missing}"):
        QuantPlan.load(missing)
    with pytest.raises(PlanError, match="expected a JSON object, got list"):
        QuantPlan.from_dict([])  # type: ignore[arg-type]


# ------------------------------------------------------------------ atomic save
def test_save_replaces_an_existing_file_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("old")
    QuantPlan(model="new").save(path)
    assert QuantPlan.load(path).model == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_interrupted_save_leaves_the_previous_plan_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = QuantPlan(model="before").save(tmp_path / "plan.json")
    before = path.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _rich_plan().save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


@pytest.mark.parametrize("where", ["evidence", "layers"])
def test_null_evidence_or_layers_in_a_plan_file_raise_plan_error_naming_the_file(where: str) -> None:
    data = _rich_plan().to_dict()
    if where == "evidence":
        data["layers"][0]["evidence"] = None
    else:
        data["layers"] = None
    with pytest.raises(PlanError, match="plan.json"):
        QuantPlan.from_dict(data, source="plan.json")


def test_non_boolean_skip_in_a_plan_file_is_rejected() -> None:
    with pytest.raises(PlanError, match="skip='false'"):
        LayerPlan.from_dict({"name": FC1, "skip": "false", "reason": "hand edited"})


# ------------------------------------------------------------------ hostile plan files
_JUNK = st.sampled_from([None, True, False, 0, -1, 8, 9, 2.5, float("nan"), float("inf"), "x", "99", "linear", "*",
                         [], {}, [1], {"a": 1}])


def _paths(data: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found: list[tuple[object, ...]] = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found += [(*prefix, key), *_paths(value, (*prefix, key))]
    return found


_BASE = _rich_plan().to_dict()
_PATHS = _paths(_BASE)


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), _JUNK), min_size=1, max_size=3),
       drop=st.lists(st.sampled_from(_PATHS), max_size=1))
def test_any_edited_plan_file_loads_equal_or_raises_plan_error_naming_the_file(
    edits: list[tuple[tuple[object, ...], object]], drop: list[tuple[object, ...]]
) -> None:
    data = json.loads(json.dumps(_BASE))
    for path, value in [*edits, *((p, KeyError) for p in drop)]:
        target: object = data
        try:
            for key in path[:-1]:
                target = target[key]  # type: ignore[index]
            if value is KeyError:
                del target[path[-1]]  # type: ignore[attr-defined]
            else:
                target[path[-1]] = value  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            continue
    try:
        plan = QuantPlan.from_dict(data, source="edited.json")
    except PlanError as exc:
        assert str(exc).startswith("edited.json"), str(exc)
        return
    assert QuantPlan.from_dict(json.loads(plan.to_json())) == plan


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("clip_percentile", "99", "clip_percentile='99'"), ("act_range", True, "act_range=True"),
     ("act_range", [1.0], r"act_range=\[1.0\]"), ("reason", 5, "reason=5"), ("name", 7, "name 7")],
)
def test_wrongly_typed_fields_in_a_plan_file_are_refused(field: str, value: object, message: str) -> None:
    entry = {"name": "a.b", "calibration": "percentile", "clip_percentile": 99.0, field: value}
    with pytest.raises(PlanError, match=rf"^p.json: .*{message}"):
        QuantPlan.from_dict({"schema_version": SCHEMA_VERSION, "layers": [entry]}, source="p.json")


def test_a_layer_without_a_name_and_a_non_text_model_are_refused() -> None:
    with pytest.raises(PlanError, match=r"p.json: a layer entry has no 'name'"):
        QuantPlan.from_dict({"schema_version": SCHEMA_VERSION, "layers": [{"weight_bits": 4}]}, source="p.json")
    with pytest.raises(PlanError, match=r"p.json: 'model' must be text"):
        QuantPlan.from_dict({"schema_version": SCHEMA_VERSION, "model": 3}, source="p.json")


def test_a_non_utf8_file_is_a_plan_error(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(PlanError, match=r"p.json is not UTF-8 text"):
        QuantPlan.load(tmp_path / "p.json")


def test_a_plan_from_a_newer_version_says_so(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="written by a newer sq-pt2e: upgrade"):
        QuantPlan.from_dict({"schema_version": SCHEMA_VERSION + 1})


def test_a_plan_made_for_another_model_is_refused() -> None:
    plan = w8a8_plan("ref-wav2vec2")
    plan.check_model("ref-wav2vec2")
    w8a8_plan().check_model("anything")  # hand-written plans record no model
    with pytest.raises(PlanError, match=r"plan.json was made for model 'ref-wav2vec2', not 'ref-hubert'"):
        plan.check_model("ref-hubert", source="plan.json")


def test_needs_calibration_ignores_skipped_layers_and_reads_defaults() -> None:
    fixed = LayerPlan(FC1, act_range=2.0)
    skipped = LayerPlan("wav2vec2.feature_extractor.conv_layers.0.conv", skip=True, reason="float")
    assert not QuantPlan(layers=(fixed, skipped)).needs_calibration()
    assert QuantPlan(layers=(fixed, LayerPlan("lm_head"))).needs_calibration()
    assert QuantPlan().needs_calibration()
    assert not QuantPlan(default=LayerPlan("*", act_range=1.0)).needs_calibration()
    ranged = QuantPlan(default=LayerPlan("*", act_range=1.0), attention="int8")
    assert ranged.needs_calibration()  # attention's q, k, v observers
    assert not dataclasses.replace(ranged, attention_scales=((0.1, 0.2, 0.3),)).needs_calibration()
