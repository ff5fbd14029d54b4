"""CNN convolutions as int8 GEMMs over slice-built windows: same integers, at any length."""

from __future__ import annotations

import copy

import torch

from sq_pt2e.export import export_speech_model
from sq_pt2e.framing import LengthRange, cnn_geometry
from sq_pt2e.models import build_model
from sq_pt2e.passes.conv1d_as_window_gemm import QuantizedConv1dAsWindowGemmPass
from sq_pt2e.passes.rewrite_utils import match_quantized_conv1d
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.recipes import default_plan


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_dense_convs_become_linears_without_unfold_and_outputs_match(single_thread) -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    converted = quantize_model(model, wave, [wave], plan=default_plan(), fit_to_cpu=False).converted
    graph = copy.deepcopy(converted)
    assert QuantizedConv1dAsWindowGemmPass()(graph).modified
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    # only the grouped positional conv keeps its convolution; the first one (kernel 10, stride 5) is a GEMM too
    assert targets.count(torch.ops.aten.conv1d.default) == 1
    assert torch.ops.aten.unfold.default not in targets
    linears = [n for n in graph.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 14 + 7
    names = {list(n.meta["nn_module_stack"].values())[-1][0] for n in linears}
    assert {"wav2vec2.feature_extractor.conv_layers.0.conv", "wav2vec2.feature_extractor.conv_layers.3.conv"} <= names
    # the int8 conv weights no node reads any more are gone (they would travel into an exported program)
    constants = {name for name, _ in graph.named_buffers()} | {name for name, _ in graph.named_parameters()}
    matches = [match_quantized_conv1d(n) for n in converted.graph.nodes]
    conv_weights = {m.w_int.target for m in matches if m is not None and m.groups == 1}
    assert len(conv_weights) == 7 and not conv_weights & constants
    assert _cosine(graph(wave), converted(wave)) > 0.9999  # float sums in another order


def test_dynamic_length_graph_matches_at_every_length(single_thread) -> None:
    model = build_model("tiny-hubert", seed=0)
    lengths = LengthRange.up_to(32000, cnn_geometry(model))
    generator = torch.Generator().manual_seed(1)
    waves = [torch.randn(1, lengths.hop * frames + lengths.context, generator=generator) for frames in (40, 7, 99)]
    converted = quantize_model(model, waves[0], waves, plan=default_plan(), target="xnnpack",
                               lengths=lengths).converted
    graph = copy.deepcopy(converted)
    assert QuantizedConv1dAsWindowGemmPass()(graph).modified
    assert any(n.target == torch.ops.aten.sym_size.int for n in graph.graph.nodes)
    for wave in waves:
        expected = converted(wave)
        assert expected.shape[1] == (wave.shape[1] - lengths.context) // lengths.hop
        assert _cosine(graph(wave), expected) > 0.9999


def test_float_graph_is_left_alone() -> None:
    graph = export_speech_model(build_model("tiny-hubert", seed=0), torch.randn(1, 16000)).module()
    assert not QuantizedConv1dAsWindowGemmPass()(graph).modified
