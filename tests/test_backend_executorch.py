"""ExecuTorch/XNNPACK lowering: a dynamic-length int8 program matches eager int8 at every length."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.errors import AudioError, BackendError
from sq_pt2e.framing import LengthRange, cnn_geometry
from sq_pt2e.models import build_model
from sq_pt2e.pipeline import quantize_model
from sq_pt2e.recipes import default_plan


def test_length_range_accepts_aligned_lengths_and_names_the_bounds() -> None:
    lengths = LengthRange.up_to(16000, cnn_geometry(build_model("tiny-wav2vec2", seed=0)))
    assert (lengths.hop, lengths.context, lengths.max_frames) == (320, 80, 49)
    assert lengths.max_samples == 320 * 49 + 80 <= 16000
    assert lengths.aligned(lengths.max_samples + 319) == lengths.max_samples
    assert lengths.aligned(1000) == 720
    assert lengths.cut(torch.zeros(1, 1000)).shape == (1, 720)
    with pytest.raises(AudioError, match=r"720 to 15760 samples .* got 16080"):
        lengths.aligned(16080)
    with pytest.raises(AudioError, match="got 719"):
        lengths.aligned(719)
    with pytest.raises(AudioError, match="at least 2"):
        LengthRange.up_to(500, cnn_geometry(build_model("tiny-wav2vec2", seed=0)))


@pytest.mark.parametrize("name, weight_bits", [("tiny-wav2vec2", 8), ("tiny-hubert", 4)])
def test_dynamic_length_int8_pte_matches_eager_int8_at_every_length(name: str, weight_bits: int,
                                                                     single_thread) -> None:
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, lower_to_xnnpack

    model = build_model(name, seed=0)
    lengths = LengthRange.up_to(48000, cnn_geometry(model))
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, lengths.hop * 40 + lengths.context, generator=generator)
    calibration = [torch.randn(1, lengths.hop * f + lengths.context, generator=generator) for f in (30, 60)]
    quantized = quantize_model(model, example, calibration, plan=default_plan(weight_bits=weight_bits),
                               target="xnnpack", lengths=lengths)
    data, report = lower_to_xnnpack(quantized.converted, example, lengths=lengths)
    assert report.input_samples == lengths.max_samples
    assert report.int4_linear_layers == (14 if weight_bits == 4 else 0)  # 4-bit Linear weights packed
    assert "aten.view_copy.default" not in report.portable_ops  # symbolic reshapes run in XNNPACK (-1 inferred)
    runner = PteRunner(data, lengths.max_samples, threads=1, lengths=lengths)
    for frames in (3, 77, lengths.max_frames):
        wave = torch.randn(1, lengths.hop * frames + lengths.context + 100, generator=generator)
        output = runner(wave)  # the 100 trailing samples complete no frame: dropped
        expected = quantized.converted(wave[:, : lengths.aligned(wave.shape[1])])
        assert output.shape == expected.shape == (1, frames, 32)
        cosine = torch.nn.functional.cosine_similarity(output.flatten(), expected.flatten(), dim=0)
        assert cosine > 0.999, (frames, float(cosine))
    with pytest.raises(BackendError, match=f"{lengths.max_samples} samples"):
        runner(torch.zeros(1, lengths.max_samples + lengths.hop))


def test_fixed_length_pte_refuses_other_lengths_and_shapes(single_thread) -> None:
    from sq_pt2e.backends.executorch_xnnpack import PteRunner, lower_to_xnnpack
    from sq_pt2e.models.build import to_ctc_logits

    model = to_ctc_logits(build_model("tiny-hubert", seed=0)).eval()
    wave = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))
    data, report = lower_to_xnnpack(model, wave)
    runner = PteRunner(data, report.input_samples, threads=1)
    with torch.no_grad():
        expected = model(wave)
    cosine = torch.nn.functional.cosine_similarity(runner(wave).flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9999
    with pytest.raises(BackendError, match=r"exported for waveforms of shape \(1, 8000\); got \(1, 8320\).*--dynamic"):
        runner(torch.zeros(1, 8320))
    with pytest.raises(BackendError, match=r"takes a \(1, samples\) waveform; got shape \(8000,\)"):
        runner(torch.zeros(8000))
