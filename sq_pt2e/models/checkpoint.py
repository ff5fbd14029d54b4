"""Load and save real checkpoints: Hugging Face folders and torchaudio-layout state dicts.

- A Hugging Face folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``,
  optionally ``vocab.json``), as facebook/wav2vec2-base-960h or
  facebook/hubert-large-ls960-ft ship it, loads with transformers' ``from_pretrained``,
  offline. Legacy weight-norm names (``weight_g`` / ``weight_v``) are renamed by
  transformers.
- A state dict file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``) in the key layout of
  torchaudio's wav2vec2 / HuBERT model builders, which is also what torchaudio's fairseq
  import produces::

      feature_extractor.conv_layers.N.{conv,layer_norm}.*  -> <base>.feature_extractor.conv_layers.N.*
      encoder.feature_projection.*                         -> <base>.feature_projection.*
      encoder.transformer.*  (pos_conv_embed, layer_norm,  -> <base>.encoder.*
          layers.N.attention.{q,k,v,out}_proj, ...)
      pos_conv_embed.conv.weight_g / weight_v              -> ...conv.parametrizations.weight.original0 / 1
      aux.*  (the CTC head)                                -> lm_head.*

  is mapped onto the Hugging Face modules by hand (torchaudio is not imported; it
  cannot be installed beside this torch). ``<base>`` is ``wav2vec2`` or ``hubert``. A
  state dict already in Hugging Face key layout is accepted as well. Such a file has no
  config: ``architecture`` names it, or it is inferred from the tensor shapes.
- A positional convolution whose weight norm was folded into a plain ``weight`` (by
  ``sq_pt2e.passes.fold_weight_norm``) is stored and read as weight norm again
  (``g = ||w||`` over all but the kernel axis, ``v = w``), so such models save and load.
- torchaudio's ASR bundles drop fairseq's three unused outputs (``<pad>``, ``</s>``,
  ``<unk>``: 29 labels ``-``, ``|``, ``E``, ...). A 29-output head is widened back to the
  32-symbol vocabulary; the restored outputs copy the blank output 10 logits lower, so
  they never win the argmax and take about 1e-4 of the blank's probability.

Every failure is a ``CheckpointError`` naming the file and the problem: missing or
corrupt files, missing or unexpected keys (a few listed), a shape mismatch (key and both
shapes), a vocabulary other than the one the decoder uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from transformers import PreTrainedModel

from sq_pt2e.errors import CheckpointError
from sq_pt2e.models.vocab import BLANK_ID, VOCAB, WORD_DELIMITER, vocab_dict

__all__ = ["SUPPORTED_MODEL_TYPES", "load_checkpoint", "save_hf_checkpoint", "torchaudio_to_hf_keys"]

SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert")
_PREFIXES = (
    ("feature_extractor.", "{base}.feature_extractor."),
    ("encoder.feature_projection.", "{base}.feature_projection."),
    ("encoder.transformer.", "{base}.encoder."),
    ("aux.", "lm_head."),
)
_WEIGHT_NORM = {
    "pos_conv_embed.conv.weight_g": "pos_conv_embed.conv.parametrizations.weight.original0",
    "pos_conv_embed.conv.weight_v": "pos_conv_embed.conv.parametrizations.weight.original1",
}
_OPTIONAL = ("masked_spec_embed",)  # used only for training-time masking; often absent
_FAIRSEQ_DROPPED = (1, 2, 3)  # outputs torchaudio's ASR bundles remove from the fairseq head
_RESTORED_LOGIT_OFFSET = 10.0
_SHOWN = 3  # keys listed in an error message
_POS_CONV_WEIGHT = "pos_conv_embed.conv.weight"
_WEIGHT_NORM_DIM = 2  # transformers applies weight_norm(conv, dim=2) to the positional convolution


def torchaudio_to_hf_keys(state: Mapping[str, torch.Tensor], base: str) -> dict[str, torch.Tensor]:
    """Rename torchaudio wav2vec2/HuBERT state-dict keys to ``*ForCTC`` keys.

    Args:
        state: a state dict in torchaudio's key layout.
        base: the backbone prefix of the target model, ``"wav2vec2"`` or ``"hubert"``.

    Returns:
        The same tensors under Hugging Face names; keys outside the known prefixes are
        kept (so they show up as unexpected keys).
    """
    mapped = {}
    for key, value in state.items():
        new = key
        for old_prefix, new_prefix in _PREFIXES:
            if key.startswith(old_prefix):
                new = new_prefix.format(base=base) + key[len(old_prefix) :]
                break
        for old, hf in _WEIGHT_NORM.items():
            new = new.replace(old, hf)
        mapped[new] = value
    return mapped


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report or progress bar from transformers; the previous settings come back after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _meta_model(architecture: str) -> PreTrainedModel:
    """The architecture's ``*ForCTC`` model with no storage (for its key names and shapes)."""
    from transformers import AutoModelForCTC

    from sq_pt2e.models.configs import make_config

    with torch.device("meta"):
        return AutoModelForCTC.from_config(make_config(architecture), attn_implementation="sdpa")


def _is_optional(key: str) -> bool:
    return key.endswith(_OPTIONAL)


def _restore_fairseq_outputs(state: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Widen a 29-output torchaudio ASR head back to the 32-symbol vocabulary, in place."""
    weight, bias = state.get("lm_head.weight"), state.get("lm_head.bias")
    if weight is None or bias is None or weight.shape[0] != vocab_size - len(_FAIRSEQ_DROPPED):
        return
    kept = [i for i in range(vocab_size) if i not in _FAIRSEQ_DROPPED]
    new_weight = weight.new_empty((vocab_size, *weight.shape[1:]))
    new_bias = bias.new_empty(vocab_size)
    new_weight[kept], new_bias[kept] = weight, bias
    for index in _FAIRSEQ_DROPPED:
        new_weight[index] = weight[BLANK_ID]
        new_bias[index] = bias[BLANK_ID] - _RESTORED_LOGIT_OFFSET
    state["lm_head.weight"], state["lm_head.bias"] = new_weight, new_bias


def _unfold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Express a folded positional-convolution ``weight`` as weight norm (``original0`` = g, ``original1`` = v)."""
    for key in [k for k in state if k.endswith(_POS_CONV_WEIGHT)]:
        prefix = key[: -len("weight")]
        if f"{prefix}parametrizations.weight.original0" in state:
            continue
        weight = state.pop(key)
        dims = tuple(d for d in range(weight.ndim) if d != _WEIGHT_NORM_DIM)
        state[f"{prefix}parametrizations.weight.original0"] = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
        state[f"{prefix}parametrizations.weight.original1"] = weight
    return state


def _to_hf_layout(state: Mapping[str, torch.Tensor], model: PreTrainedModel) -> dict[str, torch.Tensor]:
    base = model.base_model_prefix
    if any(k.startswith(f"{base}.") for k in state):
        mapped = dict(state)
    else:
        mapped = torchaudio_to_hf_keys(state, base)
    _restore_fairseq_outputs(mapped, model.config.vocab_size)
    return _unfold_weight_norm(mapped)


def _problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Why ``state`` does not fit ``expected`` (empty when it fits)."""
    missing = sorted(k for k in set(expected) - set(state) if not _is_optional(k))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        no_head = any(k.startswith("lm_head.") for k in missing)
        hint = " (no CTC head: a pretraining-only checkpoint?)" if no_head else ""
        problems.append(f"{len(missing)} missing key(s) {missing[:_SHOWN]}{hint}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {unexpected[:_SHOWN]}")
    for key in expected:  # the first mismatch in network order
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(f"{key} has shape {tuple(state[key].shape)} but the model expects "
                            f"{tuple(expected[key].shape)}")
            break
    return problems


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = (f"{path}: corrupt, or holds objects other than tensors (a full training checkpoint?); "
               "it is not unpickled with weights_only=False because that can run arbitrary code")
        raise CheckpointError(msg) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, bad header: several types
        msg = f"{path}: not a readable PyTorch or safetensors state dict ({_first_line(exc)})"
        raise CheckpointError(msg) from exc
    for wrapper in ("state_dict", "model"):  # {"state_dict": {...}} / {"model": {...}} training checkpoints
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: expected a non-empty mapping of parameter names to tensors")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: {len(not_tensors)} entries are not tensors, e.g. {not_tensors[:_SHOWN]}")
    return state


def _load_state_dict(path: Path, architecture: str | None) -> PreTrainedModel:
    from sq_pt2e.models.configs import ARCHITECTURES

    if architecture is not None and architecture not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")
    state = _read_state_dict(path)
    candidates = [architecture] if architecture is not None else list(ARCHITECTURES)
    fits, problems = [], {}
    for name in candidates:
        meta = _meta_model(name)
        problems[name] = _problems(_to_hf_layout(state, meta), meta.state_dict())
        if not problems[name]:
            fits.append(name)
    if architecture is not None and problems[architecture]:
        raise CheckpointError(
            f"{path}: does not match architecture {architecture!r}: {'; '.join(problems[architecture])}"
        )
    if not fits:
        closest = min(candidates, key=lambda n: len(problems[n]))
        raise CheckpointError(
            f"{path}: matches none of the known architectures; closest is {closest!r}: "
            f"{'; '.join(problems[closest])} (pass architecture= to see its problems)"
        )
    if len(fits) > 1:
        raise CheckpointError(f"{path}: the tensor shapes fit {fits}: pass architecture= to choose one")
    model = _meta_model(fits[0]).to_empty(device="cpu")
    mapped = _to_hf_layout(state, model)
    model.load_state_dict(mapped, strict=False)
    for key in set(model.state_dict()) - set(mapped):  # only optional keys are left
        model.get_parameter(key).data.zero_()
    return model.eval()


def _check_vocab(folder: Path, model: PreTrainedModel) -> None:
    vocab_file = folder / "vocab.json"
    if vocab_file.is_file():
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{vocab_file}: not valid JSON ({_first_line(exc)})") from exc
        if isinstance(vocab, dict) and vocab and all(isinstance(v, dict) for v in vocab.values()):
            raise CheckpointError(f"{vocab_file}: a multilingual vocabulary (per language) is not supported")
        if vocab != vocab_dict():
            by_id = {v: k for k, v in vocab.items()} if isinstance(vocab, dict) else {}
            diff = next((i for i, t in enumerate(VOCAB) if by_id.get(i) != t), len(VOCAB))
            raise CheckpointError(
                f"{vocab_file}: the vocabulary differs from the 32-symbol wav2vec2-base-960h vocabulary the "
                f"decoder uses (first difference at id {diff}: {by_id.get(diff)!r} instead of "
                f"{VOCAB[diff] if diff < len(VOCAB) else None!r})"
            )
    if model.config.vocab_size != len(VOCAB):
        raise CheckpointError(
            f"{folder}: the CTC head has {model.config.vocab_size} outputs; the decoder uses the "
            f"{len(VOCAB)}-symbol wav2vec2-base-960h vocabulary"
        )


def _load_folder(folder: Path, architecture: str | None) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCTC

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face checkpoint folder (no config.json)")
    weights = [n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json") if (folder / n).is_file()]
    if not weights:
        raise CheckpointError(f"{folder}: no weights (expected model.safetensors or pytorch_model.bin)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - bad JSON, unknown model_type, ...: all mean an unusable config
        raise CheckpointError(f"{config_file}: cannot read the config ({_first_line(exc)})") from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_file}: model_type {config.model_type!r} is not supported "
            f"(expected one of {SUPPORTED_MODEL_TYPES})"
        )
    try:
        with _quiet_transformers():
            model, info = AutoModelForCTC.from_pretrained(
                folder, config=config, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
                dtype=torch.float32,
            )
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and OS errors all mean a corrupt file
        raise CheckpointError(f"{folder / weights[0]}: cannot load the weights ({_first_line(exc)})") from exc
    if info.get("mismatched_keys"):
        key, found, wanted = sorted(info["mismatched_keys"], key=lambda t: t[0])[0]
        raise CheckpointError(
            f"{folder / weights[0]}: {key} has shape {tuple(found)} but config.json describes {tuple(wanted)}"
        )
    problems = []
    missing = sorted(k for k in info.get("missing_keys", ()) if not _is_optional(k))
    if missing:
        problems.append(f"{len(missing)} missing key(s) {missing[:_SHOWN]}")
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {unexpected[:_SHOWN]}")
    if problems:
        raise CheckpointError(f"{folder / weights[0]}: does not match config.json: {'; '.join(problems)}")
    _check_vocab(folder, model)
    if architecture is not None:
        from sq_pt2e.models.configs import ARCHITECTURES

        if architecture not in ARCHITECTURES:
            msg = f"{folder}: unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})"
            raise CheckpointError(msg)
        meta = _meta_model(architecture)
        found = _problems(model.state_dict(), meta.state_dict())
        if type(meta) is not type(model):
            found.insert(0, f"it is a {type(model).__name__}, not a {type(meta).__name__}")
        if found:
            raise CheckpointError(f"{folder}: does not match architecture {architecture!r}: {'; '.join(found)}")
    return model.eval()


def load_checkpoint(path: str | os.PathLike[str], *, architecture: str | None = None) -> PreTrainedModel:
    """Load a CTC model from a Hugging Face folder or a torchaudio-layout state dict.

    Args:
        path: a Hugging Face checkpoint folder, or a state dict file (``.pt``, ``.pth``,
            ``.bin``, ``.safetensors``) in torchaudio or Hugging Face key layout.
        architecture: an architecture name (``"wav2vec2-base"``, ``"hubert-large"``, ...).
            For a state dict it gives the config (inferred from the shapes when ``None``);
            for a folder the checkpoint is checked against it.

    Returns:
        A float32 ``Wav2Vec2ForCTC`` / ``HubertForCTC`` in eval mode.

    Raises:
        CheckpointError: missing or corrupt file, missing/unexpected keys, mismatched
            shapes, unsupported model type or vocabulary, ambiguous architecture.

    Example:
        >>> model = load_checkpoint("checkpoints/hubert-large-ls960-ft")
        >>> model = load_checkpoint("wav2vec2_fairseq_base_ls960_asr_ls960.pth", architecture="wav2vec2-base")
    """
    target = Path(path)
    if target.is_dir():
        return _load_folder(target, architecture)
    if target.is_file():
        return _load_state_dict(target, architecture)
    raise CheckpointError(f"{target}: no such checkpoint (expected a folder or a state dict file)")


def _preprocessor_config(model: PreTrainedModel) -> dict[str, object]:
    """What Wav2Vec2FeatureExtractor needs; layer-norm CNN models are fed attention masks upstream."""
    return {
        "do_normalize": True,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": getattr(model.config, "feat_extract_norm", "group") == "layer",
        "sampling_rate": 16000,
    }


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
        "bos_token": VOCAB[1],
        "eos_token": VOCAB[2],
        "unk_token": VOCAB[3],
        "pad_token": VOCAB[BLANK_ID],
        "word_delimiter_token": WORD_DELIMITER,
        "do_lower_case": False,
    }


def save_hf_checkpoint(model: PreTrainedModel, folder: str | os.PathLike[str]) -> Path:
    """Write a Hugging Face checkpoint folder, replacing ``folder`` atomically.

    Writes ``config.json``, ``model.safetensors``, ``vocab.json``, ``tokenizer_config.json``
    and ``preprocessor_config.json`` into a temporary folder beside ``folder``, then swaps
    it in: readers see the old checkpoint or the new one, never a half-written one.
    :func:`load_checkpoint` and transformers' ``from_pretrained`` read it back.

    Args:
        model: a ``Wav2Vec2ForCTC`` / ``HubertForCTC`` (float; not an exported graph).
        folder: the checkpoint folder; if it exists it must be empty or hold a checkpoint
            (``config.json``), so that no unrelated folder is replaced.

    Returns:
        The folder.

    Raises:
        CheckpointError: not a Hugging Face CTC model, another vocabulary, or ``folder``
            is a file or a non-empty folder without ``config.json``.
    """
    target = Path(folder)
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "lm_head"):
        raise CheckpointError(f"{target}: expected a Hugging Face *ForCTC model, got {type(model).__name__}")
    if model.config.vocab_size != len(VOCAB):
        raise CheckpointError(f"{target}: the model has {model.config.vocab_size} outputs, the vocabulary {len(VOCAB)}")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        msg = f"{target}: not empty and not a checkpoint folder (no config.json): refusing to replace it"
        raise CheckpointError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; give the usual folder mode
        state = _unfold_weight_norm(dict(model.state_dict()))
        with _quiet_transformers():
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        for name, content in (("vocab.json", vocab_dict()), ("tokenizer_config.json", _tokenizer_config()),
                              ("preprocessor_config.json", _preprocessor_config(model))):
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            target.rename(old / target.name)
        tmp.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            (old / target.name).rename(target)  # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target
