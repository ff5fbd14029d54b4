"""The xnnpack target's graph adds each int8 layer's bias on XNNPACK's int32 grid, as its .pte does."""

from __future__ import annotations

import operator

import pytest
import torch

from sq_pt2e.inputs import fixed_length, load_source
from sq_pt2e.models import build_model
from sq_pt2e.passes.snap_bias_to_int32_grid import int32_bias_grid, snap_to_int32_grid
from sq_pt2e.pipeline import quantize_model

_LAYERS = (torch.ops.aten.conv1d.default, torch.ops.aten.linear.default)


@pytest.fixture(scope="module")
def speech() -> list[torch.Tensor]:
    """One second of two shipped utterances: near-silent frames are where a bias step shows."""
    return [fixed_length(u.wave, 16000) for u in load_source(None, limit=2)]


def _model_with_conv_bias() -> torch.nn.Module:
    """tiny-wav2vec2 whose CNN conv 2 has a bias (those convs have none; a weight refit gives them one)."""
    model = build_model("tiny-wav2vec2", seed=0)
    conv = model.wav2vec2.feature_extractor.conv_layers[2].conv
    conv.bias = torch.nn.Parameter(torch.full((conv.out_channels,), 0.001))
    return model


def _biased_layers(converted: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.Tensor]]:
    return [(n, operator.attrgetter(n.args[2].target)(converted)) for n in converted.graph.nodes
            if n.target in _LAYERS and len(n.args) > 2 and n.args[2] is not None]


def test_snap_rounds_to_the_nearest_grid_point_per_channel() -> None:
    step = int32_bias_grid(0.5, torch.tensor([0.1, 0.01]))
    torch.testing.assert_close(step, torch.tensor([0.05, 0.005]))
    snapped = snap_to_int32_grid(torch.tensor([0.124, 0.0124]), step)
    torch.testing.assert_close(snapped, torch.tensor([0.10, 0.010]))
    torch.testing.assert_close(snap_to_int32_grid(torch.tensor([0.126, -0.0126]), step), torch.tensor([0.15, -0.015]))
    torch.testing.assert_close(snap_to_int32_grid(torch.tensor([1.0, 2.0]), int32_bias_grid(0.5, 0.5)),
                               torch.tensor([1.0, 2.0]))


def test_xnnpack_graph_biases_lie_on_the_int32_grid_and_the_float_model_keeps_its_own(speech, single_thread) -> None:
    model = _model_with_conv_bias()
    float_biases = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("bias")}
    converted = quantize_model(model, speech[0], speech, target="xnnpack").converted
    layers = _biased_layers(converted)
    assert len(layers) == 16  # the biased CNN conv, positional conv, feature projection, 2 x 6 Linears, lm_head
    for layer, bias in layers:
        x_scale = layer.args[0].args[1]
        step = int32_bias_grid(x_scale, operator.attrgetter(layer.args[1].args[1].target)(converted))
        assert (bias / step - (bias / step).round()).abs().max() < 1e-3, layer.name
    conv = next(bias for layer, bias in layers if layer.target == torch.ops.aten.conv1d.default)
    assert not torch.equal(conv, torch.full_like(conv, 0.001))  # 0.001 is off the grid
    assert all(torch.equal(p, float_biases[name]) for name, p in model.named_parameters() if name.endswith("bias"))

    x86 = quantize_model(model, speech[0], speech, target="x86_inductor", fit_to_cpu=False).converted
    conv = next(bias for layer, bias in _biased_layers(x86) if layer.target == torch.ops.aten.conv1d.default)
    assert torch.equal(conv, torch.full_like(conv, 0.001))  # oneDNN adds the float bias: nothing to snap


def test_pte_equals_the_eager_xnnpack_graph_with_a_cnn_conv_bias(speech, single_thread) -> None:
    """Before the snap the eager graph added the float bias: cosine 0.995 to the .pte here."""
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, lower_to_xnnpack

    converted = quantize_model(_model_with_conv_bias(), speech[0], speech, target="xnnpack").converted
    data, _ = lower_to_xnnpack(converted, speech[0])
    runner = PteRunner(data, speech[0].shape[-1], threads=1)
    with torch.no_grad():
        expected = converted(speech[0])
    cosine = torch.nn.functional.cosine_similarity(runner(speech[0]).flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9999, float(cosine)
