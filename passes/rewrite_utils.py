"""What the graph passes share: constants as buffers, node replacement, the node-rewrite pass."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["DEQUANTIZE_PER_TENSOR", "NodeRewritePass", "QUANTIZE_PER_TENSOR", "QuantizedConv1d", "Rewrite",
           "add_constant", "conv1d_arguments", "drop_unused_attributes", "frame_major_weight", "get_constant",
           "match_dense_quantized_conv1d", "match_quantized_conv1d", "replace_node", "reshape_sizes",
           "sdpa_arguments"]

_KEPT_META = ("nn_module_stack", "stack_trace")
QUANTIZE_PER_TENSOR = (
    torch.ops.quantized_decomposed.quantize_per_tensor.default,
    torch.ops.quantized_decomposed.quantize_per_tensor.tensor,
)
DEQUANTIZE_PER_TENSOR = (
    torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    torch.ops.quantized_decomposed.dequantize_per_tensor.tensor,
)
_DQ_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)
# aten.conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
_CONV1D_DEFAULTS: tuple[object, ...] = (None, None, None, [1], [0], [1], 1)


@dataclass(frozen=True)
class QuantizedConv1d:
    """A ``dq(x) -> conv1d(dq(w_int8 constant))`` match in a converted graph."""

    x_dq: Node
    w_dq: Node
    w_int: Node
    bias: Node | None
    stride: int
    padding: int
    dilation: int
    groups: int


def _single(value: object) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)  # type: ignore[index,arg-type]


def match_quantized_conv1d(node: Node) -> QuantizedConv1d | None:
    """The parts of an int8 conv1d at ``node`` (input and weight dequantized, weight constant)."""
    if node.op != "call_function" or node.target != torch.ops.aten.conv1d.default:
        return None
    x_dq, w_dq = node.args[0], node.args[1]
    if not (isinstance(x_dq, Node) and x_dq.op == "call_function" and x_dq.target in DEQUANTIZE_PER_TENSOR):
        return None
    if not (isinstance(w_dq, Node) and w_dq.op == "call_function" and w_dq.target == _DQ_CHANNEL):
        return None
    w_int = w_dq.args[0]
    if not isinstance(w_int, Node) or w_int.op != "get_attr":
        return None
    return QuantizedConv1d(x_dq, w_dq, w_int, *conv1d_arguments(node))


def match_dense_quantized_conv1d(node: Node) -> QuantizedConv1d | None:
    """An int8 conv1d at ``node`` that is one GEMM per output frame: groups 1, no padding, no dilation."""
    conv = match_quantized_conv1d(node)
    return conv if conv is not None and (conv.groups, conv.padding, conv.dilation) == (1, 0, 1) else None


def frame_major_weight(graph_module: GraphModule, conv: QuantizedConv1d) -> torch.Tensor:
    """The conv's int8 weight ``(C_out, C, K)`` as a GEMM weight ``(C_out, K*C)`` for time-major windows."""
    weight = get_constant(graph_module, str(conv.w_int.target))
    out_channels, channels, kernel = weight.shape
    return weight.permute(0, 2, 1).reshape(out_channels, kernel * channels).contiguous()


def sdpa_arguments(node: Node) -> dict[str, object]:
    """The arguments of an ``aten.scaled_dot_product_attention`` node by name, defaults filled in."""
    values = dict(zip(_SDPA_ARGS, _SDPA_DEFAULTS, strict=True))
    values.update(zip(_SDPA_ARGS, node.args, strict=False))
    values.update(node.kwargs)
    return values


def conv1d_arguments(node: Node) -> tuple[Node | None, int, int, int, int]:
    """``(bias, stride, padding, dilation, groups)`` of an ``aten.conv1d`` node, defaults filled in."""
    args = tuple(node.args) + _CONV1D_DEFAULTS[len(node.args) :]
    return args[2], _single(args[3]), _single(args[4]), _single(args[5]), int(args[6])


def get_constant(graph_module: GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` target names (dotted paths into submodules included)."""
    value = operator.attrgetter(target)(graph_module)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"get_attr target {target!r} is a {type(value).__name__}, not a tensor")
    return value


def add_constant(graph_module: GraphModule, prefix: str, value: torch.Tensor) -> str:
    """Register ``value`` as a buffer under a fresh name ``{prefix}_{n}``; returns the name."""
    index = 0
    while hasattr(graph_module, f"{prefix}_{index}"):
        index += 1
    name = f"{prefix}_{index}"
    graph_module.register_buffer(name, value)
    return name


def drop_unused_attributes(graph_module: GraphModule, targets: Iterable[str]) -> None:
    """Delete the tensors ``targets`` names that no ``get_attr`` node reads any more (replaced weights),
    so they do not travel into an exported program."""
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    for target in set(targets) - used:
        owner_path, _, leaf = str(target).rpartition(".")
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
        if isinstance(getattr(owner, leaf, None), torch.Tensor):
            delattr(owner, leaf)


def reshape_sizes(shape: Sequence[object]) -> list[int] | None:
    """``shape`` as ``reshape`` sizes that hold for every input length: a dynamic size becomes ``-1``.

    Graphs exported with a dynamic length carry symbolic sizes in their shape metadata;
    written into a new node's arguments they would name symbols the generated code lacks.
    Returns ``None`` when more than one size is dynamic (no single ``-1`` can stand for them).
    """
    sizes = [int(size) if isinstance(size, int) else -1 for size in shape]
    return sizes if sizes.count(-1) <= 1 else None


def replace_node(graph_module: GraphModule, old: Node, new: Node, *, also_tag: tuple[Node, ...] = ()) -> None:
    """Route every use of ``old`` to ``new``, erase ``old``; ``new`` (and ``also_tag``) keep its layer meta."""
    for node in (new, *also_tag):
        node.meta.update({k: v for k, v in old.meta.items() if k in _KEPT_META})
    old.replace_all_uses_with(new)
    graph_module.graph.erase_node(old)


@dataclass(frozen=True)
class Rewrite:
    """What a rewrite put in place of a node: the node giving its value, and other new nodes
    that take its layer meta (for the layer names in kernel reports)."""

    out: Node
    also_tag: tuple[Node, ...] = ()


class NodeRewritePass(PassBase):
    """A pass that visits every node once and may replace it; subclasses implement :meth:`rewrite`.

    The base class routes the node's uses to the replacement and erases it; when anything
    changed it then removes dead code, the constants no node reads any more and unused
    submodules, and recompiles the module.
    """

    def rewrite(self, graph_module: GraphModule, node: Node) -> Rewrite | None:
        """Insert the replacement of ``node`` before it and return it, or ``None`` to leave ``node`` alone."""
        raise NotImplementedError

    def call(self, graph_module: GraphModule) -> PassResult:
        read_before = [n.target for n in graph_module.graph.nodes if n.op == "get_attr"]
        modified = False
        for node in list(graph_module.graph.nodes):
            done = self.rewrite(graph_module, node)
            if done is None:
                continue
            replace_node(graph_module, node, done.out, also_tag=done.also_tag)
            modified = True
        if modified:
            graph_module.graph.eliminate_dead_code()
            drop_unused_attributes(graph_module, read_before)
            graph_module.delete_all_unused_submodules()
            graph_module.recompile()
        return PassResult(graph_module, modified)
