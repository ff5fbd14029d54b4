"""Compiled int8 inference of any audio length: fixed-length buckets, masks, chunks, cache.

Inductor compiles the int8 graph for one fixed input length (a dynamic-shape compile
of the int8 convolutions fails in torch 2.13), so :class:`BucketedInt8Model` keeps one
compiled program per *bucket* length (default 2, 5, 10, 20 and 30 s), quantized and
compiled on first use (or up front), each through
:func:`~sq_pt2e.backends.inductor.compile_inductor`, which checks that the int8
kernels run and that compiled output equals eager int8 output.

An input of ``n`` samples is zero-padded to the smallest bucket of at least ``n``
samples and the logits are cropped to the frames ``n`` samples produce
(:func:`frame_count`). With ``masked=True`` (the default) the program also takes ``n``
and masks the padding as transformers does given an ``attention_mask`` (padded frames
zeroed before the positional convolution, excluded as attention keys), and, for
group-norm CNNs (wav2vec2-base style), normalises the first CNN layer over the valid
frames only, which transformers does not do. Valid frames then see exactly what an
exact-length run sees. ``masked=False`` only zero-pads, which changes the output a
little (attention and the group norm see the padding).

Audio longer than the largest bucket is cut into windows of the largest bucket that
overlap by ``overlap_seconds`` on each side; each window's centre frames are kept.

All buckets use the same activation ranges (:func:`pin_activation_ranges`, computed
once from the calibration audio at its own length), so a bucket's int8 arithmetic
does not depend on its length. With the cache on (the default), each bucket is
compiled ahead of time (AOTInductor, :func:`~sq_pt2e.backends.inductor.compile_aot_package`)
into a ``.pt2`` package in a folder per (model, plan, bucket, threads, CPU, torch
version) under ``cache_dir`` (default ``~/.cache/sq-pt2e/inductor``), next to its
verification report and its verified output on the bucket's example input. A later
process loads the package in milliseconds instead of compiling, after checking that it
reproduces that output; a package that fails to load or to reproduce it is compiled
again (with a warning). Each package holds the model's int8 weights, so the cache keeps
at most ``cache_max_bytes`` (default 4 GiB): after a bucket is written, the entries used
least recently (by any process) are deleted until it fits (:func:`prune_cache`). Without
the cache, buckets compile in memory with ``torch.compile``.

Example:
    >>> runner = BucketedInt8Model(model, plan, calibration_waves, buckets=(2, 5, 10), threads=2)
    >>> logits = runner(wave)            # (1, frames, vocab), wave of any length
    >>> runner.transcribe(wave)
    'HELLO WORLD'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule

from sq_pt2e.asr import greedy_transcript
from sq_pt2e.atomic import atomic_save_tensor, atomic_write_text
from sq_pt2e.audio import MIN_SAMPLES, SAMPLE_RATE
from sq_pt2e.backends.inductor import (
    CompiledInt8,
    InductorReport,
    compile_aot_package,
    compile_inductor,
    fit_plan_to_cpu,
    load_aot_package,
)
from sq_pt2e.errors import AudioError, BackendError, NumericsError
from sq_pt2e.framing import Geometry, Window, check_overlap, cnn_geometry, frame_count, hop_length, overlapping_windows
from sq_pt2e.graph import group_channels
from sq_pt2e.hardware import cpu_info
from sq_pt2e.plan import QuantPlan

__all__ = [
    "DEFAULT_BUCKETS",
    "BucketReport",
    "BucketedInt8Model",
    "MaskedCTCLogits",
    "default_cache_dir",
    "pin_activation_ranges",
    "pin_attention_scales",
    "prune_cache",
    "quantize_program",
]

DEFAULT_BUCKETS: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 30.0)
_PACKAGE, _INFO, _CHECK = "program.pt2", "sq_pt2e_bucket.json", "verified_output.pt"
_CACHE_FORMAT = 2
DEFAULT_CACHE_MAX_BYTES = 4 << 30
# ------------------------------------------------------------------ the masked program
def _masked_group_norm(x: torch.Tensor, lengths: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """Per-channel group norm of ``(batch, channels, frames)`` over the first ``lengths`` frames only."""
    frames = torch.arange(x.shape[-1], device=x.device)
    mask = (frames[None, :] < lengths[:, None]).to(x.dtype)[:, None, :]
    count = lengths.clamp(min=1).to(x.dtype)[:, None, None]
    mean = (x * mask).sum(-1, keepdim=True) / count
    centred = x - mean
    var = (centred * centred * mask).sum(-1, keepdim=True) / count
    normed = centred * torch.rsqrt(var + norm.eps)
    return normed * norm.weight[None, :, None] + norm.bias[None, :, None]


class MaskedCTCLogits(nn.Module):
    """(zero-padded waveform, valid samples) -> CTC logits equal, on valid frames, to an exact-length run.

    Layer names equal the ``*ForCTC`` model's ``named_modules()`` (as
    :class:`~sq_pt2e.models.CTCLogits`), so plans apply unchanged. The valid frame
    count of each CNN layer is computed in the graph from ``num_samples``; the first
    layer's group norm (wav2vec2 style) is taken over valid frames only, and the
    Transformer gets the frame mask as its ``attention_mask``.

    Args:
        model: a ``*ForCTC`` model or a :class:`~sq_pt2e.models.CTCLogits` wrapper (weight norm folded).

    Raises:
        BackendError: the CNN's group norm has fewer groups than channels (not supported).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone_name = model.backbone_name if hasattr(model, "backbone_name") else model.base_model_prefix
        backbone = getattr(model, self.backbone_name)
        self.add_module(self.backbone_name, backbone)
        self.lm_head = model.lm_head
        self.geometry = tuple(zip(backbone.config.conv_kernel, backbone.config.conv_stride))
        first = backbone.feature_extractor.conv_layers[0]
        norm = getattr(first, "layer_norm", None)
        self.group_norm_first = isinstance(norm, nn.GroupNorm)
        if self.group_norm_first and norm.num_groups != norm.num_channels:
            raise BackendError(f"masked group norm needs one group per channel, got {norm.num_groups} groups "
                               f"for {norm.num_channels} channels")

    def forward(self, input_values: torch.Tensor, num_samples: torch.Tensor) -> torch.Tensor:
        backbone = getattr(self, self.backbone_name)
        x = input_values[:, None]
        lengths = num_samples
        for index, layer in enumerate(backbone.feature_extractor.conv_layers):
            kernel, stride = self.geometry[index]
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            if index == 0 and self.group_norm_first:
                x = layer.activation(_masked_group_norm(layer.conv(x), lengths, layer.layer_norm))
            else:
                x = layer(x)
        features = x.transpose(1, 2)
        frame_mask = torch.arange(features.shape[1], device=x.device)[None, :] < lengths[:, None]
        projected = backbone.feature_projection(features)
        hidden = projected[0] if isinstance(projected, tuple) else projected
        hidden = backbone.encoder(hidden, attention_mask=frame_mask)[0]
        return self.lm_head(hidden)


# ------------------------------------------------------------------ quantization
def pin_activation_ranges(model: nn.Module, plan: QuantPlan, calibration: Sequence[torch.Tensor]) -> QuantPlan:
    """``plan`` with a fixed ``act_range`` for every quantized layer, so every bucket quantizes alike.

    Layers whose plan already fixes ``act_range`` keep it; the others get the range
    their calibration method gives on ``calibration`` (run at each waveform's own
    length, unpadded), exactly as the PT2E observer would.

    Raises:
        PlanError: the plan names layers the model lacks, or needs calibration and none was given.
    """
    from sq_pt2e.errors import PlanError
    from sq_pt2e.simulate import collect_statistics, plan_layer_quants, quantizable_modules

    modules = quantizable_modules(model)
    plan.check_names([m.name for m in modules])
    resolved = {m.name: plan.resolve(m.name, m.op) for m in modules}
    if all(layer.skip or layer.act_range is not None for layer in resolved.values()):
        statistics = {}
    elif not calibration:
        raise PlanError("the plan has layers without a fixed act_range: pass calibration waveforms")
    else:
        statistics = collect_statistics(model, [w if w.ndim == 2 else w[None] for w in calibration])
    quants = plan_layer_quants(model, plan.with_float_attention(), statistics)  # attention: pin_attention_scales
    layers = tuple(
        dataclasses.replace(resolved[m.name], name=m.name, op=None, act_range=quants[m.name].act_range)
        if m.name in quants else dataclasses.replace(resolved[m.name], name=m.name, op=None)
        for m in modules
    )
    return dataclasses.replace(plan, layers=layers)


def pin_attention_scales(model: nn.Module, plan: QuantPlan, calibration: Sequence[torch.Tensor]) -> QuantPlan:
    """``plan`` with fixed int8 attention scales (``QuantPlan.attention_scales``), so every bucket uses the same.

    A plan with ``attention="int8"`` and no fixed scales gets those the attention observers
    give on ``calibration`` (each waveform at its own length, unpadded, one dynamic-length
    program), as they would calibrating a fixed-length graph; other plans are returned as they are.

    Raises:
        PlanError: int8 attention to calibrate and no calibration waveforms.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from sq_pt2e.annotators import observed_attention_scales
    from sq_pt2e.errors import PlanError
    from sq_pt2e.export import export_speech_model
    from sq_pt2e.pipeline import calibrate
    from sq_pt2e.quantizer import StableQuantQuantizer

    if plan.attention != "int8" or plan.attention_scales:
        return plan
    if not calibration:
        raise PlanError("the plan quantizes attention without fixed attention_scales: pass calibration waveforms")
    waves = [w if w.ndim == 2 else w[None] for w in calibration]
    exported = export_speech_model(model, waves[0], dynamic_time=True)
    prepared = prepare_pt2e(exported.module(), StableQuantQuantizer(plan))
    calibrate(prepared, waves)
    return dataclasses.replace(plan, attention_scales=observed_attention_scales(prepared))


def quantize_program(program: nn.Module, plan: QuantPlan, example: tuple[torch.Tensor, ...]) -> GraphModule:
    """Export ``program`` at ``example``'s shapes, quantize it with a pinned ``plan`` and convert it.

    One observer pass on ``example`` suffices because every range is fixed
    (:func:`pin_activation_ranges`); ``plan`` is already fitted to the CPU.

    Raises:
        Int8NotUsedError: a layer the plan quantizes is float after conversion.
    """
    from sq_pt2e.passes.remove_trivial_attention_mask import RemoveTrivialAttentionMaskPass
    from sq_pt2e.pipeline import quantize_exported

    with torch.no_grad():
        exported = torch.export.export(program, example)
    RemoveTrivialAttentionMaskPass()(exported.graph_module)
    return quantize_exported(exported, [example], plan=plan, fit_to_cpu=False).converted


# ------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sq-pt2e/inductor``, or ``~/.cache/sq-pt2e/inductor``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sq-pt2e" / "inductor"


def _fingerprint(model: nn.Module, plan: QuantPlan, masked: bool) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(plan.to_json().encode())
    digest.update(f"masked={masked} torch={torch.__version__} cpu={cpu_info().summary()}".encode())
    return digest.hexdigest()


def _entry_use(folder: Path) -> tuple[float, int] | None:
    """(last use, bytes) of a cache entry; ``None`` if ``folder`` is none (or another process deleted it meanwhile)."""
    try:
        info = (folder / _INFO).stat()
        if not stat.S_ISREG(info.st_mode):
            return None
        return info.st_mtime, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    except OSError:
        return None


def prune_cache(root: str | os.PathLike[str], max_bytes: int,
                keep: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """Delete the least recently used bucket entries under ``root`` until they total at most ``max_bytes``.

    An entry is a folder holding a bucket's ``sq_pt2e_bucket.json``; its last use is that
    file's modification time (a load from the cache touches it). Folders in ``keep`` and
    anything else under ``root`` are never deleted. Returns the deleted folders.
    """
    kept = {Path(path).resolve() for path in keep}
    folders = list(Path(root).iterdir()) if Path(root).is_dir() else []
    uses = {folder: use for folder in folders if (use := _entry_use(folder)) is not None}
    entries = sorted(uses, key=lambda folder: uses[folder][0])
    total = sum(size for _, size in uses.values())
    deleted = []
    for folder in entries:
        if total <= max_bytes:
            break
        if folder.resolve() in kept:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= uses[folder][1]
        deleted.append(folder)
    return deleted


# ------------------------------------------------------------------ the runner
@dataclass(frozen=True)
class BucketReport:
    """How one bucket was built: its length, timings, cache folder and the inductor check."""

    seconds: float
    samples: int
    frames: int
    quantize_seconds: float
    compile_seconds: float
    cache_dir: str
    inductor: InductorReport
    from_cache: bool = False
    """Loaded from the cache folder's package (``compile_seconds`` is then the load and check time)."""


class BucketedInt8Model:
    """Int8 inference compiled with inductor for audio of any length (buckets, masks, chunks).

    Args:
        model: a ``*ForCTC`` wav2vec2/HuBERT model (or CTCLogits); a private folded copy is kept.
        plan: the quantization plan (default: W8A8 everywhere); fitted to the CPU
            (``fit_plan_to_cpu``) and its activation ranges pinned once.
        calibration: ``(1, samples)`` normalised waveforms for layers without a fixed range.
        buckets: bucket lengths in seconds (sorted, unique; each at least ``MIN_SAMPLES``).
        threads: intra-op threads, set before every compile (inductor bakes them in).
        masked: pass the valid length into the program and mask the padding (default);
            ``False`` only zero-pads.
        overlap_seconds: context on each side of a window when chunking long audio.
        cache_dir: root of the compile cache (default :func:`default_cache_dir`).
        cache: ``False`` leaves inductor's cache settings alone (nothing written under ``cache_dir``).
        cache_max_bytes: after writing a bucket, delete the least recently used entries under
            ``cache_dir`` (never the buckets this runner has built or loaded) until the cache is at
            most this size.
        compile_now: bucket lengths (seconds) to compile at once; the rest compile on first use.
        min_cosine: the least compiled-vs-eager int8 cosine every bucket must reach.

    Raises:
        AudioError: a bucket is shorter than the CNN's receptive field, or the overlap
            leaves no centre in the largest bucket.
        PlanError: see :func:`pin_activation_ranges`.
    """

    def __init__(self, model: nn.Module, plan: QuantPlan | None = None, calibration: Sequence[torch.Tensor] = (),
                 *, buckets: Sequence[float] = DEFAULT_BUCKETS, threads: int | None = None, masked: bool = True,
                 overlap_seconds: float = 1.0, cache_dir: str | os.PathLike[str] | None = None,
                 cache: bool = True, cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES, compile_now: Sequence[float] = (),
                 min_cosine: float = 0.999) -> None:
        from sq_pt2e.models.build import to_ctc_logits
        from sq_pt2e.passes.fold_weight_norm import folded_copy

        self._model = folded_copy(to_ctc_logits(model)).eval()
        self.geometry = cnn_geometry(self._model)
        self.hop = hop_length(self.geometry)
        self.bucket_samples = _check_buckets(buckets)
        self.overlap_samples = int(round(overlap_seconds * SAMPLE_RATE)) // self.hop * self.hop
        self.step_samples = (self.bucket_samples[-1] - 2 * self.overlap_samples) // self.hop * self.hop
        check_overlap(self.overlap_samples, self.geometry, name=f"overlap_seconds={overlap_seconds!r}")
        if self.step_samples <= 0:
            raise AudioError(f"overlap_seconds={overlap_seconds!r} on each side leaves no centre in the largest "
                             f"bucket ({self.bucket_samples[-1] / SAMPLE_RATE:g} s)")
        self.threads = threads if threads is not None else torch.get_num_threads()
        self.masked, self.min_cosine = masked, min_cosine
        fitted, _ = fit_plan_to_cpu(plan if plan is not None else QuantPlan(),
                                    group_channels=group_channels(self._model))
        pinned = pin_activation_ranges(self._model, fitted, calibration)
        self.plan = pin_attention_scales(self._model, pinned, calibration)
        self._program = MaskedCTCLogits(self._model).eval() if masked else self._model
        self._fingerprint = _fingerprint(self._model, self.plan, masked)
        self.cache_root: Path | None = None
        self.cache_max_bytes = cache_max_bytes
        if cache:
            self.cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._compiled: dict[int, CompiledInt8] = {}
        self.reports: dict[int, BucketReport] = {}
        self._lock = threading.Lock()
        for seconds in compile_now:
            self.compile(seconds)

    # ------------------------------------------------------------------ buckets
    def bucket_for(self, samples: int) -> int:
        """The smallest bucket (in samples) holding ``samples``; the largest if none does."""
        for bucket in self.bucket_samples:
            if bucket >= samples:
                return bucket
        return self.bucket_samples[-1]

    def compile(self, seconds: float) -> BucketReport:
        """Quantize and compile the bucket of ``seconds`` (if not yet done); returns its report.

        Raises:
            AudioError: ``seconds`` is not one of the buckets.
            Int8NotUsedError, NumericsMismatchError, BackendError: from ``compile_inductor``.
        """
        samples = int(round(seconds * SAMPLE_RATE))
        if samples not in self.bucket_samples:
            known = ", ".join(f"{b / SAMPLE_RATE:g}" for b in self.bucket_samples)
            raise AudioError(f"no bucket of {seconds:g} s (buckets: {known} s)")
        self._ensure(samples)
        return self.reports[samples]

    def _ensure(self, samples: int) -> CompiledInt8:
        with self._lock:
            if samples not in self._compiled:
                self._compiled[samples] = self._build(samples)
            return self._compiled[samples]

    def _example(self, samples: int) -> tuple[torch.Tensor, ...]:
        """A deterministic padded input of the bucket: seeded noise over 80 % of it, zeros after."""
        generator = torch.Generator().manual_seed(samples)
        valid = max(MIN_SAMPLES, int(samples * 0.8)) if self.masked else samples
        wave = torch.zeros(1, samples)
        wave[0, :valid] = torch.randn(valid, generator=generator)
        return (wave, torch.tensor([valid])) if self.masked else (wave,)

    def _build(self, samples: int) -> CompiledInt8:
        example = self._example(samples)
        cache = self._cache_dir(samples)
        cached = None if cache is None else self._load_cached(cache, samples, example)
        if cached is not None:
            return cached
        start = time.perf_counter()
        converted = quantize_program(self._program, self.plan, example)
        quantize_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if cache is None:
            # int8 attention as int8 GEMMs, as the cached packages run it (the same numerics either way)
            compiled = compile_inductor(converted, example, threads=self.threads, min_cosine=self.min_cosine,
                                        fused_attention=False)
        else:
            compiled = compile_aot_package(converted, example, cache / _PACKAGE, threads=self.threads,
                                           min_cosine=self.min_cosine)
        compile_seconds = time.perf_counter() - start
        if cache is not None:
            atomic_save_tensor(cache / _CHECK, compiled.verified_output)
            info = {"format": _CACHE_FORMAT, "bucket_samples": samples, "threads": self.threads,
                    "masked": self.masked, "torch": torch.__version__, "fingerprint": self._fingerprint,
                    "compile_seconds": round(compile_seconds, 3), "inductor": dataclasses.asdict(compiled.report)}
            atomic_write_text(cache / _INFO, json.dumps(info, indent=2) + "\n")
            in_use = [report.cache_dir for report in self.reports.values() if report.cache_dir]
            for folder in prune_cache(cache.parent, self.cache_max_bytes, keep=[cache, *in_use]):
                warnings.warn(f"deleted the least recently used compiled bucket {folder} (cache over "
                              f"{self.cache_max_bytes / 2**30:g} GiB)", stacklevel=4)
        self.reports[samples] = BucketReport(samples / SAMPLE_RATE, samples, frame_count(samples, self.geometry),
                                             quantize_seconds, compile_seconds, str(cache or ""), compiled.report)
        return compiled

    def _load_cached(self, cache: Path, samples: int, example: tuple[torch.Tensor, ...]) -> CompiledInt8 | None:
        """The bucket's package from ``cache`` if it is there, belongs to this model and plan and reproduces
        its verified output on ``example``; else ``None`` (with a warning when a package was there but failed)."""
        if not all((cache / name).is_file() for name in (_INFO, _PACKAGE, _CHECK)):
            return None
        start = time.perf_counter()
        try:
            info = json.loads((cache / _INFO).read_text())
            if info.get("format") != _CACHE_FORMAT or info.get("fingerprint") != self._fingerprint:
                return None
            torch.set_num_threads(self.threads)
            program = load_aot_package(cache / _PACKAGE)
            with torch.no_grad():
                output = program(*example)
            expected = torch.load(cache / _CHECK, weights_only=True)
            if output.shape != expected.shape or not torch.allclose(output, expected, rtol=1e-4, atol=1e-4):
                raise NumericsError("its output on the bucket's example differs from the verified output")
            report = InductorReport(**info["inductor"])
            os.utime(cache / _INFO)  # marks the entry as recently used for prune_cache
        except Exception as exc:  # a broken cache entry is rebuilt, never served
            warnings.warn(f"compiling the {samples / SAMPLE_RATE:g} s bucket again: the cached package in {cache} "
                          f"failed ({type(exc).__name__}: {exc})", stacklevel=4)
            return None
        self.reports[samples] = BucketReport(samples / SAMPLE_RATE, samples, frame_count(samples, self.geometry), 0.0,
                                             time.perf_counter() - start, str(cache), report, from_cache=True)
        return CompiledInt8(program, report, output)

    def _cache_dir(self, samples: int) -> Path | None:
        if self.cache_root is None:
            return None
        key = hashlib.sha256(f"{self._fingerprint} samples={samples} threads={self.threads}".encode()).hexdigest()
        return self.cache_root / key[:24]

    # ------------------------------------------------------------------ inference
    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """``(1, frames, vocab)`` int8 logits of a normalised 16 kHz ``(samples,)`` or ``(1, samples)`` waveform.

        Raises:
            AudioError: wrong shape, NaN/Inf samples, or shorter than the CNN's receptive field.
            NumericsError: the compiled model produced NaN/Inf logits.
        """
        samples = _as_samples(wave, self.geometry)
        if samples.numel() <= self.bucket_samples[-1]:
            logits = self._run_padded(samples)
        else:
            logits = self._run_chunked(samples)
        if not bool(torch.isfinite(logits).all()):
            bad = int((~torch.isfinite(logits)).sum())
            raise NumericsError(f"the compiled int8 model produced {bad} NaN/Inf logit(s)")
        return logits

    def transcribe(self, wave: torch.Tensor) -> str:
        """Greedy CTC transcript of a normalised 16 kHz waveform of any length."""
        return greedy_transcript(self(wave)[0])

    def _run_padded(self, samples: torch.Tensor) -> torch.Tensor:
        n = samples.numel()
        bucket = self.bucket_for(n)
        compiled = self._ensure(bucket)
        padded = torch.zeros(1, bucket)
        padded[0, :n] = samples
        logits = compiled(padded, torch.tensor([n])) if self.masked else compiled(padded)
        return logits[:, : frame_count(n, self.geometry)]

    def windows(self, samples: int) -> list[Window]:
        """Chunking of a long input: centres of ``step_samples``, ``overlap_samples`` of context each side."""
        return overlapping_windows(samples, self.geometry, step=self.step_samples, overlap=self.overlap_samples)

    def _run_chunked(self, samples: torch.Tensor) -> torch.Tensor:
        pieces = []
        for start, end, first, last in self.windows(samples.numel()):
            logits = self._run_padded(samples[start:end])
            offset = start // self.hop
            if last - offset > logits.shape[1]:
                raise BackendError(f"window [{start}, {end}) gave {logits.shape[1]} frames, needed {last - offset}")
            pieces.append(logits[:, first - offset : last - offset])
        return torch.cat(pieces, dim=1)


def _check_buckets(buckets: Sequence[float]) -> tuple[int, ...]:
    samples = [int(round(float(s) * SAMPLE_RATE)) for s in buckets]
    if not samples:
        raise AudioError("buckets: give at least one bucket length in seconds")
    if samples != sorted(set(samples)):
        raise AudioError(f"buckets must be increasing and distinct, got {list(buckets)}")
    if samples[0] < MIN_SAMPLES:
        raise AudioError(f"bucket of {buckets[0]!r} s is shorter than the CNN's receptive field "
                         f"({MIN_SAMPLES} samples)")
    return tuple(samples)


def _as_samples(wave: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    if not isinstance(wave, torch.Tensor):
        wave = torch.as_tensor(wave)
    if wave.ndim == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.ndim != 1:
        raise AudioError(f"expected a (samples,) or (1, samples) waveform, got shape {tuple(wave.shape)}")
    if not wave.is_floating_point():
        raise AudioError(f"expected float samples, got dtype {wave.dtype}")
    if frame_count(wave.numel(), geometry) == 0:
        raise AudioError(f"waveform of {wave.numel()} samples is shorter than the CNN's receptive field")
    if not bool(torch.isfinite(wave).all()):
        raise AudioError("waveform has NaN/Inf samples")
    return wave.float().contiguous()
