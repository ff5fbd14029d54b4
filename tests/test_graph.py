"""Finding and naming quantizable layers in an exported graph."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from sq_pt2e.graph import find_quantizable_layers, layer_name, op_kind


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.grouped = nn.Conv1d(4, 4, 3, groups=2, padding="same")
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.grouped(torch.relu(self.conv(x))).transpose(1, 2)
        return self.layers[1](torch.tanh(self.layers[0](y)))


def _exported() -> GraphModule:
    torch.manual_seed(0)
    return torch.export.export(_Blocks().eval(), (torch.randn(1, 2, 10),)).module()


def test_layers_are_found_in_graph_order_with_named_modules_paths_and_op_kinds() -> None:
    layers = find_quantizable_layers(_exported())
    assert [(layer.name, layer.op) for layer in layers] == [
        ("conv", "conv1d"),
        ("grouped", "grouped_conv1d"),
        ("layers.0", "linear"),
        ("layers.1", "linear"),
    ]
    assert {layer.name for layer in layers} <= {name for name, _ in _Blocks().named_modules()}


def test_op_kind_covers_conv1d_padding_overload_and_ignores_other_nodes() -> None:
    gm = _exported()
    kinds = {node.name: op_kind(node) for node in gm.graph.nodes}
    padded = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.conv1d.padding)
    assert op_kind(padded) == "grouped_conv1d"
    assert kinds["x"] is None  # placeholder
    assert kinds["relu"] is None
    assert sum(kind is not None for kind in kinds.values()) == 4


def test_op_kind_reads_groups_from_kwargs_and_defaults_to_dense() -> None:
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    dense = graph.call_function(torch.ops.aten.conv1d.default, (x, w))
    grouped = graph.call_function(torch.ops.aten.conv1d.default, (x, w), {"groups": 4})
    conv2d = graph.call_function(torch.ops.aten.conv2d.default, (x, w))
    assert (op_kind(dense), op_kind(grouped), op_kind(conv2d)) == ("conv1d", "grouped_conv1d", None)


def test_layer_name_strips_the_dynamo_self_prefix_and_is_empty_without_a_module_stack() -> None:
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    assert layer_name(node) == ""
    node.meta["nn_module_stack"] = {
        "L__self__": ("", "Model"),
        "L__self___encoder_fc1": ("L['self'].encoder.layers.3.fc1", "torch.nn.Linear"),
    }
    assert layer_name(node) == "encoder.layers.3.fc1"


def test_a_layer_without_module_stack_is_named_after_its_node() -> None:
    gm = _exported()
    linear = next(n for n in gm.graph.nodes if op_kind(n) == "linear")
    del linear.meta["nn_module_stack"]
    names = [layer.name for layer in find_quantizable_layers(gm)]
    assert names == ["conv", "grouped", linear.name, "layers.1"]
