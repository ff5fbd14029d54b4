"""sq-pt2e: StableQuant int8 post-training quantization of speech models in PyTorch's PT2E flow.

Example:
    >>> import torch
    >>> from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    >>> from sq_pt2e import StableQuantQuantizer, build_model, default_plan, export_speech_model
    >>> model = build_model("tiny-wav2vec2")
    >>> wave = torch.randn(1, 16000)
    >>> prepared = prepare_pt2e(export_speech_model(model, wave).module(), StableQuantQuantizer(default_plan()))
    >>> _ = prepared(wave)  # calibrate
    >>> int8_model = convert_pt2e(prepared)
"""

import logging


def _import_dependencies_quietly() -> None:
    """Import torchao and transformers without import-time warnings that do not concern CPU inference.

    A CPU build of torch cannot load torchao's CUDA-only extensions (one warning each), and
    torch warns once per Enum that torchao registers as a pytree constant (some on import of
    transformers, which loads torchao's prototype formats).
    """
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_import_dependencies_quietly()

from sq_pt2e.errors import (  # noqa: E402
    AudioError,
    BackendError,
    CheckpointError,
    Int8NotUsedError,
    ModelError,
    NumericsMismatchError,
    PlanError,
    QuantizationError,
    SqPt2eError,
)
from sq_pt2e.export import export_speech_model
from sq_pt2e.models import build_model
from sq_pt2e.pipeline import QuantizedModel, quantize_exported, quantize_model
from sq_pt2e.plan import LayerPlan, QuantPlan
from sq_pt2e.quantizer import StableQuantQuantizer
from sq_pt2e.recipes import default_plan

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "BackendError",
    "CheckpointError",
    "Int8NotUsedError",
    "LayerPlan",
    "ModelError",
    "NumericsMismatchError",
    "PlanError",
    "QuantPlan",
    "QuantizationError",
    "QuantizedModel",
    "SqPt2eError",
    "StableQuantQuantizer",
    "build_model",
    "default_plan",
    "export_speech_model",
    "quantize_exported",
    "quantize_model",
]
