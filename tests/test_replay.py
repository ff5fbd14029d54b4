"""Replaying recorded stage outputs: the same scores to the bit, less of the model run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sq_pt2e.baselines import Bits, uniform_plan
from sq_pt2e.models import build_model
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.replay import StageCache, latest_stages, model_stages
from sq_pt2e.simulate import collect_statistics, fake_quantized, plan_layer_quants, quantizable_modules
from sq_pt2e.stablequant import Evaluator, layer_key
from sq_pt2e.testing import example_waves


def _names(model: torch.nn.Module) -> list[str]:
    return [m.name for m in quantizable_modules(to_ctc_logits(model))]


def test_stages_of_a_wav2vec2_model_are_two_chains_and_the_positional_conv() -> None:
    order = _names(build_model("tiny-wav2vec2", seed=0))
    stages = {s.name: s for s in model_stages(order)}
    conv1, block1 = "wav2vec2.feature_extractor.conv_layers.1", "wav2vec2.encoder.layers.1"
    assert stages[conv1].replaced == ("wav2vec2.feature_extractor.conv_layers.0", conv1)
    assert stages[block1].replaced == ("wav2vec2.encoder.layers.0", block1)
    assert stages["wav2vec2.encoder.pos_conv_embed"].replaced == ("wav2vec2.encoder.pos_conv_embed",)
    # Before the head: the last conv, the positional conv and the last block.
    before_head = [s.name for s in latest_stages(list(stages.values()), order.index("lm_head"))]
    assert before_head == ["wav2vec2.feature_extractor.conv_layers.6", "wav2vec2.encoder.pos_conv_embed",
                           "wav2vec2.encoder.layers.1"]
    assert model_stages(["encoder.0", "head"]) == []  # another structure: nothing to replay


def _candidates(model: torch.nn.Module, waves: list[torch.Tensor]) -> list[dict]:
    """Candidates sharing prefixes, as the search makes them: all quantized, then one group's range changed."""
    quants = plan_layer_quants(model, uniform_plan("mse", Bits(8, 8)), collect_statistics(model, waves))
    names = list(quants)
    changed = [names[2], names[len(names) // 2], names[-1]]  # a CNN conv, a block's Linear, the head
    return [quants] + [{**quants, n: dataclasses.replace(quants[n], act_range=quants[n].act_range / 2)}
                       for n in changed] + [{n: q for n, q in quants.items() if n != changed[1]}]


@pytest.mark.parametrize("arch", ["tiny-wav2vec2", "tiny-hubert"])
def test_evaluator_scores_are_the_same_with_replayed_stages(arch: str) -> None:
    torch.set_num_threads(1)
    model = build_model(arch, seed=0)
    waves = example_waves(0, 3, 8000)
    candidates = _candidates(model, waves)
    replaying = Evaluator(model, waves)
    recomputing = Evaluator(model, waves)
    recomputing.stage_cache = None
    assert replaying.score_many(candidates) == recomputing.score_many(candidates)
    assert replaying.stage_cache.replayed > 0


def test_a_cache_too_small_to_keep_anything_still_gives_the_outputs() -> None:
    torch.set_num_threads(1)
    model = build_model("tiny-hubert", seed=0)
    waves = example_waves(1, 2, 8000)
    candidate = _candidates(model, waves)[1]
    cache = StageCache(_names(model), layer_key, max_bytes=16)
    with fake_quantized(model, candidate) as run, torch.no_grad():
        first = cache.forward_all(run, candidate, waves)
        second = cache.forward_all(run, candidate, waves)
        expected = [run(w) for w in waves]
    assert cache.replayed == 0
    for a, b, c in zip(first, second, expected):
        assert torch.equal(a, c) and torch.equal(b, c)
