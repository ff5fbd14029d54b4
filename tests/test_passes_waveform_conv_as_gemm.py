"""The float first conv as a GEMM on waveform windows: same result up to float summation order."""

from __future__ import annotations

import copy

import pytest
import torch

from sq_pt2e.backends.inductor import compile_inductor
from sq_pt2e.export import export_speech_model
from sq_pt2e.models import build_model
from sq_pt2e.passes.waveform_conv_as_gemm import WaveformConvAsGemmPass
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.recipes import search_shaped_plan

FIRST_CONV = "wav2vec2.feature_extractor.conv_layers.0.conv"


def _layer(node: torch.fx.Node) -> str:
    return list(node.meta["nn_module_stack"].values())[-1][0]


def _convs(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in graph.graph.nodes if n.target == torch.ops.aten.conv1d.default]


@pytest.fixture(scope="module")
def first_conv_float() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """tiny-wav2vec2 quantized with a searched plan's shape, fitted to this CPU: the first conv stays float."""
    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    plan = search_shaped_plan(model, [wave], "tiny-wav2vec2")
    return quantize_model(model, wave, [wave], plan=plan).converted, wave


def test_the_float_waveform_conv_becomes_a_linear_and_the_output_matches(first_conv_float) -> None:
    converted, wave = first_conv_float
    assert FIRST_CONV in {_layer(n) for n in _convs(converted)}
    graph = copy.deepcopy(converted)
    assert WaveformConvAsGemmPass()(graph).modified
    assert FIRST_CONV not in {_layer(n) for n in _convs(graph)}
    linears = [n for n in graph.graph.nodes if n.target == torch.ops.aten.linear.default and _layer(n) == FIRST_CONV]
    assert len(linears) == 1
    expected = converted(wave)
    torch.testing.assert_close(graph(wave), expected, rtol=1e-4, atol=1e-4)


def test_int8_convs_and_other_float_convs_are_left_alone(first_conv_float) -> None:
    converted, _ = first_conv_float
    graph = copy.deepcopy(converted)
    WaveformConvAsGemmPass()(graph)
    assert len(_convs(graph)) == len(_convs(converted)) - 1  # only the one-channel float conv changed
    float_graph = export_speech_model(build_model("tiny-hubert", seed=0), torch.randn(1, 16000)).module()
    before = len(_convs(float_graph))
    WaveformConvAsGemmPass()(float_graph)
    assert len(_convs(float_graph)) == before - 1  # conv 0 only: the others have more input channels


def test_inductor_runs_it_and_still_matches_eager_int8(first_conv_float) -> None:
    converted, wave = first_conv_float
    compiled = compile_inductor(converted, wave, threads=1)
    assert compiled.report.cosine > 0.999
    assert compiled.report.int8_kernel_count >= compiled.report.int8_layers_in_graph
