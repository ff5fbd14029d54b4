"""A synthetic English speech corpus rendered with espeak-ng, plus real LJSpeech clips.

Deterministic for a seed. Train / dev / test are disjoint by sentence *and* by voice
variant, so the test set has unseen sentences spoken by unseen voices. Each
utterance gets a random accent, variant, speed and pitch; optional noise is mixed in.
Audio is written as 16 kHz FLAC with one manifest per split (``path<TAB>text``).

Needs the ``espeak-ng`` binary (Debian package ``espeak-ng``).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sq_pt2e.asr import normalize_transcript
from sq_pt2e.data import Utterance, read_manifest, write_manifest
from sq_pt2e.errors import SqPt2eError

__all__ = [
    "ACCENTS",
    "SPLIT_VARIANTS",
    "CorpusSpec",
    "Voice",
    "build_corpus",
    "read_split",
    "render",
    "split_sentences",
]

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd", "en-us-nyc")
_TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m5", "m7", "m8", "f1", "f2", "f5", "klatt", "klatt2", "klatt4", "adam", "Alex", "Alicia",
    "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "ed", "edward", "Gene",
    "gustave", "Henrique", "Hugo", "iven", "Jacky", "john", "Lee", "marcelo", "Marco", "Mario", "max", "Michael",
    "michel", "miguel", "Mike", "Mr", "Nguyen", "pablo", "pedro", "quincy", "rob", "robert", "shelby", "travis",
    "norbert", "sandro", "zac", "anika", "grandpa", "grandma",
)  # fmt: skip
SPLIT_VARIANTS: dict[str, tuple[str, ...]] = {
    "train": _TRAIN_VARIANTS,
    "dev": ("m6", "f4", "paul", "steph"),
    "test": ("m4", "f3", "klatt3", "david", "linda", "victor"),
}
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Voice:
    """One espeak-ng rendering setting."""

    accent: str
    variant: str
    speed: int  # words per minute
    pitch: int  # 0-99

    @property
    def name(self) -> str:
        return f"{self.accent}+{self.variant}"


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes and seed of a corpus."""

    train_sentences: int = 8000
    dev_sentences: int = 150
    test_sentences: int = 150
    seed: int = 0
    noise_probability: float = 0.3
    real_test_clips: int = 40


def _require_espeak() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SqPt2eError("espeak-ng is not installed: `apt-get install espeak-ng` (Debian/Ubuntu) renders the corpus")
    return binary


def render(text: str, voice: Voice, *, noise_db: float | None = None, seed: int = 0) -> np.ndarray:
    """Render ``text`` with ``voice`` as a 16 kHz float32 waveform (optionally with white noise at SNR dB)."""
    import soundfile as sf
    import soxr

    binary = _require_espeak()
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(
            [binary, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "-w", tmp.name, text],
            check=True, capture_output=True, timeout=120,
        )
        wave, rate = sf.read(tmp.name, dtype="float32")
    wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="VHQ").astype(np.float32)
    if noise_db is not None and wave.size:
        rng = np.random.default_rng(seed)
        power = float(np.mean(wave**2)) + 1e-12
        wave = wave + rng.normal(0.0, np.sqrt(power / 10 ** (noise_db / 10)), wave.size).astype(np.float32)
    return wave


def split_sentences(sentences: Sequence[str], spec: CorpusSpec, excluded: set[str]) -> dict[str, list[str]]:
    """Shuffle (seeded) the usable sentences and cut disjoint test / dev / train lists."""
    usable, seen = [], set()
    for sentence in sentences:
        text = normalize_transcript(sentence)
        if text and text not in excluded and text not in seen and 2 <= len(text.split()) <= 40:
            seen.add(text)
            usable.append(text)
    random.Random(spec.seed).shuffle(usable)
    test = usable[: spec.test_sentences]
    dev = usable[spec.test_sentences : spec.test_sentences + spec.dev_sentences]
    train = usable[spec.test_sentences + spec.dev_sentences :][: spec.train_sentences]
    return {"train": train, "dev": dev, "test": test}


def _render_job(job: tuple[str, str, Voice, float | None, int]) -> tuple[str, str]:
    import soundfile as sf

    path, text, voice, noise_db, seed = job
    sf.write(path, render(text, voice, noise_db=noise_db, seed=seed), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return path, text


def build_corpus(out_dir: str | os.PathLike[str], sentences: Sequence[str], spec: CorpusSpec = CorpusSpec(), *,
                 real_clips: Sequence[Utterance] = (), workers: int = 2, progress: bool = True) -> dict[str, Path]:
    """Render the corpus into ``out_dir``; returns ``{split: manifest path}``.

    Splits: ``train``, ``dev``, ``test`` (synthetic) and, when ``real_clips`` are given,
    ``real-train`` / ``real-test`` (the last ``spec.real_test_clips`` clips held out).
    Files already rendered are kept, so an interrupted build resumes.
    """
    from tqdm import tqdm

    _require_espeak()
    out = Path(out_dir)
    real_test = list(real_clips)[-spec.real_test_clips :] if real_clips else []
    excluded = {normalize_transcript(u.text) for u in real_test}
    splits = split_sentences(sentences, spec, excluded)
    rng = random.Random(spec.seed + 1)
    manifests = {}
    for split, texts in splits.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        jobs = []
        for index, text in enumerate(texts):
            voice = Voice(rng.choice(ACCENTS), rng.choice(SPLIT_VARIANTS[split]), rng.randint(130, 200),
                          rng.randint(30, 70))
            noise = rng.uniform(10.0, 30.0) if split == "train" and rng.random() < spec.noise_probability else None
            jobs.append((str(folder / f"{split}-{index:05d}.flac"), text, voice, noise, spec.seed * 100003 + index))
        todo = [job for job in jobs if not Path(job[0]).exists()]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in tqdm(pool.map(_render_job, todo, chunksize=16), total=len(todo), desc=f"render {split}",
                          disable=not progress):
                pass
        manifests[split] = write_manifest(out / f"{split}.tsv", [Utterance(Path(p).stem, Path(p), t)
                                                                 for p, t, *_ in jobs])
    if real_clips:
        held = {u.id for u in real_test}
        manifests["real-train"] = write_manifest(out / "real-train.tsv",
                                                 [u for u in real_clips if u.id not in held])
        manifests["real-test"] = write_manifest(out / "real-test.tsv", real_test)
    return manifests


def read_split(out_dir: str | os.PathLike[str], split: str) -> list[Utterance]:
    """The utterances of one split of a built corpus."""
    return read_manifest(Path(out_dir) / f"{split}.tsv")
