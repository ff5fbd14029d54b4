"""Operator annotators: mark conv1d / linear nodes with the quantization specs of their layer.

A registry in the shape of ExecuTorch's XNNPACK quantizer: each op kind maps to one
free function ``(gm, specs_for) -> list[list[Node]]`` that annotates the matching
nodes and returns the partitions it annotated. ``specs_for(node)`` returns the
``LayerQSpecs`` of the node's layer, or ``None`` when the node is not ours to
annotate (left to another quantizer). A skipped layer is marked annotated with no
quantization specs, so it stays float and no later annotator touches it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.observer import HistogramObserver
from torchao.quantization.pt2e.quantizer import (
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
)
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from sq_pt2e.errors import PlanError, QuantizationError
from sq_pt2e.graph import op_kind
from sq_pt2e.passes.sdpa_as_matmuls import attention_matmuls

__all__ = [
    "ANNOTATORS",
    "annotate_attention",
    "Annotator",
    "LayerQSpecs",
    "SUPPORTED_PATTERNS",
    "annotate_conv1d",
    "annotate_linear",
    "attention_grid_half_span",
    "is_annotated",
    "observed_attention_scales",
    "register_annotator",
]


@dataclass(frozen=True)
class LayerQSpecs:
    """Quantization specs of one layer's input activation, weight and (optionally) output.

    ``None`` input and weight specs mean the layer stays float. ``output`` is set for
    backends whose int8 kernels also produce int8 (XNNPACK); x86 oneDNN kernels take
    int8 in and give float out, so there it is ``None``.
    """

    input_act: QuantizationSpec | None
    weight: QuantizationSpec | None
    output: QuantizationSpec | None = None

    @property
    def skip(self) -> bool:
        return self.input_act is None and self.weight is None


SpecsFor = Callable[[Node], LayerQSpecs | None]
Annotator = Callable[[GraphModule, SpecsFor], list[list[Node]]]
ANNOTATORS: dict[str, Annotator] = {}
# Order matters: the first annotation of a node wins.
SUPPORTED_PATTERNS: tuple[str, ...] = ("conv1d", "grouped_conv1d", "linear")


def register_annotator(op: str) -> Callable[[Annotator], Annotator]:
    """Register ``fn`` as the annotator of op kind ``op``; a second registration is an error."""

    def decorator(fn: Annotator) -> Annotator:
        if op in ANNOTATORS:
            msg = f"annotator for {op!r} already registered by {ANNOTATORS[op].__qualname__}"
            raise ValueError(msg)
        ANNOTATORS[op] = fn
        return fn

    return decorator


def is_annotated(node: Node) -> bool:
    """Whether a quantizer has already claimed ``node``."""
    annotation = node.meta.get(Q_ANNOTATION_KEY)
    return annotation is not None and annotation._annotated


def _annotate_weighted(gm: GraphModule, specs_for: SpecsFor, kinds: tuple[str, ...]) -> list[list[Node]]:
    annotated: list[list[Node]] = []
    for node in gm.graph.nodes:
        if op_kind(node) not in kinds or is_annotated(node):
            continue
        specs = specs_for(node)
        if specs is None:
            continue
        input_node, weight_node = node.args[0], node.args[1]
        input_qspec_map, output_qspec = {}, None
        if not specs.skip:
            input_qspec_map = {input_node: specs.input_act, weight_node: specs.weight}
            output_qspec = specs.output
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map=input_qspec_map, output_qspec=output_qspec, _annotated=True
        )
        annotated.append([node])
    return annotated


@register_annotator("conv1d")
def annotate_conv1d(gm: GraphModule, specs_for: SpecsFor) -> list[list[Node]]:
    """Annotate dense ``aten.conv1d`` (the CNN feature encoder): input and weight; float output."""
    return _annotate_weighted(gm, specs_for, ("conv1d",))


@register_annotator("grouped_conv1d")
def annotate_grouped_conv1d(gm: GraphModule, specs_for: SpecsFor) -> list[list[Node]]:
    """Annotate grouped ``aten.conv1d`` (the positional convolution)."""
    return _annotate_weighted(gm, specs_for, ("grouped_conv1d",))


@register_annotator("linear")
def annotate_linear(gm: GraphModule, specs_for: SpecsFor) -> list[list[Node]]:
    """Annotate ``aten.linear``: input and weight; float output."""
    return _annotate_weighted(gm, specs_for, ("linear",))


# The int8 attention kernels take uint8 q, k, v and probabilities on the 0..255 grid.
# q, k and v are symmetric (zero point 128, signed int8 once shifted): their products then
# need no zero-point sums (passes/attention_as_int_mm.py). k and v, the GEMMs' second
# operands, may be narrowed to 7 bits, which CPUs without VNNI multiply exactly: then they
# are int8 on -63..63 (zero point 0; an observer's range must hold 0, so not uint8 65..191).
# Probabilities lie in [0, 1]: a fixed 1/255 step with zero point 0 covers them exactly,
# where a calibrated range would clip rare peaks.
_ATTENTION_PROBABILITIES = FixedQParamsQuantizationSpec(
    dtype=torch.uint8, scale=1.0 / 255, zero_point=0, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
)


def _operand_grid(bits: int) -> tuple[torch.dtype, int, int, int]:
    """``(dtype, zero point, quant_min, quant_max)`` of a symmetric attention operand of ``bits`` bits."""
    if bits == 8:
        return torch.uint8, 128, 0, 255
    half = 2 ** (bits - 1) - 1
    return torch.int8, 0, -half, half


def attention_grid_half_span(bits: int) -> float:
    """Steps from the zero point to either end of a ``bits``-bit attention operand's grid
    (127.5 on the uint8 grid, 63 on 7 bits): a symmetric observer's scale is the range over it."""
    _, _, low, high = _operand_grid(bits)
    return (high - low) / 2


def _observed_operand(bits: int) -> QuantizationSpec:
    """An attention operand's spec, its scale calibrated (histogram observer, symmetric)."""
    dtype, _, low, high = _operand_grid(bits)
    # the full uint8 grid goes without quant_min/max: given them, the observer's zero point is 127, not 128
    grid = {} if bits == 8 else {"quant_min": low, "quant_max": high}
    observer = HistogramObserver.with_args(eps=2**-12, **grid)
    return QuantizationSpec(dtype=dtype, qscheme=torch.per_tensor_symmetric, observer_or_fake_quant_ctr=observer,
                            **grid)


def _fixed_operand(scale: float, bits: int) -> FixedQParamsQuantizationSpec:
    """An attention operand's spec with a fixed scale (``QuantPlan.attention_scales``)."""
    dtype, zero, low, high = _operand_grid(bits)
    return FixedQParamsQuantizationSpec(dtype=dtype, scale=float(scale), zero_point=zero, quant_min=low,
                                        quant_max=high, qscheme=torch.per_tensor_affine)


def annotate_attention(gm: GraphModule, scales: Sequence[tuple[float, float, float]] = (),
                       kv_bits: int = 8) -> list[list[Node]]:
    """Annotate the two matmuls of each attention block for x86 int8 attention.

    ``q @ k^T``: both operands calibrated (histogram observer, symmetric); ``probs @ v``: the
    probabilities on a fixed 1/255 grid, ``v`` calibrated. With ``scales`` (one ``(q, k, v)``
    per block, in graph order) q, k and v get those fixed scales instead. ``k`` and ``v`` lie
    on ``kv_bits``-bit grids (``QuantPlan.attention_kv_bits``). The outputs stay float; the
    output projection's input quantization follows.

    Raises:
        PlanError: ``scales`` given for another number of attention blocks than the graph has.
    """
    blocks = [pair for pair in attention_matmuls(gm) if not (is_annotated(pair[0]) or is_annotated(pair[1]))]
    if scales and len(scales) != len(blocks):
        raise PlanError(f"the plan fixes the scales of {len(scales)} attention blocks (attention_scales), but the "
                        f"graph has {len(blocks)}: were they pinned on another model?")
    annotated: list[list[Node]] = []
    for index, (scores, context) in enumerate(blocks):
        if scales:
            q_scale, k_scale, v_scale = scales[index]
            q, k, v = _fixed_operand(q_scale, 8), _fixed_operand(k_scale, kv_bits), _fixed_operand(v_scale, kv_bits)
        else:
            q, k, v = _observed_operand(8), _observed_operand(kv_bits), _observed_operand(kv_bits)
        scores.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map={scores.args[0]: q, scores.args[1]: k}, _annotated=True)
        context.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map={context.args[0]: _ATTENTION_PROBABILITIES, context.args[1]: v}, _annotated=True)
        annotated.append([scores, context])
    return annotated


def observed_attention_scales(prepared: GraphModule) -> tuple[tuple[float, float, float], ...]:
    """The ``(q, k, v)`` scales the observers of a calibrated ``prepare_pt2e`` graph give each attention block."""
    scales = []
    for scores, context in attention_matmuls(prepared):
        operands = (scores.args[0], scores.args[1], context.args[1])
        observers = [getattr(prepared, node.target) for node in operands if node.op == "call_module"]
        if len(observers) != 3:
            raise QuantizationError(f"attention block of {scores.name} has no observers on q, k and v: was the "
                                    "graph prepared with a plan whose attention='int8'?")
        scales.append(tuple(float(observer.calculate_qparams()[0]) for observer in observers))
    if not scales:
        raise QuantizationError("the prepared graph has no attention blocks to read int8 attention scales from")
    return tuple(scales)  # type: ignore[return-value]
