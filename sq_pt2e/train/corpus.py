"""A synthetic English speech corpus from three TTS engines, plus real LJ Speech clips.

Engines: espeak-ng (8 English accents x many voice variants), flite (the awb, rms,
kal16, kal and slt voices) and festival (kal_diphone), each utterance with a random
speaking rate and pitch, some with added noise or reverberation. Text: LJ Speech
sentences (public domain), normalised to the 32-symbol vocabulary (A-Z, apostrophe,
space).

Deterministic for a seed. Train / dev / test are disjoint by sentence *and* by voice
variant: the test set has unseen sentences spoken by unseen voices (espeak-ng variants
and the flite ``slt`` voice never occur in training). Sentences of the real LJ Speech
clips never occur in synthetic dev/test, and the held-out real clips' sentences never
occur in any synthetic split. Audio is written as 16 kHz 16-bit FLAC, with one
manifest per split (``path<TAB>text``): ``train.tsv``, ``dev.tsv``, ``test.tsv`` (all
engines), ``real-train.tsv`` and ``real-test.tsv``, and one per engine and split
(``parts/<split>-<engine>.tsv``, with the voice of each utterance in
``parts/<split>-<engine>.voices.tsv``). Rendering runs in worker processes; files already
rendered are kept, so an interrupted build resumes.

Needs the ``espeak-ng`` binary (Debian package ``espeak-ng``); the flite and festival
parts need ``flite`` and ``festival`` and are skipped, with a message, when missing.
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
from sq_pt2e.atomic import atomic_write_text
from sq_pt2e.data import Utterance, read_manifest, write_manifest
from sq_pt2e.errors import SqPt2eError

__all__ = [
    "ACCENTS",
    "ENGINES",
    "FLITE_SPLIT_VOICES",
    "SAMPLE_RATE",
    "SPLITS",
    "SPLIT_VARIANTS",
    "CorpusSpec",
    "Voice",
    "build_corpus",
    "missing_engines",
    "read_split",
    "render",
    "split_sentences",
]

SAMPLE_RATE = 16000
ENGINES = ("espeak-ng", "flite", "festival")
_BINARIES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "text2wave"}
_DEBIAN_PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival"}

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd", "en-us-nyc")
_TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m5", "m7", "m8", "f1", "f2", "f5", "klatt", "klatt2", "klatt4", "adam", "Alex", "Alicia",
    "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "ed", "edward", "Gene",
    "gustave", "Henrique", "Hugo", "iven", "Jacky", "john", "Lee", "marcelo", "Marco", "Mario", "max", "Michael",
    "michel", "miguel", "Mike", "Mr", "Nguyen", "pablo", "pedro", "quincy", "rob", "robert", "shelby", "travis",
    "norbert", "sandro", "zac", "anika", "grandpa", "grandma",
)  # fmt: skip
SPLITS = ("train", "dev", "test")  # the synthetic splits, in the order their random choices are drawn
# espeak-ng voice variants per split (disjoint)
SPLIT_VARIANTS: dict[str, tuple[str, ...]] = {
    "train": _TRAIN_VARIANTS,
    "dev": ("m6", "f4", "paul", "steph"),
    "test": ("m4", "f3", "klatt3", "david", "linda", "victor"),
}
# flite voices per split (disjoint); festival (kal_diphone) is used for training only
FLITE_SPLIT_VOICES: dict[str, tuple[str, ...]] = {"train": ("awb", "rms", "kal16"), "dev": ("kal",), "test": ("slt",)}
_FEMALE = {"slt"}
# mean F0 (Hz) of flite / festival voices: the female test voice speaks in the upper range; the
# (male) training voices span both ranges, so that pitch alone is no unseen condition at test time
_PITCH_HZ = {"male": (80, 150), "female": (160, 230), "train": (80, 230)}


@dataclass(frozen=True)
class Voice:
    """One rendering setting.

    Attributes:
        accent: espeak-ng language/accent (e.g. ``en-gb-scotland``); ``""`` for other engines.
        variant: espeak-ng variant (``m3``, ``klatt``, ...), flite voice (``awb``), or
            festival voice (``kal_diphone``).
        speed: espeak-ng: words per minute; flite/festival: rate in percent (100 = the
            voice's own rate, 120 = 20 % faster).
        pitch: espeak-ng: 0-99; flite/festival: mean F0 in Hz.
        engine: one of ``ENGINES``.
    """

    accent: str
    variant: str
    speed: int
    pitch: int
    engine: str = "espeak-ng"

    @property
    def name(self) -> str:
        """``accent+variant`` for espeak-ng, ``engine:variant`` otherwise."""
        return f"{self.accent}+{self.variant}" if self.engine == "espeak-ng" else f"{self.engine}:{self.variant}"


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes, seed and augmentation of a corpus.

    Attributes:
        train_sentences: espeak-ng training sentences.
        dev_sentences: dev sentences (shared by the engines' dev voices).
        test_sentences: test sentences (shared by the engines' test voices).
        seed: seeds every random choice.
        noise_probability: share of training utterances with white noise (SNR 10-30 dB).
        real_test_clips: real LJ Speech clips held out for testing (the last ones).
        flite_train_sentences: flite training utterances (sentences not used by espeak-ng first).
        flite_dev_sentences: flite dev utterances (from the dev sentences).
        flite_test_sentences: flite test utterances (from the test sentences).
        festival_train_sentences: festival training utterances.
        reverb_probability: share of flite/festival training utterances with reverberation.
    """

    train_sentences: int = 8000
    dev_sentences: int = 150
    test_sentences: int = 150
    seed: int = 0
    noise_probability: float = 0.3
    real_test_clips: int = 40
    flite_train_sentences: int = 3000
    flite_dev_sentences: int = 40
    flite_test_sentences: int = 50
    festival_train_sentences: int = 1000
    reverb_probability: float = 0.2


def missing_engines() -> list[str]:
    """Engines whose binary is not on ``PATH``, as ``"engine (Debian package pkg)"``."""
    return [f"{engine} (Debian package {_DEBIAN_PACKAGES[engine]})" for engine in ENGINES
            if shutil.which(_BINARIES[engine]) is None]


def _require(engine: str) -> str:
    binary = shutil.which(_BINARIES[engine])
    if binary is None:
        msg = (f"{_BINARIES[engine]} is not installed: `apt-get install {_DEBIAN_PACKAGES[engine]}` "
               f"(Debian/Ubuntu) renders the {engine} part of the corpus")
        raise SqPt2eError(msg)
    return binary


def _synthesize(text: str, voice: Voice, wav_path: str) -> None:
    binary = _require(voice.engine)
    if voice.engine == "espeak-ng":
        command = [binary, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "-w", wav_path, text]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    elif voice.engine == "flite":
        command = [binary, "-voice", voice.variant, "--setf", f"duration_stretch={100.0 / voice.speed:.4f}",
                   "--setf", f"int_f0_target_mean={voice.pitch}", "-t", text, "-o", wav_path]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    elif voice.engine == "festival":
        setup = (f"(begin (voice_{voice.variant}) (Parameter.set 'Duration_Stretch {100.0 / voice.speed:.4f}) "
                 f"(set! int_lr_params (list (list 'target_f0_mean {voice.pitch}) '(target_f0_std 20) "
                 f"'(model_f0_mean 170) '(model_f0_std 34))))")
        subprocess.run([binary, "-eval", setup, "-o", wav_path], input=text.encode(), check=True,
                       capture_output=True, timeout=300)
    else:
        raise SqPt2eError(f"unknown TTS engine {voice.engine!r} (known: {', '.join(ENGINES)})")


def _reverberate(wave: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room response: exponentially decaying noise after a direct path."""
    length = int(rt60 * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    response = rng.standard_normal(length) * np.exp(-6.9 * t / rt60) * 0.3
    response[0] = 1.0
    wet = np.convolve(wave, response)[: wave.size]
    peak = float(np.max(np.abs(wet))) or 1.0
    return (wet * (float(np.max(np.abs(wave))) / peak)).astype(np.float32)


def render(text: str, voice: Voice, *, noise_db: float | None = None, seed: int = 0,
           reverb_rt60: float | None = None) -> np.ndarray:
    """Render ``text`` with ``voice`` as a 16 kHz float32 waveform.

    Args:
        text: what to say.
        voice: engine, voice and prosody.
        noise_db: add white noise at this SNR (dB), or none.
        seed: seeds the noise and the room response.
        reverb_rt60: reverberation time in seconds, or none.

    Returns:
        The waveform (deterministic for the same arguments).

    Raises:
        SqPt2eError: the engine's binary is missing, or an unknown engine.
    """
    import soundfile as sf
    import soxr

    with tempfile.TemporaryDirectory() as tmp:
        wav_path = os.path.join(tmp, "out.wav")
        _synthesize(text, voice, wav_path)
        wave, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="VHQ")
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if reverb_rt60 is not None and wave.size:
        wave = _reverberate(wave, reverb_rt60, np.random.default_rng([seed, 1]))
    if noise_db is not None and wave.size:
        power = float(np.mean(wave**2)) + 1e-12
        wave = wave + rng.normal(0.0, np.sqrt(power / 10 ** (noise_db / 10)), wave.size).astype(np.float32)
    return np.clip(wave, -1.0, 1.0) if reverb_rt60 is not None else wave


def split_sentences(sentences: Sequence[str], spec: CorpusSpec, excluded: set[str]) -> dict[str, list[str]]:
    """Normalise, de-duplicate and shuffle (seeded) the sentences; cut disjoint test / dev / train lists.

    Sentences with fewer than 2 or more than 40 words, or in ``excluded``, are dropped.
    ``train`` holds every remaining sentence (the espeak-ng part uses the first
    ``spec.train_sentences``; other engines continue after them).

    Args:
        sentences: raw text, one sentence per item.
        spec: sizes and seed.
        excluded: normalised sentences that must appear in no split.

    Returns:
        ``{"train": [...], "dev": [...], "test": [...]}``.
    """
    usable, seen = [], set()
    for sentence in sentences:
        text = normalize_transcript(sentence)
        if text and text not in excluded and text not in seen and 2 <= len(text.split()) <= 40:
            seen.add(text)
            usable.append(text)
    random.Random(spec.seed).shuffle(usable)
    test = usable[: spec.test_sentences]
    dev = usable[spec.test_sentences : spec.test_sentences + spec.dev_sentences]
    train = usable[spec.test_sentences + spec.dev_sentences :]
    return {"train": train, "dev": dev, "test": test}


_Job = tuple[str, str, Voice, "float | None", int, "float | None"]


def _render_job(job: _Job) -> str:
    import soundfile as sf

    path, text, voice, noise_db, seed, rt60 = job
    wave = render(text, voice, noise_db=noise_db, seed=seed, reverb_rt60=rt60)
    tmp = f"{path}.tmp.flac"
    sf.write(tmp, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)
    return path


def _espeak_jobs(out: Path, splits: dict[str, list[str]], spec: CorpusSpec) -> dict[str, list[_Job]]:
    """The espeak-ng part (folders ``train/``, ``dev/``, ``test/``)."""
    rng = random.Random(spec.seed + 1)
    jobs: dict[str, list[_Job]] = {}
    for split in SPLITS:
        texts = splits[split][: spec.train_sentences] if split == "train" else splits[split]
        jobs[split] = []
        for index, text in enumerate(texts):
            voice = Voice(rng.choice(ACCENTS), rng.choice(SPLIT_VARIANTS[split]), rng.randint(130, 200),
                          rng.randint(30, 70))
            noise = rng.uniform(10.0, 30.0) if split == "train" and rng.random() < spec.noise_probability else None
            jobs[split].append((str(out / split / f"{split}-{index:05d}.flac"), text, voice, noise,
                                spec.seed * 100003 + index, None))
    return jobs


def _other_engine_jobs(out: Path, splits: dict[str, list[str]], spec: CorpusSpec, engine: str,
                       ) -> dict[str, list[_Job]]:
    """The flite or festival part (folders ``<split>-<engine>/``), its own random stream."""
    rng = random.Random(spec.seed * 7919 + ENGINES.index(engine))
    train_pitch = random.Random(spec.seed * 7919 + ENGINES.index(engine) + 104729)
    if engine == "flite":
        voices = FLITE_SPLIT_VOICES
        sizes = {"train": spec.flite_train_sentences, "dev": spec.flite_dev_sentences,
                 "test": spec.flite_test_sentences}
    else:
        voices = {"train": ("kal_diphone",)}
        sizes = {"train": spec.festival_train_sentences}
    jobs: dict[str, list[_Job]] = {}
    for split, count in sizes.items():
        pool = splits[split]
        if split == "train":  # sentences espeak-ng does not speak first, then the others
            offset = (spec.train_sentences + (spec.flite_train_sentences if engine == "festival" else 0))
            pool = pool[offset:] + pool[:offset]
        texts = pool[:count]
        jobs[split] = []
        for index, text in enumerate(texts):
            variant = rng.choice(voices[split])
            pitch = rng.randint(*_PITCH_HZ["female" if variant in _FEMALE else "male"])
            if split == "train":  # own stream, so that dev/test keep the voices of earlier corpora
                pitch = train_pitch.randint(*_PITCH_HZ["train"])
            voice = Voice("", variant, rng.randint(80, 125), pitch, engine)
            noise = rng.uniform(10.0, 30.0) if split == "train" and rng.random() < spec.noise_probability else None
            rt60 = rng.uniform(0.2, 0.7) if split == "train" and rng.random() < spec.reverb_probability else None
            stem = f"{split}-{engine}-{index:05d}"
            jobs[split].append((str(out / f"{split}-{engine}" / f"{stem}.flac"), text, voice, noise,
                                spec.seed * 100003 + 50000 * (1 + ENGINES.index(engine)) + index, rt60))
    return jobs


def _voice_table(jobs: Sequence[_Job]) -> str:
    """``id, engine, voice, speed, pitch, noise SNR dB, RT60 s`` per utterance (empty: none)."""
    lines = ["id\tengine\tvoice\tspeed\tpitch\tnoise_db\trt60_s"]
    for path, _, voice, noise, _, rt60 in jobs:
        lines.append("\t".join([Path(path).stem, voice.engine, voice.name, str(voice.speed), str(voice.pitch),
                                "" if noise is None else f"{noise:.2f}", "" if rt60 is None else f"{rt60:.3f}"]))
    return "\n".join(lines) + "\n"


def _interleave(parts: list[list[Utterance]], seed: int) -> list[Utterance]:
    """All utterances in a seeded random order (so that any prefix mixes the engines)."""
    merged = [u for part in parts for u in part]
    random.Random(seed).shuffle(merged)
    return merged


def build_corpus(out_dir: str | os.PathLike[str], sentences: Sequence[str], spec: CorpusSpec = CorpusSpec(), *,
                 real_clips: Sequence[Utterance] = (), workers: int = 2, progress: bool = True,
                 engines: Sequence[str] | None = None, splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    """Render the corpus into ``out_dir``.

    Args:
        out_dir: output folder (created).
        sentences: source sentences (raw; normalised here).
        spec: sizes, seed and augmentation.
        real_clips: real recorded utterances; the last ``spec.real_test_clips`` are held
            out as ``real-test``, the others listed as ``real-train``.
        workers: rendering processes.
        progress: show progress bars.
        engines: engines to render (default: espeak-ng plus whichever of flite and
            festival are installed).
        splits: the synthetic splits to render, e.g. ``("dev", "test")`` for the evaluation
            splits alone (in seconds): they are the same to the sample as in the whole corpus.

    Returns:
        ``{split: manifest path}`` for the rendered ``splits`` and, with real clips,
        ``real-train`` and ``real-test``.

    Raises:
        SqPt2eError: espeak-ng (or a requested engine) is not installed.
        ValueError: an unknown split.
    """
    from tqdm import tqdm

    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown corpus split(s) {unknown} (known: {', '.join(SPLITS)})")

    _require("espeak-ng")
    if engines is None:
        engines = [e for e in ENGINES if e == "espeak-ng" or shutil.which(_BINARIES[e]) is not None]
        for missing in missing_engines():
            print(f"skipping {missing}: not installed")
    for engine in engines:
        _require(engine)
    out = Path(out_dir)
    real_test = list(real_clips)[-spec.real_test_clips :] if real_clips and spec.real_test_clips else []
    held_out = {normalize_transcript(u.text) for u in real_test}
    all_real = {normalize_transcript(u.text) for u in real_clips}
    texts = split_sentences(sentences, spec, held_out)
    # Every split's jobs are drawn (the random streams run through them in order), only ``splits`` rendered.
    parts: dict[str, dict[str, list[_Job]]] = {"espeak-ng": _espeak_jobs(out, texts, spec)}
    for engine in engines:
        if engine != "espeak-ng":
            parts[engine] = _other_engine_jobs(out, texts, spec, engine)
    manifests: dict[str, Path] = {}
    per_split: dict[str, list[list[Utterance]]] = {split: [] for split in splits}
    for engine, engine_jobs in parts.items():
        for split, jobs in engine_jobs.items():
            if split not in per_split:
                continue
            if split != "train":  # a sentence spoken by a real training clip is no test of anything
                jobs = [job for job in jobs if job[1] not in all_real]
            for job in jobs[:1]:
                Path(job[0]).parent.mkdir(parents=True, exist_ok=True)
            todo = [job for job in jobs if not Path(job[0]).exists()]
            if todo:
                with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
                    for _ in tqdm(pool.map(_render_job, todo, chunksize=8), total=len(todo),
                                  desc=f"render {split} {engine}", disable=not progress):
                        pass
            utts = [Utterance(Path(p).stem, Path(p), text) for p, text, *_ in jobs]
            write_manifest(out / "parts" / f"{split}-{engine}.tsv", utts)
            atomic_write_text(out / "parts" / f"{split}-{engine}.voices.tsv", _voice_table(jobs))
            per_split[split].append(utts)
    for split, split_parts in per_split.items():
        merged = split_parts[0] + (_interleave(split_parts[1:], spec.seed) if split == "train" else [])
        if split != "train":  # dev/test: engines interleaved, so that a prefix is a fair sample
            merged = _interleave(split_parts, spec.seed)
        manifests[split] = write_manifest(out / f"{split}.tsv", merged)
    if real_clips:
        held = {u.id for u in real_test}
        manifests["real-train"] = write_manifest(out / "real-train.tsv", [u for u in real_clips if u.id not in held])
        manifests["real-test"] = write_manifest(out / "real-test.tsv", real_test)
    return manifests


def read_split(out_dir: str | os.PathLike[str], split: str) -> list[Utterance]:
    """The utterances of one split of a built corpus.

    Args:
        out_dir: the corpus folder.
        split: ``train``, ``dev``, ``test``, ``real-train`` or ``real-test``.
    """
    return read_manifest(Path(out_dir) / f"{split}.tsv")
