"""The PT2E flow in one call: calibrate, quantize_exported, quantize_model end to end."""

from __future__ import annotations

import pytest
import torch

from sq_pt2e.errors import PlanError, QuantizationError
from sq_pt2e.export import export_speech_model
from sq_pt2e.pipeline import calibrate, quantize_exported, quantize_model
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.recipes import default_plan
from sq_pt2e.testing import DQ_PER_CHANNEL, assert_qdq_graph

pytestmark = pytest.mark.usefixtures("single_thread")


class _Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(wave.shape))
        return wave


def test_calibrate_with_no_waveforms_raises() -> None:
    with pytest.raises(QuantizationError, match="calibration got no waveforms"):
        calibrate(_Counter(), [])  # type: ignore[arg-type]
    with pytest.raises(QuantizationError, match="calibration got no waveforms"):
        calibrate(_Counter(), iter(()))  # type: ignore[arg-type]


def test_calibrate_runs_every_waveform_and_adds_a_batch_axis_to_1d_ones() -> None:
    counter = _Counter()
    waves = (torch.zeros(800), torch.zeros(1, 900), torch.zeros(2, 700))
    assert calibrate(counter, (w for w in waves)) == 3  # type: ignore[arg-type]
    assert counter.shapes == [(1, 800), (1, 900), (2, 700)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("arch", ["tiny-wav2vec2", "tiny-hubert"])
def test_quantize_model_turns_a_waveform_into_ctc_logits_close_to_float(
    arch: str, request: pytest.FixtureRequest, example_wave: torch.Tensor, calibration_waves: list[torch.Tensor]
) -> None:
    model = request.getfixturevalue(arch.replace("-", "_"))
    example, calibration = example_wave, calibration_waves
    with torch.no_grad():
        reference = model(example).logits
    result = quantize_model(model, example, calibration, plan=default_plan(arch), fit_to_cpu=False)
    with torch.no_grad():
        logits = result.converted(example)
    assert logits.shape == reference.shape == (1, 12, 32)  # 4000 samples -> 12 frames, 32 symbols
    assert _cosine(logits, reference) > 0.9
    assert not torch.equal(logits, reference)  # really quantized
    assert result.target == "x86_inductor"
    assert result.plan == default_plan(arch)
    assert len(result.summary.int8_layers) == 22
    assert [s.status for s in result.layer_status] == ["int8"] * 22
    assert_qdq_graph(result.converted, {DQ_PER_CHANNEL: 22})


def test_quantize_exported_records_skipped_layers_and_the_plan(
    tiny_wav2vec2: torch.nn.Module, example_wave: torch.Tensor, calibration_waves: list[torch.Tensor]
) -> None:
    exported = export_speech_model(tiny_wav2vec2, example_wave, dynamic_time=False)
    plan = QuantPlan().with_skipped(["lm_head"], "float head")
    result = quantize_exported(exported, calibration_waves, plan=plan, fit_to_cpu=False)
    assert result.plan is plan
    assert result.summary.float_layers == ("lm_head",)
    assert [s.name for s in result.layer_status if s.status == "float"] == ["lm_head"]


def test_fit_to_cpu_is_recorded_in_the_returned_plan(
    tiny_wav2vec2: torch.nn.Module, example_wave: torch.Tensor
) -> None:
    from sq_pt2e.backends.inductor import fit_plan_to_cpu
    from sq_pt2e.graph import group_channels

    result = quantize_model(tiny_wav2vec2, example_wave, [example_wave], plan=QuantPlan(), fit_to_cpu=True)
    assert result.plan == fit_plan_to_cpu(QuantPlan(), group_channels=group_channels(tiny_wav2vec2))[0]
    bits = {node.args[5] for node in result.converted.graph.nodes if node.target == DQ_PER_CHANNEL}
    assert bits == {2 ** (result.plan.default.weight_bits - 1) - 1}


def test_plan_naming_a_missing_layer_fails_before_calibration(
    tiny_hubert: torch.nn.Module, example_wave: torch.Tensor
) -> None:
    example = example_wave
    plan = QuantPlan(layers=(LayerPlan("hubert.encoder.layers.7.attention.q_proj", weight_bits=4),))
    with pytest.raises(PlanError, match="did you mean 'hubert.encoder.layers.1.attention.q_proj'"):
        quantize_model(tiny_hubert, example, [example], plan=plan, fit_to_cpu=False)


def test_quantize_model_rejects_a_one_dimensional_example(tiny_wav2vec2: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"shape \(batch, samples\), got \(4000,\)"):
        quantize_model(tiny_wav2vec2, torch.zeros(4000), [torch.zeros(1, 4000)])
