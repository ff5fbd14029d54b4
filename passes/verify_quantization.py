"""Inspect a converted (``convert_pt2e``) graph: which layers really run on int8 data.

A conv1d/linear whose input and weight both come from ``dequantize_*`` ops is an
int8 layer (a backend fuses ``dq -> op`` into an int8 kernel); any other is a float
layer. Counting q/dq ops and listing float layers catches a quantized path that
would silently run in float.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.errors import Int8NotUsedError
from sq_pt2e.graph import find_quantizable_layers

__all__ = ["QuantizedGraphSummary", "summarize_quantized_graph", "require_int8_layers"]

_DEQUANTIZE = {
    torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    torch.ops.quantized_decomposed.dequantize_per_tensor.tensor,
    torch.ops.quantized_decomposed.dequantize_per_channel.default,
}


@dataclass(frozen=True)
class QuantizedGraphSummary:
    """Int8 and float layers of a converted graph, and its q/dq op counts."""

    int8_layers: tuple[str, ...]
    float_layers: tuple[str, ...]
    op_counts: dict[str, int]


def _is_dequantized(node: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in _DEQUANTIZE


def summarize_quantized_graph(gm: GraphModule) -> QuantizedGraphSummary:
    """Classify every conv1d/linear of ``gm`` as int8 or float; count q/dq ops."""
    int8, floating = [], []
    for layer in find_quantizable_layers(gm):
        input_node, weight_node = layer.node.args[0], layer.node.args[1]
        (int8 if _is_dequantized(input_node) and _is_dequantized(weight_node) else floating).append(layer.name)
    counts = Counter(
        str(node.target) for node in gm.graph.nodes if node.op == "call_function" and "quantize" in str(node.target)
    )
    return QuantizedGraphSummary(tuple(int8), tuple(floating), dict(sorted(counts.items())))


def require_int8_layers(gm: GraphModule, expected: list[str] | tuple[str, ...]) -> QuantizedGraphSummary:
    """Raise ``Int8NotUsedError`` if a layer in ``expected`` is not int8 in ``gm``."""
    summary = summarize_quantized_graph(gm)
    missing = sorted(set(expected) - set(summary.int8_layers))
    if missing:
        msg = f"{len(missing)} layer(s) planned as int8 run in float after convert_pt2e: {missing[:5]}"
        raise Int8NotUsedError(msg)
    return summary
