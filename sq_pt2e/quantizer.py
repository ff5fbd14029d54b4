"""``StableQuantQuantizer``: a torchao PT2E ``Quantizer`` driven by a ``QuantPlan``.

This is the only place where a plan becomes ``QuantizationSpec``s. Scheme: weights
signed symmetric per output channel; input activations per tensor, symmetric or
affine (``LayerPlan.act_scheme``); ``weight_bits`` / ``act_bits`` narrow
``quant_min``/``quant_max`` so the same int8 kernels run lower bit widths.

Example:
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    >>> quantizer = StableQuantQuantizer(plan)
    >>> prepared = prepare_pt2e(torch.export.export(model, (wave,)).module(), quantizer)
    >>> prepared(wave)  # calibrate
    >>> int8_model = convert_pt2e(prepared)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.observer import HistogramObserver, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationSpec, Quantizer
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY, EdgeOrNode

from sq_pt2e.annotators import ANNOTATORS, SUPPORTED_PATTERNS, LayerQSpecs, annotate_attention, is_annotated
from sq_pt2e.errors import QuantizationError
from sq_pt2e.graph import GELU_FLOOR, QuantizableLayer, feeds_only_gelu, find_quantizable_layers, layer_name
from sq_pt2e.observers import (
    AbsHistogramObserver,
    FlooredHistogramObserver,
    PerChannelMseWeightObserver,
    grid_bounds,
    outlier_floor,
)
from sq_pt2e.plan import LayerPlan, QuantPlan, Target

if TYPE_CHECKING:
    from sq_pt2e.stablequant import SearchConfig, SearchReport

__all__ = ["LayerStatus", "StableQuantQuantizer", "Target", "act_qspec", "output_qspec", "weight_qspec"]


# Storage of the activation grid's 2q + 1 levels: oneDNN's x86 int8 kernels take uint8
# inputs {0..2q} (symmetric: zero point q), XNNPACK takes int8 {-q..q} (symmetric: zero
# point 0); affine grids shift the zero point. The same input grid either way
# (observers.act_qparams), so one plan runs on both backends; XNNPACK also rounds each int8
# layer's output to int8 (output_qspec), which a search can score (SearchConfig.target).
_ACT_DTYPE: dict[str, torch.dtype] = {"x86_inductor": torch.uint8, "xnnpack": torch.int8}


@functools.lru_cache(maxsize=None)
def act_qspec(
    bits: int, method: str, percentile: float | None, fixed_range: float | None, target: Target = "x86_inductor",
    scheme: str = "symmetric", fixed_floor: float | None = None,
) -> QuantizationSpec:
    """Per-tensor activation spec (symmetric or affine); equal arguments give the same object."""
    top = 2 ** (bits - 1) - 1
    dtype = _ACT_DTYPE[target]
    offset = top if dtype == torch.uint8 else 0
    return QuantizationSpec(
        dtype=dtype,
        quant_min=offset - top,
        quant_max=offset + top,
        qscheme=torch.per_tensor_affine if scheme == "affine" else torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=AbsHistogramObserver.with_args(
            method=method, percentile=percentile, fixed_range=fixed_range, fixed_floor=fixed_floor
        ),
    )


@functools.lru_cache(maxsize=None)
def weight_qspec(bits: int, calibration: str = "max") -> QuantizationSpec:
    """Per-output-channel symmetric signed weight spec (axis 0 for conv1d and linear)."""
    top = 2 ** (bits - 1) - 1
    observer = PerChannelMseWeightObserver if calibration == "mse" else PerChannelMinMaxObserver
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-top,
        quant_max=top,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        observer_or_fake_quant_ctr=observer.with_args(eps=2**-12),
    )


@functools.lru_cache(maxsize=None)
def output_qspec(floor: float | None = None) -> QuantizationSpec:
    """Per-tensor affine int8 output spec (XNNPACK's int8 kernels also emit int8); with ``floor``
    the grid covers only values above it (:class:`~sq_pt2e.observers.FlooredHistogramObserver`)."""
    observer = (HistogramObserver.with_args(eps=2**-12) if floor is None
                else FlooredHistogramObserver.with_args(floor=floor, eps=2**-12))
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=observer,
    )


def _specs_from_plan(layer: LayerPlan, target: Target, output_floor: float | None = None) -> LayerQSpecs:
    """The layer's specs; ``output_floor``: the lowest output value that matters (xnnpack)."""
    if layer.skip:
        return LayerQSpecs(None, None)
    return LayerQSpecs(
        act_qspec(layer.act_bits, layer.calibration, layer.clip_percentile, layer.act_range, target,
                  layer.act_scheme, layer.act_floor),
        weight_qspec(layer.weight_bits, layer.weight_calibration),
        output_qspec(output_floor) if target == "xnnpack" else None,
    )


def _plan_layers(model: GraphModule) -> list[QuantizableLayer]:
    """The graph's conv / linear layers a plan names: all but the outlier layers of split ones."""
    from sq_pt2e.passes.split_outliers import outlier_owner

    return [layer for layer in find_quantizable_layers(model) if outlier_owner(layer.node) is None]


def _outlier_plan(layer: LayerPlan) -> LayerPlan:
    """The plan of a split layer's outlier layer: its grid ``[0 or -r, r]``, ``r = outlier_range``."""
    from sq_pt2e.passes.split_outliers import OUTLIER_SUFFIX

    return dataclasses.replace(layer, name=layer.name + OUTLIER_SUFFIX, calibration="max", clip_percentile=None,
                               act_range=layer.outlier_range, act_floor=outlier_floor(layer.act_scheme == "affine"),
                               outlier_range=None, input_scale=None, refit=None)


@dataclass(frozen=True)
class LayerStatus:
    """What the quantizer did with one layer (for reports): quantized, float, or foreign."""

    name: str
    op: str
    status: str  # "int8" | "float" | "not-ours"
    weight_bits: int | None
    act_bits: int | None
    reason: str


class StableQuantQuantizer(Quantizer):
    """Annotates conv1d / linear layers of an exported speech model from a ``QuantPlan``.

    Args:
        plan: per-layer decisions; ``QuantPlan()`` (the default) is W8A8 with max
            calibration for every conv1d / linear layer.
        module_filter: optional ``name -> bool``; layers for which it returns False are
            left unannotated, for another quantizer (e.g. in ``ComposableQuantizer``).
        target: ``"x86_inductor"`` (uint8 activation storage for oneDNN) or ``"xnnpack"``
            (int8 storage for ExecuTorch); the input grid is the same. XNNPACK's int8
            kernels also emit int8, so for it layer outputs get an int8 observer too (one that
            ignores values below ``graph.GELU_FLOOR`` for outputs that feed only a GELU, and for
            both outputs of a split layer whose sum does). XNNPACK adds biases rounded to an
            int32 grid; to make the eager ``convert_pt2e`` graph compute what the ``.pte`` does,
            run ``passes.snap_bias_to_int32_grid.snap_biases_to_int32_grid`` on it
            (``pipeline.quantize_model`` does).

    Raises:
        PlanError: (in ``annotate``) the plan names a layer the graph does not have.
        QuantizationError: (in ``validate``) a planned layer was not annotated.
    """

    def __init__(
        self,
        plan: QuantPlan | None = None,
        *,
        module_filter: Callable[[str], bool] | None = None,
        target: Target = "x86_inductor",
    ) -> None:
        super().__init__()
        if target not in _ACT_DTYPE:
            msg = f"target={target!r} (expected one of {sorted(_ACT_DTYPE)})"
            raise QuantizationError(msg)
        self.target = target
        self.plan = plan if plan is not None else QuantPlan()
        if self.plan.attention == "int8" and target != "x86_inductor":
            raise QuantizationError(f"the plan's attention='int8' is for the x86_inductor target (inductor's int8 "
                                    f"attention kernel), not {target!r}: set attention='float'")
        self.module_filter = module_filter
        self.layer_status: tuple[LayerStatus, ...] = ()
        self.search_report: SearchReport | None = None

    @classmethod
    def search(
        cls,
        model: torch.nn.Module,
        calibration: Sequence[torch.Tensor],
        dev: Sequence[torch.Tensor],
        references: Sequence[str] | None = None,
        *,
        config: SearchConfig | None = None,
        target: Target = "x86_inductor",
        model_name: str = "",
    ) -> StableQuantQuantizer:
        """Run the StableQuant search on ``model`` and return a quantizer with the plan it found.

        Calibrates once on ``calibration``, scores candidates on ``dev`` (WER against
        ``references``, else logit KL against float) and keeps the search report in
        ``quantizer.search_report``. Save the plan with ``quantizer.plan.save(path)``.

        Args:
            model: the float model (a ``*ForCTC`` model or waveform -> logits module).
            calibration: ``(1, samples)`` normalised waveforms for the activation histograms.
            dev: ``(1, samples)`` waveforms the candidates are scored on.
            references: transcripts of ``dev`` (``None``: search on logit KL).
            config: search settings (default ``SearchConfig()``: logit-KL criterion, smoothing).
            target: backend of the returned quantizer, and the one candidates are scored for
                (``SearchConfig.target``).
            model_name: recorded in the plan.

        Example:
            >>> quantizer = StableQuantQuantizer.search(model, calib_waves, dev_waves, dev_texts)
            >>> prepared = prepare_pt2e(export_speech_model(model, wave).module(), quantizer)
        """
        from sq_pt2e.stablequant import Evaluator, SearchConfig, run_search

        config = dataclasses.replace(config or SearchConfig(), target=target)
        plan, report, _ = run_search(model, calibration, Evaluator(model, dev, references), config,
                                     model_name=model_name)
        quantizer = cls(plan, target=target)
        quantizer.search_report = report
        return quantizer

    def _plan_for(self, layer: QuantizableLayer) -> LayerPlan | None:
        if self.module_filter is not None and not self.module_filter(layer.name):
            return None
        return self.plan.resolve(layer.name, layer.op)

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Swap in the plan's reconstructed weights (``LayerPlan.refit``), then apply its per-channel
        input scales (``LayerPlan.input_scale``) and outlier splits (``LayerPlan.outlier_range``) to
        the graph; with int8 attention, write scaled-dot-product attention as matmuls that can be
        quantized."""
        from sq_pt2e.passes.sdpa_as_matmuls import SdpaAsMatmulsPass
        from sq_pt2e.passes.split_outliers import split_outliers
        from sq_pt2e.reconstruct import apply_refit_weights
        from sq_pt2e.smoothing import apply_input_scales

        def ours(per_layer: dict[str, object]) -> dict[str, object]:
            return {n: v for n, v in per_layer.items() if self.module_filter is None or self.module_filter(n)}

        splits = {name: grid_bounds(layer.act_range, layer.act_bits, layer.act_floor)
                  for name, layer in self.plan.outlier_layers().items()}
        model = apply_refit_weights(model, ours(self.plan.refit_weights()))
        model = apply_input_scales(model, ours(self.plan.input_scales()))
        model = split_outliers(model, ours(splits))
        if self.plan.attention == "int8":
            SdpaAsMatmulsPass()(model)
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        """Annotate every planned layer (and the outlier layers of split ones); skipped layers are
        claimed and kept float."""
        from sq_pt2e.passes.split_outliers import outlier_owner, split_sum

        layers = _plan_layers(model)
        self.plan.check_names([layer.name for layer in layers])
        by_node = {layer.node: layer for layer in layers}
        by_name = {layer.name: layer for layer in layers}

        def specs_for(node: Node) -> LayerQSpecs | None:
            owner = outlier_owner(node)
            layer_plan = self._plan_for(by_node[node] if owner is None else by_name[owner])
            if layer_plan is not None and owner is not None:
                layer_plan = _outlier_plan(layer_plan)
            floor = GELU_FLOOR if feeds_only_gelu(split_sum(node)) else None
            return None if layer_plan is None else _specs_from_plan(layer_plan, self.target, floor)

        for pattern in SUPPORTED_PATTERNS:
            ANNOTATORS[pattern](model, specs_for)
        plan = self.plan
        if plan.attention == "int8" and not annotate_attention(model, plan.attention_scales, plan.attention_kv_bits):
            raise QuantizationError("the plan asks for int8 attention but the graph has no attention "
                                    "(scaled-dot-product or matmul-softmax-matmul) without dropout")
        self.layer_status = tuple(self._status(layer) for layer in layers)
        return model

    def _status(self, layer: QuantizableLayer) -> LayerStatus:
        layer_plan = self._plan_for(layer)
        if layer_plan is None:
            return LayerStatus(layer.name, layer.op, "not-ours", None, None, "excluded by module_filter")
        if layer_plan.skip:
            return LayerStatus(layer.name, layer.op, "float", None, None, layer_plan.reason)
        return LayerStatus(
            layer.name, layer.op, "int8", layer_plan.weight_bits, layer_plan.act_bits, layer_plan.reason
        )

    def validate(self, model: GraphModule) -> None:
        """Fail if a planned layer is unannotated or a quantized layer lacks its specs."""
        for layer in _plan_layers(model):
            layer_plan = self._plan_for(layer)
            if layer_plan is None:
                continue
            if not is_annotated(layer.node):
                msg = f"layer {layer.name!r} ({layer.op}) is in the plan but was not annotated"
                raise QuantizationError(msg)
            annotation = layer.node.meta[Q_ANNOTATION_KEY]
            if not layer_plan.skip and len(annotation.input_qspec_map) != 2:
                msg = (
                    f"layer {layer.name!r} ({layer.op}) should be quantized but its annotation has "
                    f"{len(annotation.input_qspec_map)} input specs (expected input and weight): "
                    "another quantizer may have claimed it first"
                )
                raise QuantizationError(msg)

    def prepare_obs_or_fq_callback(
        self, model: GraphModule, edge_or_node_to_obs_or_fq: dict[EdgeOrNode, torch.nn.Module]
    ) -> None:
        """Tell each activation observer which layer(s) it feeds, for error messages."""
        names: dict[int, list[str]] = {}
        for key, observer in edge_or_node_to_obs_or_fq.items():
            if isinstance(observer, AbsHistogramObserver) and isinstance(key, tuple):
                names.setdefault(id(observer), []).append(layer_name(key[1]))
        for observer in edge_or_node_to_obs_or_fq.values():
            if isinstance(observer, AbsHistogramObserver):
                observer.layer = ", ".join(sorted(set(names.get(id(observer), []))))

    def float_layers(self) -> tuple[LayerStatus, ...]:
        """Layers left in float (skipped by the plan), with the reason, after ``annotate``."""
        return tuple(s for s in self.layer_status if s.status == "float")
