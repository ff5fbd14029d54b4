"""The GEMM ceiling measurement: argument errors (the measurement itself runs in test_bench)."""

from __future__ import annotations

import pytest
from torch import nn

from sq_pt2e.gemm_ceiling import feed_forward_shape, measure_gemm_ceiling
from sq_pt2e.models import build_model


def test_feed_forward_shape_reads_the_models_config() -> None:
    model = build_model("tiny-wav2vec2")
    frames, hidden, intermediate = feed_forward_shape(model, 16000)
    assert frames == 49 and (hidden, intermediate) == (model.config.hidden_size, model.config.intermediate_size)


def test_a_model_without_a_speech_config_is_refused() -> None:
    with pytest.raises(ValueError, match="Linear has no wav2vec2/HuBERT config"):
        feed_forward_shape(nn.Linear(2, 2), 16000)


def test_an_unknown_backend_is_refused_before_anything_runs() -> None:
    with pytest.raises(ValueError, match=r"unknown backend\(s\) \['tensorrt'\]"):
        measure_gemm_ceiling(4, 8, 16, threads=1, backends=("inductor", "tensorrt"))
