"""Round each int8 layer's float bias to the int32 grid that XNNPACK adds it on.

XNNPACK adds a quantized convolution's or Linear's bias inside its int32 accumulator, so
ExecuTorch rounds the bias to the grid of input scale x weight scale when it lowers the layer
(``QuantParams.from_bias``). The eager ``convert_pt2e`` graph adds the float bias before
rounding the output to int8. The difference is below a hundredth of an output step, but it
moves outputs that sit on a rounding boundary by one step, and a layer norm over channels that
hardly vary (the feature projection's, in near-silent frames) magnifies those steps: the eager
graph was then not a bit-exact reference for the ``.pte``. Run on the ``xnnpack`` target's
converted graph, this pass makes the eager graph add what the ``.pte`` adds; the ``.pte`` is
unchanged (its lowering rounds a snapped bias to the same integers).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from sq_pt2e.graph import find_quantizable_layers
from sq_pt2e.passes.rewrite_utils import add_constant, drop_unused_attributes, get_constant

__all__ = ["int32_bias_grid", "snap_biases_to_int32_grid", "snap_to_int32_grid"]

_INT32 = torch.iinfo(torch.int32)
_DQ = torch.ops.quantized_decomposed
_WEIGHT_DQ = (_DQ.dequantize_per_tensor.default, _DQ.dequantize_per_channel.default)


def int32_bias_grid(input_scale: float, weight_scales: torch.Tensor | float) -> torch.Tensor:
    """The step of a layer's int32 bias grid per output channel: input scale x weight scale(s)."""
    return torch.as_tensor(weight_scales, dtype=torch.float32).reshape(-1) * float(input_scale)


def snap_to_int32_grid(bias: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``bias`` rounded to the int32 grid ``step`` (per channel, or one step), as ExecuTorch rounds it."""
    step = step.to(torch.float32).expand(bias.shape[0]).contiguous()
    zero = torch.zeros_like(step, dtype=torch.int32)
    quantized = _DQ.quantize_per_channel(bias.detach().float(), step, zero, 0, _INT32.min, _INT32.max, torch.int32)
    return _DQ.dequantize_per_channel(quantized, step, zero, 0, _INT32.min, _INT32.max, torch.int32).to(bias.dtype)


def _scale(graph_module: GraphModule, value: object) -> torch.Tensor | float:
    """A dequantize node's scale: a number, or the tensor its ``get_attr`` names."""
    return get_constant(graph_module, str(value.target)) if isinstance(value, Node) else float(value)


def _int8_layer_step(graph_module: GraphModule, layer: Node) -> torch.Tensor | None:
    """The int32 bias grid of ``layer`` if it reads a per-tensor int8 input and an int8 weight (else None)."""
    x, weight = layer.args[0], layer.args[1]
    if not (isinstance(x, Node) and x.target == _DQ.dequantize_per_tensor.default
            and isinstance(weight, Node) and weight.target in _WEIGHT_DQ):
        return None
    return int32_bias_grid(_scale(graph_module, x.args[1]), _scale(graph_module, weight.args[1]))


def snap_biases_to_int32_grid(graph_module: GraphModule) -> list[str]:
    """Round the float bias of every int8 conv / Linear of a converted graph to XNNPACK's int32 grid.

    Each snapped bias becomes a new buffer of ``graph_module``; the float bias it replaces is
    dropped from it (the float model's parameters stay as they are).

    Returns:
        The names of the layer nodes whose bias was snapped.
    """
    snapped, replaced = [], []
    graph = graph_module.graph
    for layer in find_quantizable_layers(graph_module):
        node = layer.node
        bias = node.args[2] if len(node.args) > 2 else None
        step = _int8_layer_step(graph_module, node)
        if not (isinstance(bias, Node) and bias.op == "get_attr") or step is None:
            continue
        value = snap_to_int32_grid(get_constant(graph_module, str(bias.target)), step)
        with graph.inserting_before(node):
            node.replace_input_with(bias, graph.get_attr(add_constant(graph_module, f"{node.name}_bias_int32", value)))
        if not bias.users:
            graph.erase_node(bias)
            replaced.append(str(bias.target))
        snapped.append(node.name)
    drop_unused_attributes(graph_module, replaced)
    graph.lint()
    graph_module.recompile()
    return snapped
