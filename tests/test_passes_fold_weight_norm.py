"""fold_weight_norm: weight norm becomes a plain weight, outputs unchanged, folded names returned."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sq_pt2e.models import build_model
from sq_pt2e.passes.fold_weight_norm import fold_weight_norm, folded_copy
from sq_pt2e.testing import example_waves


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.plain = nn.Conv1d(2, 4, 3)
        self.param = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, groups=2), dim=2)
        with pytest.warns(FutureWarning):
            self.legacy = nn.utils.weight_norm(nn.Linear(4, 3))
        with torch.no_grad():  # move g away from ||v|| so the norm matters
            self.param.parametrizations.weight.original0.mul_(1.7)
            self.legacy.weight_g.mul_(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.legacy(self.param(self.plain(x)).transpose(1, 2))


def test_folding_keeps_the_output_and_returns_the_folded_module_names() -> None:
    model = _Normed().eval()
    x = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    assert fold_weight_norm(model) == ["param", "legacy"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    assert not parametrize.is_parametrized(model.param)
    assert not hasattr(model.legacy, "weight_g") and not hasattr(model.legacy, "weight_v")
    assert isinstance(model.legacy.weight, nn.Parameter)
    assert not model.legacy._forward_pre_hooks


def test_folding_twice_folds_nothing_the_second_time() -> None:
    model = _Normed()
    fold_weight_norm(model)
    assert fold_weight_norm(model) == []
    assert fold_weight_norm(nn.Linear(2, 2)) == []


def test_tiny_wav2vec2_positional_conv_is_folded_with_identical_logits() -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    (wave,) = example_waves(1, 1)
    with torch.no_grad():
        before = model(wave).logits
    assert fold_weight_norm(model) == ["wav2vec2.encoder.pos_conv_embed.conv"]
    with torch.no_grad():
        torch.testing.assert_close(model(wave).logits, before, rtol=1e-5, atol=1e-5)
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    assert model.wav2vec2.encoder.pos_conv_embed.conv.weight.shape == (32, 4, 16)


def test_folded_parametrized_weight_stays_a_trainable_parameter() -> None:
    model = _Normed()
    fold_weight_norm(model)
    parameters = dict(model.named_parameters())
    assert "param.weight" in parameters
    assert parameters["param.weight"].requires_grad


def test_folding_tiny_wav2vec2_keeps_the_positional_conv_weight_in_parameters() -> None:
    model = build_model("tiny-wav2vec2", seed=0)
    fold_weight_norm(model)
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight" in dict(model.named_parameters())


def test_folded_copy_leaves_the_original_parametrized_and_working() -> None:
    model = _Normed().eval()
    x = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
    copy = folded_copy(model)
    assert not parametrize.is_parametrized(copy.param)
    assert parametrize.is_parametrized(model.param)  # a plain deepcopy + fold deletes the original's weight
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        torch.testing.assert_close(copy(x), before, rtol=1e-6, atol=1e-6)
