"""Load: peak memory of a batch evaluation against the number of files, streamed vs all loaded.

Each measurement runs in a fresh process and reads its peak resident set size
(``VmHWM`` in ``/proc/self/status``). Files are the shipped calibration utterances
with a little seeded noise added, written as FLAC. Run with ``-m slow -s`` to see the
table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sq_pt2e.assets import calibration_files
from sq_pt2e.data import Utterance, write_manifest

_MEASURE = r"""
import json, sys
from pathlib import Path

def peak_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

import torch
torch.set_num_threads(1)
from sq_pt2e.data import read_manifest
from sq_pt2e.models import build_model
from sq_pt2e.transcriber import Transcriber, transcribe_dataset
mode, manifest = sys.argv[1], sys.argv[2]
model = build_model("tiny-wav2vec2", seed=0)
transcriber = Transcriber(model)
transcriber.transcribe(torch.zeros(16000))
base = peak_mib()
if mode == "stream":
    results = transcribe_dataset(transcriber, read_manifest(manifest))
    texts = [r.text for r in results]
else:
    from sq_pt2e.accuracy import transcribe
    from sq_pt2e.baselines import build_method
    from sq_pt2e.inputs import load_source
    texts, _ = transcribe(build_method("float32", model, [], {}), load_source(manifest))
print(json.dumps({"files": len(texts), "base_mib": base, "peak_mib": peak_mib()}))
"""


def _make_dataset(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    sources = [sf.read(path, dtype="float32") for path in calibration_files()]
    records = []
    for i in range(count):
        wave, rate = sources[i % len(sources)]
        noisy = np.clip(wave + rng.normal(0, 1e-3, wave.shape).astype(np.float32), -1, 1)
        sf.write(folder / f"f{i:04d}.flac", noisy, rate)
        records.append(Utterance(f"f{i:04d}", folder / f"f{i:04d}.flac"))
    return write_manifest(folder / f"set{count}.tsv", records)


def measure(mode: str, manifest: Path) -> dict[str, float]:
    """Peak RSS (MiB) of one evaluation in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, mode, str(manifest)], capture_output=True, text=True,
                         check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streamed_evaluation_memory_does_not_grow_with_the_number_of_files(tmp_path: Path) -> None:
    table = []
    for count in (50, 200, 400):
        folder = tmp_path / str(count)
        folder.mkdir()
        manifest = _make_dataset(folder, count)
        seconds = sum(sf.info(str(folder / f"f{i:04d}.flac")).duration for i in range(count))
        row = {"files": count, "audio_s": round(seconds), "stream": measure("stream", manifest),
               "list": measure("list", manifest)}
        table.append(row)
    print("\nfiles | audio s | streamed peak RSS MiB (base) | all-loaded peak RSS MiB (base)")
    for row in table:
        s, a = row["stream"], row["list"]
        print(f"{row['files']} | {row['audio_s']} | {s['peak_mib']:.0f} ({s['base_mib']:.0f}) | "
              f"{a['peak_mib']:.0f} ({a['base_mib']:.0f})")
    stream_growth = table[-1]["stream"]["peak_mib"] - table[0]["stream"]["peak_mib"]
    list_growth = table[-1]["list"]["peak_mib"] - table[0]["list"]["peak_mib"]
    assert all(row["stream"]["files"] == row["files"] for row in table)
    assert stream_growth < 25.0, table
    assert list_growth > 4 * max(stream_growth, 10.0), table  # the measurement sees the difference
