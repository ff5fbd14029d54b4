"""sq_pt2e.testing.assert_qdq_graph: counts and order of ops, and failures that say what differs."""

from __future__ import annotations

import pytest
import torch
from torch.fx import GraphModule

from sq_pt2e.testing import assert_qdq_graph, count_ops, ops_in_order

RELU, TANH, ADD = torch.ops.aten.relu.default, torch.ops.aten.tanh.default, torch.ops.aten.add.Tensor


class _Ops(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x) + 1.0
        return torch.tanh(y) + torch.relu(y)


def _graph() -> GraphModule:
    return torch.export.export(_Ops(), (torch.randn(3),)).module()


def test_matching_counts_and_order_pass() -> None:
    gm = _graph()
    counts = {RELU: 2, TANH: 1, ADD: 2, torch.ops.aten.sigmoid.default: 0}
    assert_qdq_graph(gm, counts, order=[RELU, ADD, TANH, RELU, ADD])
    assert_qdq_graph(gm, {}, order=[RELU, RELU])  # a subsequence: other ops may sit between


def test_a_packet_counts_every_overload() -> None:
    gm = _graph()
    assert count_ops(gm, torch.ops.aten.add) == count_ops(gm, ADD) == 2
    assert ops_in_order(gm, [TANH, RELU]) == [RELU, TANH, RELU]


def test_wrong_count_raises_listing_each_op_that_differs() -> None:
    message = r"aten.relu.default: expected 1, found 2.*aten.tanh.default: expected 0, found 1"
    with pytest.raises(AssertionError, match=message):
        assert_qdq_graph(_graph(), {RELU: 1, TANH: 0, ADD: 2})


def test_wrong_order_raises_naming_the_first_op_out_of_place() -> None:
    with pytest.raises(AssertionError, match=r"matched 2 of 3 ops; aten.relu.default \(index 2\) not found after them"):
        assert_qdq_graph(_graph(), {}, order=[TANH, RELU, RELU])
