"""Shared fixtures: seeded tiny models and example waveforms (all small and CPU-only)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from sq_pt2e.models import build_model
from sq_pt2e.testing import example_waves

EXAMPLE_SAMPLES = 4000  # 0.25 s at 16 kHz: 12 frames, fast to export and compile


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for the test (the machine is shared); restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def example_wave() -> torch.Tensor:
    """One seeded ``(1, 4000)`` waveform."""
    return example_waves(1, 1, EXAMPLE_SAMPLES)[0]


@pytest.fixture
def calibration_waves() -> list[torch.Tensor]:
    """Two seeded ``(1, 4000)`` calibration waveforms (not the example)."""
    return example_waves(2, 2, EXAMPLE_SAMPLES)


@pytest.fixture
def tiny_wav2vec2() -> torch.nn.Module:
    """A fresh seeded tiny wav2vec2 CTC model in eval mode."""
    return build_model("tiny-wav2vec2", seed=0)


@pytest.fixture
def tiny_hubert() -> torch.nn.Module:
    """A fresh seeded tiny HuBERT CTC model in eval mode."""
    return build_model("tiny-hubert", seed=0)
