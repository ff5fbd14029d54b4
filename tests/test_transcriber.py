"""Transcriber: equal to the model it wraps, thread-safe, chunked; transcribe_dataset resumes."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sq_pt2e.asr import ctc_greedy_decode
from sq_pt2e.audio import normalize_waveform
from sq_pt2e.baselines import build_method
from sq_pt2e.beam import BeamSearchDecoder
from sq_pt2e.data import Utterance
from sq_pt2e.errors import AudioError, NumericsError, PlanError, ResumeError
from sq_pt2e.framing import cnn_geometry, frame_count
from sq_pt2e.lm import NgramLM
from sq_pt2e.plan import w8a8_plan
from sq_pt2e.simulate import collect_statistics
from sq_pt2e.transcriber import Transcriber, TranscriptRecord, transcribe_dataset


def _waves(count: int, samples: int = 6000, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    return [(0.2 * np.sin(2 * np.pi * rng.uniform(100, 900) * t) + 0.05 * rng.standard_normal(samples))
            .astype(np.float32) for _ in range(count)]


def _files(folder: Path, count: int, samples: int = 6000) -> list[Utterance]:
    records = []
    for i, wave in enumerate(_waves(count, samples)):
        sf.write(folder / f"u{i}.wav", wave, 16000, subtype="FLOAT")
        records.append(Utterance(f"u{i}", folder / f"u{i}.wav", f"REF {i}"))
    return records


def _calibration() -> list[torch.Tensor]:
    return [torch.from_numpy(normalize_waveform(w)).unsqueeze(0) for w in _waves(2, seed=9)]


def test_float_transcripts_equal_the_model_decoded_directly(tiny_wav2vec2: torch.nn.Module) -> None:
    forward = build_method("float32", tiny_wav2vec2, [], {})
    transcriber = Transcriber(tiny_wav2vec2)
    for wave in _waves(3):
        expected = forward(torch.from_numpy(normalize_waveform(wave)).unsqueeze(0))[0]
        torch.testing.assert_close(transcriber.logits(normalize_waveform(wave)), expected)
        assert transcriber.transcribe(wave) == ctc_greedy_decode(expected)[0]


def test_plan_transcriber_equals_the_simulated_int8_model(tiny_wav2vec2: torch.nn.Module) -> None:
    calibration = _calibration()
    plan = w8a8_plan("tiny-wav2vec2")
    simulated = build_method("stablequant", tiny_wav2vec2, [], collect_statistics(tiny_wav2vec2, calibration),
                             plan=plan)
    float_forward = build_method("float32", tiny_wav2vec2, [], {})
    with Transcriber(tiny_wav2vec2, plan, calibration=calibration) as transcriber:
        for wave in _waves(2):
            normalised = normalize_waveform(wave)
            with torch.no_grad():
                expected = simulated(torch.from_numpy(normalised).unsqueeze(0))[0]
                float_logits = float_forward(torch.from_numpy(normalised).unsqueeze(0))[0]
            got = transcriber.logits(normalised)
            torch.testing.assert_close(got, expected)
            assert not torch.equal(got, float_logits)  # it really is quantized


def test_the_callers_model_is_left_untouched(tiny_wav2vec2: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in tiny_wav2vec2.state_dict().items()}
    transcriber = Transcriber(tiny_wav2vec2, w8a8_plan(), calibration=_calibration())
    transcriber.transcribe(_waves(1)[0])
    after = tiny_wav2vec2.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("quantized", [False, True])
def test_concurrent_calls_from_threads_equal_sequential_calls(tiny_wav2vec2: torch.nn.Module, tmp_path: Path,
                                                              quantized: bool) -> None:
    plan = w8a8_plan() if quantized else None
    transcriber = Transcriber(tiny_wav2vec2, plan, calibration=_calibration(), chunk_seconds=0.2)
    inputs: list[object] = [w for w in _waves(6, samples=5000)]
    inputs += [u.path for u in _files(tmp_path, 6, samples=5000)]
    inputs = inputs * 3
    sequential = [transcriber.transcribe(x) for x in inputs]
    sequential_logits = [transcriber.logits(normalize_waveform(w)) for w in _waves(6, samples=5000)]
    assert len(set(sequential)) > 1  # the inputs give different transcripts: a mix-up would show
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(transcriber.transcribe, inputs))
        concurrent_logits = list(pool.map(lambda w: transcriber.logits(normalize_waveform(w)),
                                          _waves(6, samples=5000)))
    assert concurrent == sequential
    for a, b in zip(concurrent_logits, sequential_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_long_audio_runs_in_overlapping_windows_that_keep_their_own_frames(tiny_wav2vec2: torch.nn.Module,
                                                                          tmp_path: Path) -> None:
    wave = np.concatenate(_waves(5, samples=8000))  # 2.5 s in chunks of 0.5 s, 0.1 s of overlap each side
    transcriber = Transcriber(tiny_wav2vec2, chunk_seconds=0.5, overlap_seconds=0.1)
    stitched = transcriber.stitched_logits(wave)
    assert stitched.shape[0] == frame_count(len(wave), cnn_geometry(tiny_wav2vec2))
    # the third chunk: samples [16000, 24000) with 1600 samples of context on each side
    window = transcriber.logits(normalize_waveform(wave[16000 - 1600:24000 + 1600]))
    torch.testing.assert_close(stitched[50:75], window[5:30])
    assert transcriber.transcribe(wave) == ctc_greedy_decode(stitched)[0]
    # a short input is one window: exactly the logits of the whole normalised input
    short = wave[:7000]
    torch.testing.assert_close(transcriber.stitched_logits(short), transcriber.logits(normalize_waveform(short)))
    sf.write(tmp_path / "long.wav", wave, 16000, subtype="FLOAT")
    torch.testing.assert_close(transcriber.stitched_logits(tmp_path / "long.wav"), stitched)


def test_overlap_must_cover_a_frame_and_fit_in_a_chunk(tiny_wav2vec2: torch.nn.Module) -> None:
    with pytest.raises(AudioError, match="less than the 80 samples a frame reaches past its hop"):
        Transcriber(tiny_wav2vec2, chunk_seconds=0.5, overlap_seconds=0.0)
    with pytest.raises(AudioError, match="longer than a chunk"):
        Transcriber(tiny_wav2vec2, chunk_seconds=0.5, overlap_seconds=0.6)
    assert Transcriber(tiny_wav2vec2, chunk_seconds=0.5).overlap_seconds == pytest.approx(0.12)
    assert Transcriber(tiny_wav2vec2).overlap_seconds == 1.0


def test_bad_inputs_raise_clear_errors(tiny_wav2vec2: torch.nn.Module, tmp_path: Path) -> None:
    transcriber = Transcriber(tiny_wav2vec2, max_seconds=1.0)
    (tmp_path / "junk.wav").write_bytes(b"junk" * 100)
    with pytest.raises(AudioError, match="junk.wav: cannot decode"):
        transcriber.transcribe(tmp_path / "junk.wav")
    with pytest.raises(AudioError, match="waveform: expected float samples, got dtype int16"):
        transcriber.transcribe(np.zeros(4000, dtype=np.int16))
    with pytest.raises(AudioError, match=r"waveform: expected a 1-D waveform, got shape \(2, 4000\)"):
        transcriber.transcribe(np.zeros((2, 4000), dtype=np.float32))
    with pytest.raises(AudioError, match="waveform: 100 samples"):
        transcriber.transcribe(torch.zeros(1, 100))
    with pytest.raises(AudioError, match="longer than the limit of 1 s"):
        transcriber.transcribe(np.zeros(32000, dtype=np.float32))
    with pytest.raises(AudioError, match="chunk_seconds=0.001"):
        Transcriber(tiny_wav2vec2, chunk_seconds=0.001)


def test_a_plan_without_ranges_or_calibration_and_unknown_layers_fail_early(tiny_wav2vec2: torch.nn.Module) -> None:
    with pytest.raises(PlanError, match="pass statistics= or calibration="):
        Transcriber(tiny_wav2vec2, w8a8_plan())
    with pytest.raises(PlanError, match="not in exported graph"):
        Transcriber(tiny_wav2vec2, w8a8_plan(skip={"wav2vec2.encoder.layers.99.fc": "x"}), calibration=_calibration())


def test_nan_logits_are_an_error_not_a_transcript(tiny_wav2vec2: torch.nn.Module) -> None:
    with torch.no_grad():
        tiny_wav2vec2.lm_head.bias[3] = float("nan")
    with pytest.raises(NumericsError, match=r"waveform: the model produced \d+ NaN/Inf logit"):
        Transcriber(tiny_wav2vec2).transcribe(_waves(1)[0])


# ------------------------------------------------------------------ transcribe_dataset and resuming
class _Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_without_redoing_finished_files(tiny_wav2vec2: torch.nn.Module, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    records = _files(tmp_path, 8)
    transcriber = Transcriber(tiny_wav2vec2)
    reference = transcribe_dataset(transcriber, records)
    checkpoint = tmp_path / "out" / "transcripts.jsonl"

    def stop_after_three(record: TranscriptRecord) -> None:
        if record.id == "u2":
            raise _Interrupt

    with pytest.raises(_Interrupt):
        transcribe_dataset(transcriber, records, checkpoint=checkpoint, progress=stop_after_three)
    assert len(checkpoint.read_text().splitlines()) == 1 + 3  # header + u0..u2, flushed before the interrupt
    calls: list[str] = []
    original = Transcriber.transcribe
    monkeypatch.setattr(Transcriber, "transcribe", lambda self, audio: calls.append(Path(audio).stem)
                        or original(self, audio))
    resumed = transcribe_dataset(transcriber, records, checkpoint=checkpoint)
    assert calls == [f"u{i}" for i in range(3, 8)]
    assert resumed == reference
    assert transcribe_dataset(transcriber, records, checkpoint=checkpoint) == reference and len(calls) == 5


def test_a_torn_last_line_is_redone_and_a_corrupt_one_refused(tiny_wav2vec2: torch.nn.Module, tmp_path: Path) -> None:
    records = _files(tmp_path, 3)
    transcriber = Transcriber(tiny_wav2vec2)
    checkpoint = tmp_path / "t.jsonl"
    reference = transcribe_dataset(transcriber, records, checkpoint=checkpoint)
    text = checkpoint.read_text()
    checkpoint.write_text(text[: len(text) - 15])  # killed in the middle of writing the last line
    assert transcribe_dataset(transcriber, records, checkpoint=checkpoint) == reference
    assert checkpoint.read_text() == text  # the torn line was cut and the record written again
    lines = text.splitlines()
    checkpoint.write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(ResumeError, match=r"t.jsonl:2: corrupt checkpoint line"):
        transcribe_dataset(transcriber, records, checkpoint=checkpoint)


def test_a_checkpoint_of_another_model_or_plan_is_refused(tiny_wav2vec2: torch.nn.Module,
                                                          tiny_hubert: torch.nn.Module, tmp_path: Path) -> None:
    records = _files(tmp_path, 2)
    checkpoint = tmp_path / "t.jsonl"
    transcribe_dataset(Transcriber(tiny_wav2vec2), records, checkpoint=checkpoint)
    beam = BeamSearchDecoder(NgramLM.from_sentences(["A WORD", "ANOTHER WORD"]))
    for other in (Transcriber(tiny_hubert), Transcriber(tiny_wav2vec2, w8a8_plan(), calibration=_calibration()),
                  Transcriber(tiny_wav2vec2, chunk_seconds=10.0), Transcriber(tiny_wav2vec2, decoder=beam)):
        with pytest.raises(ResumeError, match="written by another model, plan, chunking or decoder"):
            transcribe_dataset(other, records, checkpoint=checkpoint)
    (tmp_path / "notes.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(ResumeError, match="not an sq-pt2e transcript checkpoint"):
        transcribe_dataset(Transcriber(tiny_wav2vec2), records, checkpoint=tmp_path / "notes.jsonl")


def test_bad_files_are_recorded_and_skipped_or_stop_the_run_with_the_rest_saved(
    tiny_wav2vec2: torch.nn.Module, tmp_path: Path
) -> None:
    records = _files(tmp_path, 4)
    (tmp_path / "u1.wav").write_bytes(b"RIFF broken")
    transcriber = Transcriber(tiny_wav2vec2)
    checkpoint = tmp_path / "t.jsonl"
    with pytest.raises(AudioError, match="u1.wav: cannot decode"):
        transcribe_dataset(transcriber, records, checkpoint=checkpoint)
    assert [json.loads(line)["id"] for line in checkpoint.read_text().splitlines()[1:]] == ["u0"]
    skipped: list[object] = []
    results = transcribe_dataset(transcriber, records, checkpoint=checkpoint, on_error="skip", on_skip=skipped.append)
    assert [r.id for r in results] == ["u0", "u1", "u2", "u3"]
    assert results[1].error is not None and "u1.wav: cannot decode" in results[1].error and results[1].text == ""
    assert all(r.error is None for r in results if r.id != "u1") and len(skipped) == 1
    assert [r.reference for r in results] == ["REF 0", "REF 1", "REF 2", "REF 3"]
    sf.write(tmp_path / "u1.wav", _waves(1)[0], 16000)  # repaired: a rerun retries it
    again = transcribe_dataset(transcriber, records, checkpoint=checkpoint, on_error="skip", on_skip=None)
    assert all(r.error is None for r in again) and again[0] == results[0]


def test_repeated_ids_cannot_be_resumed(tiny_wav2vec2: torch.nn.Module, tmp_path: Path) -> None:
    records = _files(tmp_path, 1)
    with pytest.raises(AudioError, match=r"utterance id\(s\) \['u0'\] appear more than once"):
        transcribe_dataset(Transcriber(tiny_wav2vec2), records * 2)
