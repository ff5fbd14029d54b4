"""Quantization plans: every per-layer decision as frozen, JSON-serialisable data.

A ``QuantPlan`` is what the StableQuant search produces and what
``StableQuantQuantizer`` consumes. It can be saved, read, edited by hand and
re-applied without searching again. This module holds data only (no torch at import);
a plan whose layers carry reconstructed weights (:mod:`sq_pt2e.reconstruct`) keeps
them in ``QuantPlan.refits`` and saves them next to its JSON file.

Precedence is decided in one place, :meth:`QuantPlan.resolve`: an exact layer
name wins over the per-op default, which wins over the global default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.errors import PlanError

__all__ = [
    "ATTENTION_KV_BITS",
    "ATTENTION_MODES",
    "SCHEMA_VERSION",
    "TARGETS",
    "Target",
    "OpKind",
    "Calibration",
    "LayerPlan",
    "QuantPlan",
    "refit_file",
    "w8a8_plan",
]

SCHEMA_VERSION = 1

OpKind = Literal["conv1d", "grouped_conv1d", "linear"]
Calibration = Literal["max", "percentile", "mse", "entropy"]
WeightCalibration = Literal["max", "mse"]
ActScheme = Literal["symmetric", "affine"]

_OP_KINDS: tuple[str, ...] = get_args(OpKind)
_CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
_WEIGHT_CALIBRATIONS: tuple[str, ...] = get_args(WeightCalibration)
_ACT_SCHEMES: tuple[str, ...] = get_args(ActScheme)
DEFAULT_NAME = "*"
ATTENTION_MODES: tuple[str, ...] = ("float", "int8")
ATTENTION_KV_BITS: tuple[int, ...] = (7, 8)
# The backends a plan is quantized for: oneDNN through inductor (x86), XNNPACK in an ExecuTorch .pte.
Target = Literal["x86_inductor", "xnnpack"]
TARGETS: tuple[Target, ...] = ("x86_inductor", "xnnpack")


@dataclass(frozen=True)
class LayerPlan:
    """How one layer (a Conv1d or Linear, named by its ``named_modules()`` path) is quantized.

    Attributes:
        name: module path, e.g. ``"wav2vec2.encoder.layers.3.attention.k_proj"``;
            ``"*"`` for a default.
        op: ``"conv1d"``, ``"grouped_conv1d"`` (groups > 1, the positional convolution) or
            ``"linear"``; ``None`` only in a default that applies to all ops.
        weight_bits: signed symmetric per-output-channel weight bits (2..8, int8 storage).
        act_bits: per-tensor input-activation bits (2..8): ``2**(bits-1) - 1`` levels each side of zero.
        calibration: how the input-activation range is computed from calibration data.
        clip_percentile: percentile of |x| used as range; required iff ``calibration == "percentile"``.
        weight_calibration: ``"max"`` (max |w| per channel) or ``"mse"`` (MSE-optimal clip).
        act_range: a fixed input-activation range max |x| that overrides calibration
            (set by the search so its result is re-applied exactly, without recalibrating).
        act_scheme: ``"symmetric"`` grid ``[-r, r]``, or ``"affine"``: the same number
            of levels over ``[floor, r]`` where the inputs are one-sided (post-GELU),
            which halves the step there.
        act_floor: fixed lower end of the affine grid (``-act_range <= act_floor <= 0``,
            needs ``act_range``); None with ``"affine"``: the smallest calibration value.
        input_scale: per-input-channel factors ``s`` (SmoothQuant-style smoothing, see
            :mod:`sq_pt2e.smoothing`): the layer computes ``(W * s)(x / s)``, and its
            activation range is that of ``x / s``. None: no scaling.
        refit: digest of the layer's reconstructed weight and bias (:mod:`sq_pt2e.reconstruct`),
            held in ``QuantPlan.refits``; None: the model's own weights. Ignored when skipped.
        outlier_range: outlier split (needs a fixed ``act_range``): the part of the input the
            grid clips, ``x - clamp(x, grid)``, is not dropped but quantized on a second grid of
            ``act_bits`` over ``[0, outlier_range]`` (affine input grid; ``[-outlier_range,
            outlier_range]`` for a symmetric one) and multiplied by the same int8 weights in a
            second int8 conv / linear whose output is added. None: outliers are clipped.
        skip: keep this layer in float.
        reason: why this choice, or why skipped; goes into the report.
        evidence: numbers behind the decision (sensitivity, WER per candidate, ...).
    """

    name: str
    op: OpKind | None = None
    weight_bits: int = 8
    act_bits: int = 8
    calibration: Calibration = "max"
    clip_percentile: float | None = None
    weight_calibration: WeightCalibration = "max"
    act_range: float | None = None
    act_scheme: ActScheme = "symmetric"
    act_floor: float | None = None
    input_scale: tuple[float, ...] | None = None
    refit: str | None = None
    outlier_range: float | None = None
    skip: bool = False
    reason: str = ""
    evidence: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        where = f"for {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise PlanError(f"layer plan name {self.name!r} (expected a module path or '*')")
        _check_number("clip_percentile", self.clip_percentile, where)
        _check_number("act_range", self.act_range, where)
        if not isinstance(self.reason, str):
            raise PlanError(f"reason={self.reason!r} {where} (expected text)")
        if self.op is not None and self.op not in _OP_KINDS:
            raise PlanError(f"op={self.op!r} {where} (expected one of {_OP_KINDS})")
        for label, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise PlanError(f"{label}={bits!r} {where} (expected an integer 2 <= bits <= 8)")
        if self.calibration not in _CALIBRATIONS:
            raise PlanError(f"calibration={self.calibration!r} {where} (expected one of {_CALIBRATIONS})")
        if self.weight_calibration not in _WEIGHT_CALIBRATIONS:
            raise PlanError(
                f"weight_calibration={self.weight_calibration!r} {where} (expected one of {_WEIGHT_CALIBRATIONS})"
            )
        if self.calibration == "percentile":
            p = self.clip_percentile
            if p is None or not 0.0 < float(p) <= 100.0:
                raise PlanError(f"clip_percentile={p!r} {where} (expected 0 < p <= 100 with calibration='percentile')")
        elif self.clip_percentile is not None:
            raise PlanError(
                f"clip_percentile={self.clip_percentile!r} {where} is only used with calibration='percentile' "
                f"(got calibration={self.calibration!r})"
            )
        if self.act_range is not None and not (float(self.act_range) > 0.0 and float(self.act_range) < float("inf")):
            raise PlanError(f"act_range={self.act_range!r} {where} (expected a finite value > 0)")
        self._check_act_grid(where)
        self._check_outlier_range(where)
        self._check_input_scale(where)
        if self.refit is not None and (not isinstance(self.refit, str) or len(self.refit) != 16
                                       or any(c not in "0123456789abcdef" for c in self.refit)):
            raise PlanError(f"refit={self.refit!r} {where} (expected the 16-hex-digit digest of its weights, or null)")
        if self.refit is not None and self.name == DEFAULT_NAME:
            raise PlanError(f"refit {where}: reconstructed weights belong to one named layer, not a default")
        if not isinstance(self.skip, bool):
            raise PlanError(f"skip={self.skip!r} {where} (expected true or false)")
        if not isinstance(self.evidence, tuple) or any(
            not (isinstance(item, tuple) and len(item) == 2) for item in self.evidence
        ):
            raise PlanError(f"evidence={self.evidence!r} {where} (expected (name, value) pairs)")
        # One canonical order, so equal decisions compare equal however they were built.
        object.__setattr__(self, "evidence", tuple(sorted((str(k), float(v)) for k, v in self.evidence)))
        bad = [k for k, v in self.evidence if not math.isfinite(v)]
        if bad:
            raise PlanError(f"evidence {bad} {where} is not a finite number (NaN/Inf are not valid JSON either)")
        if self.skip and not self.reason:
            raise PlanError(f"layer {self.name!r} is skipped without a reason (set reason='...')")

    def _check_act_grid(self, where: str) -> None:
        if self.act_scheme not in _ACT_SCHEMES:
            raise PlanError(f"act_scheme={self.act_scheme!r} {where} (expected one of {_ACT_SCHEMES})")
        _check_number("act_floor", self.act_floor, where)
        if self.act_floor is None:
            return
        if self.act_scheme != "affine" or self.act_range is None:
            raise PlanError(f"act_floor={self.act_floor!r} {where} needs act_scheme='affine' and a fixed act_range "
                            f"(got act_scheme={self.act_scheme!r}, act_range={self.act_range!r})")
        if not -float(self.act_range) <= float(self.act_floor) <= 0.0:
            raise PlanError(f"act_floor={self.act_floor!r} {where} (expected -act_range <= act_floor <= 0, "
                            f"act_range={self.act_range!r})")

    def _check_outlier_range(self, where: str) -> None:
        _check_number("outlier_range", self.outlier_range, where)
        if self.outlier_range is None:
            return
        if not 0.0 < float(self.outlier_range) < float("inf"):
            raise PlanError(f"outlier_range={self.outlier_range!r} {where} (expected a finite value > 0, or null)")
        if self.act_range is None or (self.act_scheme == "affine" and self.act_floor is None):
            raise PlanError(f"outlier_range={self.outlier_range!r} {where} needs a fixed grid (act_range, and "
                            "act_floor with act_scheme='affine'): the outliers are the input beyond that grid")

    def _check_input_scale(self, where: str) -> None:
        if self.input_scale is None:
            return
        values = self.input_scale
        if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)) or not values:
            raise PlanError(f"input_scale={values!r} {where} (expected a non-empty list of numbers, one per input "
                            "channel, or null)")
        if self.name == "*":
            raise PlanError(f"input_scale {where}: per-channel factors belong to one named layer, not a default")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
               or not (0.0 < float(v) < float("inf"))]
        if bad:
            raise PlanError(f"input_scale {where} has {len(bad)} entries that are not finite numbers > 0, "
                            f"e.g. {bad[0]!r}")
        object.__setattr__(self, "input_scale", tuple(float(v) for v in values))

    @property
    def weight_qrange(self) -> tuple[int, int]:
        """Signed symmetric integer range of the weights, e.g. (-127, 127) for 8 bits."""
        return _symmetric_range(self.weight_bits)

    @property
    def act_qrange(self) -> tuple[int, int]:
        """Signed symmetric integer range of the input activation."""
        return _symmetric_range(self.act_bits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``evidence`` becomes an object."""
        data = dataclasses.asdict(self)
        data["evidence"] = dict(self.evidence)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "plan") -> LayerPlan:
        """Inverse of :meth:`to_dict`; unknown keys raise ``PlanError`` naming them."""
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a layer entry must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {unknown} in layer {data.get('name')!r} "
                            f"(known: {sorted(known)})")
        if "name" not in data:
            raise PlanError(f"{where}: a layer entry has no 'name' (fields: {sorted(data)})")
        fields = dict(data)
        evidence = fields.get("evidence", {})
        if not isinstance(evidence, dict):
            raise PlanError(f"{where}: evidence of layer {data.get('name')!r} must be an object, got {evidence!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in evidence.values()):
            raise PlanError(f"{where}: evidence of layer {data.get('name')!r} must map names to numbers")
        fields["evidence"] = tuple((str(k), float(v)) for k, v in evidence.items())
        try:
            return cls(**fields)
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from exc


def _check_number(label: str, value: object, where: str) -> None:
    """``value`` is None or a real number (not a bool, not text)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise PlanError(f"{label}={value!r} {where} (expected a number or null)")


def _symmetric_range(bits: int) -> tuple[int, int]:
    top = 2 ** (bits - 1) - 1
    return -top, top


@dataclass(frozen=True)
class QuantPlan:
    """Per-layer quantization decisions for one model, in graph order.

    Attributes:
        default: settings for every quantizable layer not named in ``layers``.
        layers: explicit per-layer decisions; names must exist in the model.
        op_defaults: per-op-kind defaults (e.g. all ``linear`` at 4 bits).
        model: free-form identity of the model the plan was made for (architecture).
        attention: ``"float"`` (default) or ``"int8"``: quantize the attention matmuls too
            (q, k, v and the attention probabilities), for inductor's int8 attention kernels
            (:mod:`sq_pt2e.backends.int8_attention`).
        attention_scales: with ``attention="int8"``, fixed scales of each attention block's
            ``q``, ``k`` and ``v`` (symmetric grids), block by block in graph order; empty
            (default): observed on the calibration audio. Compiled buckets of arbitrary-length
            audio fix them (``backends.inductor_buckets.pin_attention_scales``) so that every
            bucket quantizes attention alike.
        attention_kv_bits: with ``attention="int8"``, the grid of ``k`` and ``v``: 8 (default)
            or 7 (``-63..63``), which CPUs without VNNI multiply exactly
            (``backends.inductor.fit_plan_to_cpu`` narrows them there); ``q`` and the
            probabilities keep 8 bits.
        scored_for: the backend whose int8 arithmetic the search scored the plan on
            (``SearchConfig.target``: ``"x86_inductor"`` or ``"xnnpack"``; ``""``: not searched, or
            searched before this was recorded). The plan runs on either; it may be worse on the other.
        schema_version: format version; plans of another version are rejected.
        refits: ``{layer: RefitWeights}``, the reconstructed weights the layers' ``refit``
            digests name (not part of the JSON: :meth:`save` writes them to
            :func:`refit_file` and :meth:`load` reads them back).
    """

    default: LayerPlan = field(default_factory=lambda: LayerPlan(DEFAULT_NAME))
    layers: tuple[LayerPlan, ...] = ()
    op_defaults: tuple[LayerPlan, ...] = ()
    model: str = ""
    attention: Literal["float", "int8"] = "float"
    attention_scales: tuple[tuple[float, float, float], ...] = ()
    attention_kv_bits: int = 8
    scored_for: Target | Literal[""] = ""
    schema_version: int = SCHEMA_VERSION
    refits: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(
                f"plan schema_version={self.schema_version!r} is not supported (this sq-pt2e reads {SCHEMA_VERSION})"
            )
        if self.default.name != DEFAULT_NAME:
            raise PlanError(f"the default layer plan must be named '*', got {self.default.name!r}")
        if self.attention not in ATTENTION_MODES:
            raise PlanError(f"attention={self.attention!r} (expected one of {ATTENTION_MODES})")
        self._check_attention()
        if self.scored_for not in ("", *TARGETS):
            raise PlanError(f"scored_for={self.scored_for!r} (expected one of {TARGETS} or empty)")
        names = [layer.name for layer in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PlanError(f"layer(s) listed more than once in the plan: {duplicates}")
        for layer in self.layers:
            if layer.name == DEFAULT_NAME:
                raise PlanError("'*' is reserved for the default; give the layer's module path")
        ops = [d.op for d in self.op_defaults]
        for d in self.op_defaults:
            if d.op is None or d.name != DEFAULT_NAME:
                raise PlanError(f"op default must have name '*' and an op, got name={d.name!r} op={d.op!r}")
            if ops.count(d.op) > 1:
                raise PlanError(f"op default for {d.op!r} listed more than once")
        digests = self.refit_digests()
        stray = sorted(n for n, refit in self.refits.items() if digests.get(n) != refit.digest)
        if stray:
            raise PlanError(f"reconstructed weights for layer(s) {stray[:3]} that the plan does not name with that "
                            "digest (LayerPlan.refit)")

    def with_float_attention(self) -> QuantPlan:
        """This plan with attention left in float (and no fixed attention scales)."""
        return dataclasses.replace(self, attention="float", attention_scales=(), attention_kv_bits=8)

    def _check_attention(self) -> None:
        if self.attention_scales and self.attention != "int8":
            raise PlanError(f"attention_scales are for int8 attention, but attention={self.attention!r}")
        if self.attention_kv_bits not in ATTENTION_KV_BITS or isinstance(self.attention_kv_bits, bool):
            raise PlanError(f"attention_kv_bits={self.attention_kv_bits!r} (expected one of {ATTENTION_KV_BITS})")
        if self.attention_kv_bits != 8 and self.attention != "int8":
            raise PlanError(f"attention_kv_bits={self.attention_kv_bits} is for int8 attention, but "
                            f"attention={self.attention!r}")
        for block, scales in enumerate(self.attention_scales):
            valid = (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                     for s in scales)
            if len(scales) != 3 or not all(valid):
                raise PlanError(f"attention_scales[{block}] = {scales!r}: expected three positive scales (q, k, v)")

    # ----------------------------------------------------------------- lookup
    def resolve(self, name: str, op: OpKind) -> LayerPlan:
        """The effective plan of one layer: exact name > op default > global default."""
        for layer in self.layers:
            if layer.name == name:
                if layer.op is not None and layer.op != op:
                    raise PlanError(f"layer {name!r} is a {op} in the model but the plan says op={layer.op!r}")
                return dataclasses.replace(layer, op=op)
        for default in self.op_defaults:
            if default.op == op:
                return dataclasses.replace(default, name=name)
        return dataclasses.replace(self.default, name=name, op=op)

    def needs_calibration(self) -> bool:
        """Whether applying the plan needs calibration audio: some quantized layer has no fixed range,
        or int8 attention has no fixed scales (``attention_scales``).

        A plan without explicit layers relies on its defaults, which calibrate unless they fix a range.
        """
        if self.attention == "int8" and not self.attention_scales:
            return True
        if not self.layers:
            return not self.default.skip and self.default.act_range is None
        return any(not layer.skip and layer.act_range is None for layer in self.layers)

    def input_scales(self) -> dict[str, tuple[float, ...]]:
        """``{layer: input_scale}`` of the quantized layers that carry one (see :mod:`sq_pt2e.smoothing`)."""
        return {layer.name: layer.input_scale for layer in self.layers
                if layer.input_scale is not None and not layer.skip}

    def outlier_layers(self) -> dict[str, LayerPlan]:
        """``{layer: its plan}`` of the quantized layers with an outlier split (``LayerPlan.outlier_range``)."""
        return {layer.name: layer for layer in self.layers if layer.outlier_range is not None and not layer.skip}

    def refit_digests(self) -> dict[str, str]:
        """``{layer: digest}`` of the layers that name reconstructed weights (``LayerPlan.refit``)."""
        return {layer.name: layer.refit for layer in self.layers if layer.refit is not None}

    def refit_weights(self) -> dict[str, Any]:
        """``{layer: RefitWeights}`` of the quantized layers that carry reconstructed weights.

        Raises:
            PlanError: a layer names a refit the plan does not hold (a plan read from JSON
                without its weights file).
        """
        refits = {}
        for layer in self.layers:
            if layer.refit is None or layer.skip:
                continue
            if layer.name not in self.refits:
                raise PlanError(f"layer {layer.name!r} computes with reconstructed weights (digest {layer.refit}) "
                                "that this plan does not hold: read the plan with QuantPlan.load(path), which "
                                "loads them from the .refit.safetensors file saved next to it")
            refits[layer.name] = self.refits[layer.name]
        return refits

    def explicit_names(self) -> tuple[str, ...]:
        """Names of the layers given explicitly, in plan order."""
        return tuple(layer.name for layer in self.layers)

    def check_names(self, model_layers: list[str] | tuple[str, ...], *, source: str = "plan") -> None:
        """Raise ``PlanError`` if the plan names a layer the model does not have."""
        known = set(model_layers)
        for name in self.explicit_names():
            if name not in known:
                close = difflib.get_close_matches(name, model_layers, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                msg = f"layer {name!r} in {source} not in exported graph ({len(known)} quantizable layers{hint})"
                raise PlanError(msg)

    def check_model(self, model: str, *, source: str = "plan") -> None:
        """Raise ``PlanError`` if the plan records another model than ``model``.

        A plan's fixed activation ranges and per-layer choices were searched on one
        model; on another model with the same layer names they would apply silently
        and wrongly. Plans without a recorded model (hand-written) pass.

        Args:
            model: identity of the model about to be quantized (architecture or checkpoint name).
            source: the plan file, for the message.
        """
        if self.model and model and self.model != model:
            msg = (f"{source} was made for model {self.model!r}, not {model!r}: search a plan for this model, or "
                   "set the plan's 'model' field if the two are the same model")
            raise PlanError(msg)

    # ----------------------------------------------------------------- edits
    def with_layers(self, *layers: LayerPlan) -> QuantPlan:
        """Copy with ``layers`` added, replacing existing entries of the same name."""
        new = {layer.name: layer for layer in layers}
        kept = tuple(layer for layer in self.layers if layer.name not in new)
        merged = dataclasses.replace(self, layers=kept + tuple(layers), refits={})
        digests = merged.refit_digests()
        return dataclasses.replace(merged, refits={n: r for n, r in self.refits.items() if digests.get(n) == r.digest})

    def map_layer_plans(self, change: Callable[[LayerPlan], LayerPlan]) -> QuantPlan:
        """Copy with ``change`` applied to the default, every op default and every named layer."""
        return dataclasses.replace(self, default=change(self.default),
                                   op_defaults=tuple(change(d) for d in self.op_defaults),
                                   layers=tuple(change(layer) for layer in self.layers))

    def with_skipped(self, names: list[str] | tuple[str, ...], reason: str) -> QuantPlan:
        """Copy with the named layers kept in float, for ``reason``."""
        existing = {layer.name: layer for layer in self.layers}
        skipped = [
            dataclasses.replace(existing[n], skip=True, reason=reason, refit=None)
            if n in existing
            else LayerPlan(n, skip=True, reason=reason)
            for n in names
        ]
        return self.with_layers(*skipped)

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "attention": self.attention,
            "default": self.default.to_dict(),
            "op_defaults": [d.to_dict() for d in self.op_defaults],
            "layers": [layer.to_dict() for layer in self.layers],
            **({"scored_for": self.scored_for} if self.scored_for else {}),
            **({"attention_scales": [list(s) for s in self.attention_scales]} if self.attention_scales else {}),
            **({"attention_kv_bits": self.attention_kv_bits} if self.attention_kv_bits != 8 else {}),
        }

    def to_json(self) -> str:
        """Deterministic JSON text (same plan, same bytes)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "plan") -> QuantPlan:
        """Build a plan from :meth:`to_dict` output; errors name ``source``."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION
            hint = "; it was written by a newer sq-pt2e: upgrade to read it" if newer else ""
            msg = f"{source}: schema_version={version!r} is not supported (this sq-pt2e reads {SCHEMA_VERSION}{hint})"
            raise PlanError(msg)
        unknown = sorted(set(data) - {"schema_version", "model", "attention", "default", "op_defaults", "layers",
                                   "scored_for", "attention_scales", "attention_kv_bits"})
        if unknown:
            raise PlanError(f"{source}: unknown top-level field(s) {unknown}")
        for key in ("op_defaults", "layers"):
            if not isinstance(data.get(key, []), list):
                raise PlanError(f"{source}: {key!r} must be a list, got {data.get(key)!r}")
        if not isinstance(data.get("model", ""), str):
            raise PlanError(f"{source}: 'model' must be text, got {data.get('model')!r}")
        try:
            return cls._from_fields(data, source, version)
        except PlanError as exc:
            raise exc if str(exc).startswith(source) else PlanError(f"{source}: {exc}") from exc

    @classmethod
    def _from_fields(cls, data: dict[str, Any], source: str, version: int) -> QuantPlan:
        return cls(
            default=LayerPlan.from_dict(data.get("default", {"name": DEFAULT_NAME}), where=source),
            op_defaults=tuple(LayerPlan.from_dict(d, where=source) for d in data.get("op_defaults", [])),
            layers=tuple(LayerPlan.from_dict(d, where=source) for d in data.get("layers", [])),
            model=str(data.get("model", "")),
            attention=data.get("attention", "float"),
            attention_scales=_attention_scales(data.get("attention_scales", [])),
            attention_kv_bits=data.get("attention_kv_bits", 8),
            scored_for=data.get("scored_for", ""),
            schema_version=version,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically; reconstructed weights go to :func:`refit_file` first."""
        if self.refits:
            from sq_pt2e.reconstruct import save_refits

            save_refits(refit_file(path), self.refits)
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> QuantPlan:
        """Read a plan written by :meth:`save` (or by hand)."""
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"cannot read plan {source}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise PlanError(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start}): not a plan") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source} is not valid JSON: {exc}") from exc
        plan = cls.from_dict(data, source=source)
        digests = plan.refit_digests()
        if not digests:
            return plan
        from sq_pt2e.reconstruct import load_refits

        return dataclasses.replace(plan, refits=load_refits(refit_file(path), digests, plan=source))


def refit_file(plan_path: str | os.PathLike[str]) -> Path:
    """Where the reconstructed weights of the plan saved at ``plan_path`` live: ``<stem>.refit.safetensors``."""
    path = Path(plan_path)
    return path.with_name(f"{path.stem}.refit.safetensors")


def w8a8_plan(model: str = "", *, skip: dict[str, str] | None = None) -> QuantPlan:
    """The plain W8A8 plan (max calibration everywhere), optionally keeping layers in float.

    Args:
        model: identity of the model the plan is for.
        skip: ``{layer name: reason}`` of layers to keep in float.
    """
    plan = QuantPlan(model=model)
    for name, reason in (skip or {}).items():
        plan = plan.with_skipped([name], reason)
    return plan


def _attention_scales(data: object) -> tuple[tuple[float, float, float], ...]:
    """``attention_scales`` from JSON: a list of ``[q, k, v]`` lists (checked by ``QuantPlan``)."""
    if not isinstance(data, list) or not all(isinstance(block, list) for block in data):
        raise PlanError(f"'attention_scales' must be a list of [q, k, v] scale lists, got {data!r}")
    return tuple(tuple(block) for block in data)  # type: ignore[misc]
