"""Where the CNN feature encoder puts its frames, and overlapping windows over long audio.

wav2vec2 / HuBERT turn samples into frames with strided convolutions: frame ``g``
sees samples ``[g * hop, g * hop + receptive_field)``. A long input is cut into
windows that start on frame boundaries and overlap their neighbours by some
context on each side; each window keeps only the frames of its centre, so every
frame of the input is computed exactly once, with context on both sides, and a
word that straddles a window boundary is still seen whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from sq_pt2e.errors import AudioError, BackendError

__all__ = [
    "Geometry",
    "LengthRange",
    "Window",
    "centre_window",
    "check_overlap",
    "cnn_geometry",
    "frame_count",
    "hop_length",
    "overlapping_windows",
    "receptive_field",
    "speech_config",
]

Geometry = tuple[tuple[int, int], ...]  # (kernel, stride) of each CNN layer


def speech_config(model: nn.Module) -> Any:
    """The config of a wav2vec2/HuBERT model, or of the backbone a wrapper names (``backbone_name``); else None."""
    config = getattr(model, "config", None)
    if config is None:
        backbone = getattr(model, getattr(model, "backbone_name", ""), None)
        config = getattr(backbone, "config", None)
    return config


def cnn_geometry(model: nn.Module) -> Geometry:
    """The ``(kernel, stride)`` of each CNN feature-encoder layer, from the model's config.

    Raises:
        BackendError: the model has no wav2vec2/HuBERT config.
    """
    config = speech_config(model)
    if config is None or not hasattr(config, "conv_kernel"):
        raise BackendError(f"{type(model).__name__} has no wav2vec2/HuBERT config (conv_kernel, conv_stride)")
    return tuple(zip(config.conv_kernel, config.conv_stride))


def frame_count(samples: int, geometry: Geometry) -> int:
    """Frames the CNN produces from ``samples`` samples.

    ``L = (L - kernel) // stride + 1`` per layer; 0 if the input is too short.
    """
    length = int(samples)
    for kernel, stride in geometry:
        if length < kernel:
            return 0
        length = (length - kernel) // stride + 1
    return length


def hop_length(geometry: Geometry) -> int:
    """Samples between consecutive frames (the product of the strides)."""
    hop = 1
    for _, stride in geometry:
        hop *= stride
    return hop


def receptive_field(geometry: Geometry) -> int:
    """Samples one frame sees."""
    field = 1
    for kernel, stride in reversed(geometry):
        field = (field - 1) * stride + kernel
    return field


def check_overlap(overlap_samples: int, geometry: Geometry, *, name: str = "overlap_seconds") -> None:
    """Refuse an overlap too short for the last frame of a window centre to see all its samples.

    Raises:
        AudioError: ``overlap_samples`` is below ``receptive_field - hop``.
    """
    context = receptive_field(geometry) - hop_length(geometry)
    if overlap_samples < context:
        raise AudioError(f"{name}: an overlap of {overlap_samples} samples is less than the {context} samples a "
                         "frame reaches past its hop")


@dataclass(frozen=True)
class LengthRange:
    """The input lengths a dynamic-length program accepts: ``hop * frames + context`` samples.

    Those are the lengths whose last samples complete a frame (``context`` is the receptive
    field minus the hop), for ``min_frames <= frames <= max_frames``. A program exported over
    them runs any length in between after :meth:`aligned` drops the trailing samples (fewer
    than a hop) that no output frame sees.
    """

    hop: int
    context: int
    min_frames: int
    max_frames: int

    @classmethod
    def up_to(cls, max_samples: int, geometry: Geometry, *, min_frames: int = 2) -> LengthRange:
        """Every aligned length of at least ``min_frames`` frames and at most ``max_samples`` samples.

        Raises:
            AudioError: ``max_samples`` gives fewer than ``min_frames`` frames.
        """
        frames = frame_count(max_samples, geometry)
        if frames < min_frames:
            raise AudioError(f"a maximum length of {max_samples} samples gives {frames} frame(s); a dynamic-length "
                             f"program needs at least {min_frames}")
        hop = hop_length(geometry)
        return cls(hop, receptive_field(geometry) - hop, min_frames, frames)

    @property
    def min_samples(self) -> int:
        return self.hop * self.min_frames + self.context

    @property
    def max_samples(self) -> int:
        return self.hop * self.max_frames + self.context

    def aligned(self, samples: int) -> int:
        """The longest accepted length not above ``samples``.

        Raises:
            AudioError: ``samples`` is outside ``[min_samples, max_samples + hop)``.
        """
        if not self.min_samples <= samples < self.max_samples + self.hop:
            raise AudioError(f"this program takes {self.min_samples} to {self.max_samples} samples "
                             f"({self.min_samples / 16000:.2f} to {self.max_samples / 16000:.2f} s at 16 kHz); got "
                             f"{samples}: chunk longer audio or export with a larger maximum")
        return self.hop * ((samples - self.context) // self.hop) + self.context

    def cut(self, wave: torch.Tensor) -> torch.Tensor:
        """``wave`` (``(..., samples)``) without the trailing samples beyond :meth:`aligned` length."""
        return wave[..., : self.aligned(wave.shape[-1])]

    def export_dim(self) -> Any:
        """The ``torch.export`` dynamic size of the samples axis: ``hop * Dim("frames") + context``."""
        from torch.export import Dim

        return self.hop * Dim("frames", min=self.min_frames, max=self.max_frames) + self.context


class Window(NamedTuple):
    """One window of a long input: samples ``[start, end)``, global frames ``[first, last)`` kept.

    The window's own frame ``j`` is global frame ``start // hop + j``.
    """

    start: int
    end: int
    first: int
    last: int


def centre_window(core_start: int, core_end: int, geometry: Geometry, *, before: int, after: int,
                  final: bool) -> Window:
    """The window around the centre ``[core_start, core_end)`` with ``before``/``after`` samples of context.

    It keeps the frames that start in the centre; the ``final`` centre also keeps the
    frames its own end completes (a non-final centre leaves them to the next window).
    """
    hop = hop_length(geometry)
    last = frame_count(core_end, geometry) if final else core_end // hop
    return Window(core_start - before, core_end + after, core_start // hop, last)


def overlapping_windows(samples: int, geometry: Geometry, *, step: int, overlap: int) -> list[Window]:
    """Windows over ``samples`` samples: centres of ``step`` samples, ``overlap`` samples of context each side.

    Args:
        samples: input length.
        geometry: the CNN's ``(kernel, stride)`` layers.
        step: centre length; a positive multiple of the hop.
        overlap: context on each side; a multiple of the hop, at least the receptive field minus the hop.

    Returns:
        Windows in order; their kept frames are ``0 .. frame_count(samples) - 1``, each once.

    Raises:
        AudioError: ``step`` or ``overlap`` is not a usable multiple of the hop.
    """
    hop = hop_length(geometry)
    if step <= 0 or step % hop or overlap < 0 or overlap % hop:
        raise AudioError(f"windows need a positive step and an overlap in multiples of the {hop}-sample hop "
                         f"(got step {step}, overlap {overlap})")
    check_overlap(overlap, geometry)
    windows = []
    core = 0
    while core < samples:
        core_end = min(core + step, samples)
        window = centre_window(core, core_end, geometry, before=min(overlap, core),
                               after=min(overlap, samples - core_end), final=core_end >= samples)
        if window.last > window.first:
            windows.append(window)
        core = core_end
    return windows
