"""Test helpers shipped with the library (as torchao ships ``torchao/testing/pt2e/utils.py``).

``assert_qdq_graph`` checks the count, and optionally the order, of ops in a
``GraphModule`` (torchao's ``node_occurrence`` / ``expected_node_list``).
``tiny_quantized_model`` runs the whole PT2E flow on a tiny seeded model.
Importing this module loads neither inductor nor ExecuTorch.

Example:
    >>> from sq_pt2e.testing import Q_PER_TENSOR, DQ_PER_CHANNEL, assert_qdq_graph, tiny_quantized_model
    >>> tiny = tiny_quantized_model("tiny-wav2vec2")
    >>> assert_qdq_graph(tiny.quantized.converted, {DQ_PER_CHANNEL: 22})
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch._ops import OpOverload, OpOverloadPacket
from torch.fx import GraphModule, Node
from transformers import PreTrainedModel

from sq_pt2e.models import build_model
from sq_pt2e.pipeline import QuantizedModel, quantize_model
from sq_pt2e.plan import QuantPlan
from sq_pt2e.quantizer import Target

__all__ = [
    "DQ_PER_CHANNEL",
    "DQ_PER_TENSOR",
    "Op",
    "Q_PER_TENSOR",
    "TinyQuantized",
    "assert_qdq_graph",
    "channel_outlier_model",
    "compiled_plan_report",
    "count_ops",
    "example_waves",
    "ops_in_order",
    "tiny_quantized_model",
]

Op = Union[OpOverload, OpOverloadPacket]

Q_PER_TENSOR = torch.ops.quantized_decomposed.quantize_per_tensor.default
DQ_PER_TENSOR = torch.ops.quantized_decomposed.dequantize_per_tensor.default
DQ_PER_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default


def _matches(node: Node, op: Op) -> bool:
    if node.op != "call_function":
        return False
    if isinstance(op, OpOverloadPacket):
        return getattr(node.target, "overloadpacket", None) is op
    return node.target == op


def count_ops(gm: GraphModule, op: Op) -> int:
    """How many ``call_function`` nodes of ``gm`` call ``op`` (a packet counts every overload)."""
    return sum(1 for node in gm.graph.nodes if _matches(node, op))


def ops_in_order(gm: GraphModule, ops: Sequence[Op]) -> list[Op]:
    """The ops of ``gm`` that are among ``ops``, in graph order."""
    found = []
    for node in gm.graph.nodes:
        for op in ops:
            if _matches(node, op):
                found.append(op)
                break
    return found


def assert_qdq_graph(gm: GraphModule, occurrence: dict[Op, int], order: Sequence[Op] | None = None) -> None:
    """Assert op counts (and optionally order) in a graph, like torchao's ``node_occurrence``.

    Args:
        gm: the graph module to inspect (e.g. the output of ``convert_pt2e``).
        occurrence: ``{op: expected count}``; an ``OpOverloadPacket`` counts all overloads.
        order: ops that must appear in this order as a subsequence of the graph's calls
            (other nodes may sit between them).

    Raises:
        AssertionError: listing every op whose count differs, or where the order breaks.
    """
    wrong = {str(op): (expected, count_ops(gm, op)) for op, expected in occurrence.items()}
    wrong = {op: pair for op, pair in wrong.items() if pair[0] != pair[1]}
    if wrong:
        lines = ", ".join(f"{op}: expected {e}, found {f}" for op, (e, f) in sorted(wrong.items()))
        raise AssertionError(f"op counts differ: {lines}")
    if order is None:
        return
    wanted = list(order)
    position = 0
    for node in gm.graph.nodes:
        if position < len(wanted) and _matches(node, wanted[position]):
            position += 1
    if position < len(wanted):
        seen = [str(op) for op in ops_in_order(gm, list(dict.fromkeys(wanted)))]
        msg = (
            f"op order: matched {position} of {len(wanted)} ops; {wanted[position]} (index {position}) "
            f"not found after them; graph order of these ops: {seen[:20]}"
        )
        raise AssertionError(msg)


def example_waves(seed: int, count: int, samples: int = 4000) -> list[torch.Tensor]:
    """``count`` seeded ``(1, samples)`` Gaussian waveforms."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, samples, generator=generator) for _ in range(count)]


@dataclass
class TinyQuantized:
    """A tiny float model, the waveform it was exported for and its quantized graph."""

    float_model: PreTrainedModel
    example: torch.Tensor
    quantized: QuantizedModel

    def float_logits(self, wave: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.float_model(self.example if wave is None else wave).logits

    def int8_logits(self, wave: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.quantized.converted(self.example if wave is None else wave)


def channel_outlier_model(seed: int = 0) -> PreTrainedModel:
    """tiny-wav2vec2 whose CNN conv 2 sees one input channel (3) 40x larger than the others, and uses it.

    The float model computes about the same function as before (conv 1's output channel is
    scaled up, conv 2's weights for it down): a per-tensor int8 grid must cover that channel.
    """
    model = build_model("tiny-wav2vec2", seed=seed)
    modules = dict(model.named_modules())
    conv1, conv2 = (modules[f"wav2vec2.feature_extractor.conv_layers.{i}.conv"] for i in (1, 2))
    with torch.no_grad():
        conv1.weight[3] *= 40.0  # GELU(40 y) ~ 40 GELU(y) for the positive part
        conv2.weight[:, 3] /= 40.0
    return model


def compiled_plan_report(plan_for: Callable[[PreTrainedModel, list[torch.Tensor]], QuantPlan],
                         name: str = "tiny-wav2vec2", samples: int = 4000) -> tuple[PreTrainedModel, Any]:
    """Quantize a seeded tiny model with ``plan_for(model, calibration)`` (fitted to this CPU),
    compile it with inductor on one thread, and return the model and the ``InductorReport``
    (int8 kernel count, compiled vs eager int8 cosine). Imports inductor when called."""
    from sq_pt2e.backends.inductor import compile_inductor

    model = build_model(name, seed=0)
    calibration, (wave,) = example_waves(2, 2, samples), example_waves(1, 1, samples)
    converted = quantize_model(model, wave, calibration, plan=plan_for(model, calibration), fit_to_cpu=True).converted
    return model, compile_inductor(converted, wave, threads=1).report


def tiny_quantized_model(
    name: str = "tiny-wav2vec2",
    plan: QuantPlan | None = None,
    target: Target = "x86_inductor",
    *,
    seed: int = 0,
    samples: int = 4000,
    calibration_count: int = 2,
    fit_to_cpu: bool = False,
) -> TinyQuantized:
    """Build a seeded tiny model and quantize it end to end (export at ``samples``).

    ``fit_to_cpu`` defaults to False so graphs do not depend on the test machine's CPU.
    """
    model = build_model(name, seed=seed)
    (example,) = example_waves(seed + 1, 1, samples)
    calibration = example_waves(seed + 2, calibration_count, samples)
    quantized = quantize_model(model, example, calibration, plan=plan, target=target, fit_to_cpu=fit_to_cpu)
    return TinyQuantized(model, example, quantized)
