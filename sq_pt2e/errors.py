"""Exception hierarchy: every error the package raises derives from ``SqPt2eError``.

Each subclass also inherits the matching builtin so callers can catch either.
"""

from __future__ import annotations

__all__ = [
    "SqPt2eError",
    "PlanError",
    "ModelError",
    "CheckpointError",
    "AudioError",
    "QuantizationError",
    "Int8NotUsedError",
    "NumericsMismatchError",
    "BackendError",
    "SearchStateError",
    "WorkerError",
    "NumericsError",
    "ResumeError",
    "LanguageModelError",
]


class SqPt2eError(Exception):
    """Base class of every error raised by sq-pt2e."""


class PlanError(SqPt2eError, ValueError):
    """A quantization plan is invalid or does not fit the model."""


class ModelError(SqPt2eError, ValueError):
    """A model or architecture name is unknown or unsupported."""


class CheckpointError(SqPt2eError, ValueError):
    """A checkpoint is missing, corrupt or of the wrong architecture."""


class AudioError(SqPt2eError, ValueError):
    """An audio file or waveform cannot be used."""


class QuantizationError(SqPt2eError, RuntimeError):
    """Annotation, calibration or conversion failed."""


class Int8NotUsedError(SqPt2eError, RuntimeError):
    """A backend would run layers in float that the plan quantizes."""


class NumericsMismatchError(SqPt2eError, RuntimeError):
    """A compiled or lowered int8 model disagrees with the eager int8 model."""


class BackendError(SqPt2eError, RuntimeError):
    """Compiling or lowering for a backend failed."""


class SearchStateError(SqPt2eError, ValueError):
    """Stored search state (a score cache) is unreadable or belongs to another search."""


class WorkerError(SqPt2eError, RuntimeError):
    """A distributed task failed in its worker, or its worker died more often than it is retried."""


class NumericsError(SqPt2eError, ValueError):
    """A tensor holds NaN/Inf values, or a quantity cannot be represented where it is used."""


class ResumeError(SqPt2eError, ValueError):
    """A checkpoint of interrupted work is corrupt or belongs to another run."""


class LanguageModelError(SqPt2eError, ValueError):
    """A language model file is malformed, or a model or decoder setting is unusable."""
