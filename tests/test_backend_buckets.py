"""Bucketed int8 inference: frame counts, masked padding, chunking, no recompiles, package cache."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sq_pt2e.asr import logit_agreement
from sq_pt2e.backends.inductor import compare_outputs
from sq_pt2e.backends.inductor_buckets import (
    BucketedInt8Model,
    MaskedCTCLogits,
    pin_activation_ranges,
    pin_attention_scales,
    prune_cache,
    quantize_program,
)
from sq_pt2e.errors import AudioError, PlanError
from sq_pt2e.framing import frame_count
from sq_pt2e.models import build_model
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.passes.fold_weight_norm import folded_copy
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.simulate import quantizable_modules
from sq_pt2e.testing import example_waves

pytestmark = pytest.mark.usefixtures("single_thread")

CALIBRATION = example_waves(2, 2, 8000)
INT8_ATTENTION = QuantPlan(attention="int8")


def _float_wrapper(name: str) -> torch.nn.Module:
    return folded_copy(to_ctc_logits(build_model(name))).eval()


def _padded(wave: torch.Tensor, samples: int) -> torch.Tensor:
    out = torch.zeros(1, samples)
    out[0, : wave.shape[-1]] = wave[0]
    return out


# ------------------------------------------------------------------ no compile
@pytest.mark.parametrize("samples", [400, 719, 720, 4000, 6001, 16000])
def test_frame_count_equals_the_model_output_length(samples: int) -> None:
    model = _float_wrapper("tiny-wav2vec2")
    runner = BucketedInt8Model(model, None, CALIBRATION, buckets=(1.0,), overlap_seconds=0.2, cache=False)
    with torch.no_grad():
        frames = model(torch.randn(1, samples)).shape[1]
    assert frame_count(samples, runner.geometry) == frames
    assert frame_count(399, runner.geometry) == 0


@pytest.mark.parametrize("name", ["tiny-wav2vec2", "tiny-hubert"])
def test_masked_program_on_padded_input_equals_exact_length_float(name: str) -> None:
    model = _float_wrapper(name)
    masked = MaskedCTCLogits(model).eval()
    wave = example_waves(7, 1, 5000)[0]
    with torch.no_grad():
        exact = model(wave)
        padded = masked(_padded(wave, 16000), torch.tensor([5000]))
        unmasked = model(_padded(wave, 16000))
    frames = exact.shape[1]
    assert padded.shape[1] == frame_count(16000, ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2)
    assert (padded[:, :frames] - exact).abs().max() < 1e-4
    # Zero padding alone changes the valid frames: attention (and the group norm) see the padding.
    assert (unmasked[:, :frames] - exact).abs().max() > 1e-3


def test_windows_cover_every_frame_once_within_the_largest_bucket() -> None:
    runner = BucketedInt8Model(_float_wrapper("tiny-wav2vec2"), None, CALIBRATION, buckets=(0.5, 1.0),
                               overlap_seconds=0.2, cache=False)
    for samples in (16001, 40000, 47999, 48321, 100000):
        spans = runner.windows(samples)
        assert len(spans) >= 2
        kept = [frame for _, _, first, last in spans for frame in range(first, last)]
        assert kept == list(range(frame_count(samples, runner.geometry)))
        for start, end, first, last in spans:
            assert start % runner.hop == 0
            assert end - start <= 16000
            # every kept frame's receptive field lies inside its window
            assert first * runner.hop >= start
            assert (last - 1) * runner.hop + 400 <= end


def test_buckets_and_inputs_are_checked() -> None:
    model = _float_wrapper("tiny-wav2vec2")
    with pytest.raises(AudioError, match="increasing and distinct"):
        BucketedInt8Model(model, None, CALIBRATION, buckets=(1.0, 0.5), overlap_seconds=0.2, cache=False)
    with pytest.raises(AudioError, match="shorter than the CNN's receptive field"):
        BucketedInt8Model(model, None, CALIBRATION, buckets=(0.01,), overlap_seconds=0.2, cache=False)
    with pytest.raises(AudioError, match="leaves no centre"):
        BucketedInt8Model(model, None, CALIBRATION, buckets=(1.0,), overlap_seconds=0.5, cache=False)
    runner = BucketedInt8Model(model, None, CALIBRATION, buckets=(0.5, 1.0), overlap_seconds=0.2, cache=False)
    assert [runner.bucket_for(n) for n in (1, 8000, 8001, 16000, 99999)] == [8000, 8000, 16000, 16000, 16000]
    with pytest.raises(AudioError, match="no bucket of 2 s"):
        runner.compile(2.0)
    with pytest.raises(AudioError, match="shorter than the CNN's receptive field"):
        runner(torch.randn(1, 300))
    with pytest.raises(AudioError, match="NaN/Inf"):
        runner(torch.full((1, 4000), float("nan")))
    assert runner.reports == {}  # nothing was compiled


def test_pinned_plan_fixes_every_quantized_layer_range() -> None:
    model = _float_wrapper("tiny-hubert")
    pinned = pin_activation_ranges(model, QuantPlan(), CALIBRATION)
    names = [m.name for m in quantizable_modules(model)]
    assert [layer.name for layer in pinned.layers] == names
    assert all(layer.act_range is not None and layer.act_range > 0 for layer in pinned.layers)
    assert pin_activation_ranges(model, pinned, ()) == pinned  # already pinned: no calibration needed


def test_int8_attention_scales_are_pinned_once_for_every_bucket() -> None:
    model = _float_wrapper("tiny-hubert")
    pinned = pin_attention_scales(model, pin_activation_ranges(model, INT8_ATTENTION, CALIBRATION), CALIBRATION)
    assert len(pinned.attention_scales) == 2 and all(s > 0 for block in pinned.attention_scales for s in block)
    assert QuantPlan.from_dict(pinned.to_dict()) == pinned
    assert pin_attention_scales(model, pinned, ()) == pinned  # already pinned: no calibration needed
    assert pin_attention_scales(model, QuantPlan(), ()) == QuantPlan()  # float attention: nothing to pin
    # Every bucket's graph then quantizes q, k and v with those scales, whatever its example audio.
    converted = quantize_program(MaskedCTCLogits(model), pinned, (torch.randn(1, 8000), torch.tensor([5000])))
    scales = {float(n.args[1]) for n in converted.graph.nodes
              if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default and n.args[2] == 128}
    assert scales == {s for block in pinned.attention_scales for s in block}
    with pytest.raises(PlanError, match="scales of 1 attention blocks.*graph has 2"):
        quantize_program(model, dataclasses.replace(pinned, attention_scales=pinned.attention_scales[:1]),
                         (torch.randn(1, 8000),))
    with pytest.raises(PlanError, match="attention_scales are for int8 attention"):
        dataclasses.replace(pinned, attention="float")


def test_padded_bucket_runs_int8_attention_on_int8_kernels_and_from_its_package(tmp_path: Path) -> None:
    def bucketed(**kwargs: object) -> BucketedInt8Model:
        return BucketedInt8Model(build_model("tiny-hubert"), INT8_ATTENTION, CALIBRATION, buckets=(0.5,), threads=1,
                                 overlap_seconds=0.1, cache_dir=tmp_path, **kwargs)

    runner = bucketed()
    wave = example_waves(11, 1, 5000)[0]
    logits = runner(wave)
    report = runner.reports[8000].inductor
    assert report.int8_attention_in_graph == report.int8_attention_kernels == 2
    cosine, _ = compare_outputs(_eager_int8(runner, wave), logits)  # the padding is masked as attention keys
    assert cosine >= 0.9999
    again = bucketed(compile_now=(0.5,))
    assert again.reports[8000].from_cache
    torch.testing.assert_close(again(wave), logits)


# ------------------------------------------------------------------ compiled (one tiny bucket, ~30 s)
# Bucket choice is tested above without compiling; one compiled bucket keeps the default run short.
@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> BucketedInt8Model:
    torch.set_num_threads(1)
    return BucketedInt8Model(build_model("tiny-wav2vec2"), None, CALIBRATION, buckets=(0.5,), threads=1,
                             overlap_seconds=0.1, cache_dir=tmp_path_factory.mktemp("cache"))


def _eager_int8(runner: BucketedInt8Model, wave: torch.Tensor) -> torch.Tensor:
    """The plain program quantized with the same pinned plan at the wave's exact length, run eagerly."""
    converted = quantize_program(runner._model, runner.plan, (wave,))
    with torch.no_grad():
        return converted(wave)


def test_padded_bucket_matches_exact_length_eager_int8_and_is_verified(runner: BucketedInt8Model) -> None:
    wave = example_waves(11, 1, 5000)[0]
    logits = runner(wave)
    assert list(runner.reports) == [8000]  # only the bucket it needed
    assert logits.shape == (1, frame_count(5000, runner.geometry), 32) == (1, 15, 32)
    report = runner.reports[8000]
    assert report.frames == frame_count(8000, runner.geometry) == 24
    assert report.inductor.int8_kernel_count == report.inductor.int8_layers_in_graph == 22
    assert report.inductor.cosine >= 0.999
    assert report.inductor.threads == 1
    reference = _eager_int8(runner, wave)
    cosine, _ = compare_outputs(reference, logits)
    assert cosine >= 0.999
    assert logit_agreement(reference[0], logits[0]).argmax_agreement >= 0.9


def test_second_use_of_a_bucket_does_not_recompile(runner: BucketedInt8Model) -> None:
    from torch._dynamo.utils import counters

    runner(example_waves(12, 1, 6000)[0])  # compiled already, or compiles now
    frames_before = dict(counters["frames"])
    compiled_before = runner._compiled[8000]
    for samples in (4000, 7999, 8000, 1234):
        assert runner(example_waves(samples, 1, samples)[0]).shape[1] == frame_count(samples, runner.geometry)
    assert dict(counters["frames"]) == frames_before
    assert runner._compiled[8000] is compiled_before


def test_audio_longer_than_the_largest_bucket_is_chunked(runner: BucketedInt8Model) -> None:
    wave = example_waves(13, 1, 24000)[0]
    assert len(runner.windows(24000)) == 5  # 0.3 s centres of 0.5 s windows
    logits = runner(wave)
    assert list(runner.reports) == [8000]
    assert logits.shape == (1, frame_count(24000, runner.geometry), 32)
    reference = _eager_int8(runner, wave)
    cosine, _ = compare_outputs(reference, logits)
    assert cosine >= 0.95  # random weights: attention beyond 0.1 s of context is lost at window edges
    assert isinstance(runner.transcribe(wave), str)


def test_cache_folder_holds_the_verified_package_per_bucket(runner: BucketedInt8Model) -> None:
    runner(example_waves(14, 1, 4000)[0])
    report = runner.reports[8000]
    folder = Path(report.cache_dir)
    assert folder.parent == runner.cache_root and not report.from_cache
    info = json.loads((folder / "sq_pt2e_bucket.json").read_text())
    assert info["bucket_samples"] == 8000 and info["threads"] == 1 and info["masked"] is True
    assert info["inductor"]["int8_layers_in_graph"] == 22 and info["inductor"]["cosine"] >= 0.999
    assert (folder / "program.pt2").stat().st_size > 0 and (folder / "verified_output.pt").is_file()
    assert not list(folder.glob("*partial*"))


def test_a_second_runner_loads_the_package_instead_of_compiling(runner: BucketedInt8Model) -> None:
    wave = example_waves(15, 1, 7000)[0]
    expected = runner(wave)
    info = Path(runner.reports[8000].cache_dir) / "sq_pt2e_bucket.json"
    os.utime(info, (1.0, 1.0))
    again = BucketedInt8Model(build_model("tiny-wav2vec2"), None, CALIBRATION, buckets=(0.5,), threads=1,
                              overlap_seconds=0.1, cache_dir=runner.cache_root, compile_now=(0.5,))
    report = again.reports[8000]
    assert report.from_cache and report.quantize_seconds == 0.0 and report.cache_dir == runner.reports[8000].cache_dir
    assert report.inductor == runner.reports[8000].inductor  # the verification of the compile that wrote it
    assert torch.equal(again(wave), expected)
    assert info.stat().st_mtime > 1.0  # the load marks the entry as recently used for prune_cache


def test_another_plan_does_not_share_the_package(runner: BucketedInt8Model) -> None:
    other = BucketedInt8Model(build_model("tiny-wav2vec2"), QuantPlan(default=LayerPlan("*", act_bits=7)), CALIBRATION,
                              buckets=(0.5,), threads=1, overlap_seconds=0.1, cache_dir=runner.cache_root)
    assert other._cache_dir(8000) != runner._cache_dir(8000)


def _fake_entry(root: Path, name: str, size: int, used: float) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "program.pt2").write_bytes(b"x" * size)
    (folder / "sq_pt2e_bucket.json").write_text("{}")
    os.utime(folder / "sq_pt2e_bucket.json", (used, used))
    return folder


def test_prune_cache_deletes_least_recently_used_entries_until_it_fits(tmp_path: Path) -> None:
    old, kept, middle, new = (_fake_entry(tmp_path, name, 1000, used) for name, used in
                              (("old", 100.0), ("kept", 50.0), ("middle", 200.0), ("new", 300.0)))
    (tmp_path / "not-an-entry").mkdir()
    (tmp_path / "not-an-entry" / "big.bin").write_bytes(b"x" * 10_000)
    assert prune_cache(tmp_path, 2100, keep=[kept]) == [old, middle]
    assert kept.is_dir() and new.is_dir() and (tmp_path / "not-an-entry" / "big.bin").is_file()
    assert prune_cache(tmp_path, 10**9) == [] and prune_cache(tmp_path / "missing", 0) == []


# ------------------------------------------------------------------ fresh processes (slow)
_COMPILE_ONCE = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from sq_pt2e.backends.inductor_buckets import BucketedInt8Model
    from sq_pt2e.models import build_model
    from sq_pt2e.testing import example_waves
    runner = BucketedInt8Model(build_model("tiny-hubert"), None, example_waves(2, 2, 8000), buckets=(0.5,),
                               overlap_seconds=0.1, threads=1, cache_dir=sys.argv[1], compile_now=(0.5,))
    report = runner.reports[8000]
    logits = runner(example_waves(3, 1, 6000)[0])
    print(json.dumps({"from_cache": report.from_cache, "seconds": report.compile_seconds,
                      "kernels": report.inductor.int8_kernel_count, "logits": logits.flatten().tolist()}))
    """
)


def _compile_once(cache: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, str(cache)], capture_output=True, text=True,
                          check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_loads_the_package_and_a_broken_one_is_rebuilt(tmp_path: Path) -> None:
    first, second = _compile_once(tmp_path), _compile_once(tmp_path)
    assert not first["from_cache"] and second["from_cache"]
    assert second["seconds"] < 0.2 * first["seconds"]
    assert first["kernels"] == second["kernels"] == 22 and first["logits"] == second["logits"]
    (package,) = tmp_path.rglob("program.pt2")
    package.write_bytes(package.read_bytes()[:1000])  # truncated: must be compiled again, not served
    third = _compile_once(tmp_path)
    assert not third["from_cache"] and third["logits"] == first["logits"]
    assert _compile_once(tmp_path)["from_cache"]
