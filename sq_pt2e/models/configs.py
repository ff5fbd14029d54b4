"""Named model architectures: tiny ones for tests, full-size ones for benchmarks.

Full-size configurations follow the published checkpoints (facebook/wav2vec2-base-960h,
facebook/wav2vec2-large-960h-lv60-self, facebook/hubert-large-ls960-ft). Speed and size
do not depend on the weights, so they are benchmarked with random weights.
"""

from __future__ import annotations

from typing import Any

from transformers import HubertConfig, PretrainedConfig, Wav2Vec2Config

from sq_pt2e.errors import ModelError
from sq_pt2e.models.vocab import BLANK_ID, VOCAB

__all__ = ["ARCHITECTURES", "make_config"]

_CNN_KERNELS = (10, 3, 3, 3, 3, 2, 2)
_CNN_STRIDES = (5, 2, 2, 2, 2, 2, 2)

# wav2vec2-style: group-norm CNN feature encoder, post-norm Transformer.
_WAV2VEC2_STYLE: dict[str, Any] = {
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
    "conv_bias": False,
}
# HuBERT-large-style: layer-norm CNN feature encoder, pre-norm ("stable layer norm").
_STABLE_LAYER_NORM_STYLE: dict[str, Any] = {
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "conv_bias": True,
}


def _transformer(hidden: int, layers: int, heads: int, ffn: int, cnn: int, pos_kernel: int,
                 pos_groups: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "conv_dim": (cnn,) * 7,
        "conv_kernel": _CNN_KERNELS,
        "conv_stride": _CNN_STRIDES,
        "num_conv_pos_embeddings": pos_kernel,
        "num_conv_pos_embedding_groups": pos_groups,
    }


# name -> (config class, keyword arguments)
ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "tiny-wav2vec2": (Wav2Vec2Config, {**_WAV2VEC2_STYLE, **_transformer(32, 2, 2, 64, 32, 16, 8)}),
    "tiny-hubert": (HubertConfig, {**_STABLE_LAYER_NORM_STYLE, **_transformer(32, 2, 2, 64, 32, 16, 8)}),
    "small-wav2vec2": (Wav2Vec2Config, {**_WAV2VEC2_STYLE, **_transformer(256, 4, 4, 1024, 256, 64, 16)}),
    "small-hubert": (HubertConfig, {**_STABLE_LAYER_NORM_STYLE, **_transformer(256, 4, 4, 1024, 256, 64, 16)}),
    "wav2vec2-base": (Wav2Vec2Config, {**_WAV2VEC2_STYLE, **_transformer(768, 12, 12, 3072, 512, 128, 16)}),
    "wav2vec2-large-lv60": (
        Wav2Vec2Config,
        {**_STABLE_LAYER_NORM_STYLE, **_transformer(1024, 24, 16, 4096, 512, 128, 16)},
    ),
    "hubert-large": (HubertConfig, {**_STABLE_LAYER_NORM_STYLE, **_transformer(1024, 24, 16, 4096, 512, 128, 16)}),
}


def make_config(name: str, **overrides: Any) -> PretrainedConfig:
    """Build the Hugging Face config of a named architecture with the project vocabulary.

    Args:
        name: one of ``ARCHITECTURES``.
        **overrides: config fields to change (e.g. ``num_hidden_layers=4``).

    Raises:
        ModelError: unknown architecture name.
    """
    if name not in ARCHITECTURES:
        msg = f"unknown architecture {name!r} (known: {', '.join(sorted(ARCHITECTURES))})"
        raise ModelError(msg)
    config_class, kwargs = ARCHITECTURES[name]
    fields = {
        **kwargs,
        "vocab_size": len(VOCAB),
        "pad_token_id": BLANK_ID,
        "ctc_loss_reduction": "mean",
        "ctc_zero_infinity": True,
        **overrides,
    }
    return config_class(**fields)
