"""Let XNNPACK take the reshapes of a dynamic-length program: a symbolic size becomes ``-1``.

A program exported for a range of lengths reshapes tensors to shapes that hold the symbolic
frame count, e.g. ``view(x, [1, frames, 12, 64])`` to split the attention heads. XNNPACK's
partitioner refuses a reshape whose shape holds a symbolic size, although its reshape infers
one dimension (``-1``) at run time; each refused reshape cuts the graph and runs as an
ExecuTorch portable kernel. Where exactly one size of a reshape's output is symbolic, this
pass writes the output's static sizes and ``-1`` for that one (the same size: the others are
fixed). It runs on the edge program, before partitioning
(``to_edge_transform_and_lower(..., transform_passes=[...])``).
"""

from __future__ import annotations

from executorch.exir.dialects._ops import ops as exir_ops
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from sq_pt2e.passes.rewrite_utils import reshape_sizes

__all__ = ["infer_symbolic_reshape_dim"]


def infer_symbolic_reshape_dim(graph_module: GraphModule) -> PassResult:
    """Give each ``view_copy`` with one symbolic output size its static sizes and ``-1`` for that one."""
    changed = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target != exir_ops.edge.aten.view_copy.default:
            continue
        sizes = reshape_sizes(node.meta["val"].shape)
        if sizes is None or -1 not in sizes or sizes == list(node.args[1]):
            continue
        node.args = (node.args[0], sizes, *node.args[2:])
        changed += 1
    if changed:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return PassResult(graph_module, bool(changed))
