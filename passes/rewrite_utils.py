"""Small helpers the graph passes share: constants as buffers, node replacement."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

__all__ = ["add_constant", "replace_node"]

_KEPT_META = ("nn_module_stack", "stack_trace")


def add_constant(graph_module: GraphModule, prefix: str, value: torch.Tensor) -> str:
    """Register ``value`` as a buffer under a fresh name ``{prefix}_{n}``; returns the name."""
    index = 0
    while hasattr(graph_module, f"{prefix}_{index}"):
        index += 1
    name = f"{prefix}_{index}"
    graph_module.register_buffer(name, value)
    return name


def replace_node(graph_module: GraphModule, old: Node, new: Node, *, also_tag: tuple[Node, ...] = ()) -> None:
    """Route every use of ``old`` to ``new``, erase ``old``; ``new`` (and ``also_tag``) keep its layer meta."""
    for node in (new, *also_tag):
        node.meta.update({k: v for k, v in old.meta.items() if k in _KEPT_META})
    old.replace_all_uses_with(new)
    graph_module.graph.erase_node(old)
