"""The annotator registry, and each annotator called directly on a small exported graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from sq_pt2e.annotators import (
    ANNOTATORS,
    SUPPORTED_PATTERNS,
    LayerQSpecs,
    annotate_conv1d,
    annotate_grouped_conv1d,
    annotate_linear,
    is_annotated,
    register_annotator,
)
from sq_pt2e.graph import op_kind
from sq_pt2e.quantizer import act_qspec, weight_qspec

SPECS = LayerQSpecs(act_qspec(8, "max", None, None), weight_qspec(8))
SKIP = LayerQSpecs(None, None)


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.pos = nn.Conv1d(4, 4, 3, groups=2, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pos(torch.relu(self.conv(x)))
        return self.head(y.transpose(1, 2))


def _graph() -> GraphModule:
    torch.manual_seed(0)
    return torch.export.export(_Small().eval(), (torch.randn(1, 2, 12),)).module()


def _node(gm: GraphModule, kind: str) -> Node:
    (node,) = [n for n in gm.graph.nodes if op_kind(n) == kind]
    return node


def _annotated_kinds(gm: GraphModule) -> list[str | None]:
    return [op_kind(n) for n in gm.graph.nodes if is_annotated(n)]


# ------------------------------------------------------------------ registry
def test_every_supported_pattern_has_a_registered_annotator() -> None:
    assert set(SUPPORTED_PATTERNS) == set(ANNOTATORS)
    assert ANNOTATORS["conv1d"] is annotate_conv1d
    assert ANNOTATORS["grouped_conv1d"] is annotate_grouped_conv1d
    assert ANNOTATORS["linear"] is annotate_linear


def test_registering_an_op_twice_raises_and_keeps_the_first_annotator() -> None:
    def impostor(gm: GraphModule, specs_for: object) -> list[list[Node]]:
        return []

    with pytest.raises(ValueError, match="annotator for 'linear' already registered by annotate_linear"):
        register_annotator("linear")(impostor)
    assert ANNOTATORS["linear"] is annotate_linear


def test_register_annotator_returns_the_function_itself() -> None:
    def annotate_test_op(gm: GraphModule, specs_for: object) -> list[list[Node]]:
        return []

    try:
        assert register_annotator("test-op-for-registry")(annotate_test_op) is annotate_test_op
        assert ANNOTATORS["test-op-for-registry"] is annotate_test_op
    finally:
        ANNOTATORS.pop("test-op-for-registry", None)


# ------------------------------------------------------------------ annotators called directly
@pytest.mark.parametrize(
    ("annotator", "kind"),
    [(annotate_conv1d, "conv1d"), (annotate_grouped_conv1d, "grouped_conv1d"), (annotate_linear, "linear")],
)
def test_annotator_marks_only_its_op_with_input_and_weight_specs(annotator: object, kind: str) -> None:
    gm = _graph()
    partitions = annotator(gm, lambda node: SPECS)  # type: ignore[operator]
    node = _node(gm, kind)
    assert partitions == [[node]]
    assert _annotated_kinds(gm) == [kind]
    annotation = node.meta[Q_ANNOTATION_KEY]
    assert annotation.input_qspec_map == {node.args[0]: SPECS.input_act, node.args[1]: SPECS.weight}
    assert annotation.output_qspec is None


def test_output_spec_is_set_when_the_layer_has_one() -> None:
    from sq_pt2e.quantizer import output_qspec

    gm = _graph()
    annotate_linear(gm, lambda node: LayerQSpecs(SPECS.input_act, SPECS.weight, output_qspec()))
    assert _node(gm, "linear").meta[Q_ANNOTATION_KEY].output_qspec is output_qspec()


def test_skipped_layer_is_annotated_with_no_qspecs_and_later_annotations_do_not_override_it() -> None:
    gm = _graph()
    assert annotate_linear(gm, lambda node: SKIP) == [[_node(gm, "linear")]]
    annotation = _node(gm, "linear").meta[Q_ANNOTATION_KEY]
    assert annotation._annotated
    assert annotation.input_qspec_map == {}
    assert annotation.output_qspec is None
    assert annotate_linear(gm, lambda node: SPECS) == []  # first annotation wins
    assert _node(gm, "linear").meta[Q_ANNOTATION_KEY].input_qspec_map == {}


def test_node_whose_specs_are_none_is_left_unannotated_for_another_quantizer() -> None:
    gm = _graph()
    assert annotate_conv1d(gm, lambda node: None) == []
    assert _annotated_kinds(gm) == []


def test_specs_are_asked_per_node() -> None:
    gm = _graph()
    pos = _node(gm, "grouped_conv1d")
    for annotator in (annotate_conv1d, annotate_grouped_conv1d, annotate_linear):
        annotator(gm, lambda node: SKIP if node is pos else SPECS)
    assert _annotated_kinds(gm) == ["conv1d", "grouped_conv1d", "linear"]
    assert pos.meta[Q_ANNOTATION_KEY].input_qspec_map == {}
    assert len(_node(gm, "conv1d").meta[Q_ANNOTATION_KEY].input_qspec_map) == 2


def test_layer_qspecs_skip_only_when_input_and_weight_specs_are_none() -> None:
    assert SKIP.skip
    assert not SPECS.skip
    assert not LayerQSpecs(None, SPECS.weight).skip
