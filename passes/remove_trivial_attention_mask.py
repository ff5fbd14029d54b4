"""Drop attention masks that mask nothing.

transformers 5 builds a bidirectional attention mask even when no ``attention_mask``
is given: ``arange -> ge -> expand`` to an all-True ``(1, 1, T, T)`` tensor passed to
every ``scaled_dot_product_attention``. It changes no result but costs work, and on
ExecuTorch its ops are not delegated to XNNPACK, cutting the graph into more pieces.
This pass evaluates each mask that depends on no graph input (only on constants and
static shapes), and when it is all True (or all zero, for additive masks) removes it
from the attention call. Masks that depend on the input are left alone.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["RemoveTrivialAttentionMaskPass"]

_SDPA = (torch.ops.aten.scaled_dot_product_attention.default,)
_MASK_INDEX = 3


def _constant_value(node: Node, cache: dict[Node, object]) -> object:
    """Evaluate ``node`` if it depends on no placeholder; raise LookupError otherwise."""
    if node in cache:
        return cache[node]
    if node.op != "call_function":
        raise LookupError(node.name)

    def resolve(value: object) -> object:
        if isinstance(value, Node):
            return _constant_value(value, cache)
        if isinstance(value, (list, tuple)):
            return type(value)(resolve(v) for v in value)
        return value

    args = tuple(resolve(a) for a in node.args)
    kwargs = {k: resolve(v) for k, v in node.kwargs.items()}
    cache[node] = result = node.target(*args, **kwargs)
    return result


def _masks_nothing(mask: object) -> bool:
    if not isinstance(mask, torch.Tensor):
        return False
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


class RemoveTrivialAttentionMaskPass(PassBase):
    """Replace constant all-pass attention masks of SDPA calls with ``None``."""

    def call(self, graph_module: GraphModule) -> PassResult:
        cache: dict[Node, object] = {}
        modified = False
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or node.target not in _SDPA or len(node.args) <= _MASK_INDEX:
                continue
            mask = node.args[_MASK_INDEX]
            if not isinstance(mask, Node):
                continue
            try:
                value = _constant_value(mask, cache)
            except (LookupError, RuntimeError, TypeError):
                continue
            if _masks_nothing(value):
                node.args = (*node.args[:_MASK_INDEX], None, *node.args[_MASK_INDEX + 1 :])
                modified = True
        if modified:
            graph_module.graph.eliminate_dead_code()
            graph_module.recompile()
        return PassResult(graph_module, modified)
