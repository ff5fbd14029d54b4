"""CNN convolutions as int8 GEMMs: same integers, so the same result up to float summation order."""

from __future__ import annotations

import copy

import torch

from sq_pt2e.models import build_model
from sq_pt2e.passes.conv1d_as_gemm import QuantizedConv1dAsGemmPass
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.recipes import default_plan


def test_dense_convs_become_linears_and_outputs_match() -> None:
    torch.set_num_threads(1)
    model = build_model("tiny-wav2vec2", seed=0)
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    converted = quantize_model(model, wave, [wave], plan=default_plan(), fit_to_cpu=False).converted
    graph = copy.deepcopy(converted)
    assert QuantizedConv1dAsGemmPass()(graph).modified
    convs = [n for n in graph.graph.nodes if n.target == torch.ops.aten.conv1d.default]
    # conv0 (one input channel) and the grouped positional conv keep their convolution.
    assert len(convs) == 2
    linears = [n for n in graph.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 14 + 6
    names = {list(n.meta["nn_module_stack"].values())[-1][0] for n in linears}
    assert "wav2vec2.feature_extractor.conv_layers.3.conv" in names
    expected = converted(wave)
    cosine = torch.nn.functional.cosine_similarity(graph(wave).flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9999


def test_float_graph_is_left_alone() -> None:
    wave = torch.randn(1, 16000)
    from sq_pt2e.export import export_speech_model

    graph = export_speech_model(build_model("tiny-hubert", seed=0), wave).module()
    assert not QuantizedConv1dAsGemmPass()(graph).modified
