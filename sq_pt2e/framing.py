"""Where the CNN feature encoder puts its frames, and overlapping windows over long audio.

wav2vec2 / HuBERT turn samples into frames with strided convolutions: frame ``g``
sees samples ``[g * hop, g * hop + receptive_field)``. A long input is cut into
windows that start on frame boundaries and overlap their neighbours by some
context on each side; each window keeps only the frames of its centre, so every
frame of the input is computed exactly once, with context on both sides, and a
word that straddles a window boundary is still seen whole.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from sq_pt2e.errors import AudioError, BackendError

__all__ = [
    "Geometry",
    "Window",
    "centre_window",
    "check_overlap",
    "cnn_geometry",
    "frame_count",
    "hop_length",
    "overlapping_windows",
    "receptive_field",
]

Geometry = tuple[tuple[int, int], ...]  # (kernel, stride) of each CNN layer


def cnn_geometry(model: nn.Module) -> Geometry:
    """The ``(kernel, stride)`` of each CNN feature-encoder layer, from the model's config.

    Raises:
        BackendError: the model has no wav2vec2/HuBERT config.
    """
    config = getattr(model, "config", None)
    if config is None:
        backbone = getattr(model, getattr(model, "backbone_name", ""), None)
        config = getattr(backbone, "config", None)
    if config is None or not hasattr(config, "conv_kernel"):
        raise BackendError(f"{type(model).__name__} has no wav2vec2/HuBERT config (conv_kernel, conv_stride)")
    return tuple(zip(config.conv_kernel, config.conv_stride))


def frame_count(samples: int, geometry: Geometry) -> int:
    """Frames the CNN produces from ``samples`` samples: ``L = (L - kernel) // stride + 1`` per layer (0 if too short)."""
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
