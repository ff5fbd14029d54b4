"""Replay the recorded outputs of a speech model's stages instead of computing them again.

Weight reconstruction and the StableQuant search run the same model on the same audio
many times, each time with the quantization of a few layers changed. A stage's output
(a CNN conv layer, the positional conv, a Transformer block) depends only on the
quantization of the layers up to the stage's end: where that is unchanged, the output
recorded before is replayed (the submodule returns it instead of computing it) and only
the rest of the model runs. The results are the same to the bit.

Stages are found by module name in Hugging Face wav2vec2 / HuBERT models: the CNN conv
layers (``...feature_extractor.conv_layers.N``) and the Transformer blocks
(``...encoder.layers.N``) are chains, whose modules are called one after the other and
pass nothing but their output on, and the positional conv (``...pos_conv_embed``) stands
alone. To replay a chain up to stage N, the stages before N return N's output too (N
ignores what they pass on), so only the latest stage of each chain needs to be kept.
Models of another structure have no stages and run whole.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Stage", "StageCache", "latest_stages", "model_stages", "replaying"]

# (pattern of a stage's layers, whether its stages form a chain)
_STAGE_PATTERNS = ((re.compile(r"^(.*feature_extractor\.conv_layers\.\d+)\."), True),
                   (re.compile(r"^(.*\.encoder\.layers\.\d+)\."), True),
                   (re.compile(r"^(.*\.pos_conv_embed)\."), False))
# The most bytes of recorded outputs a StageCache keeps (the least recently used go first).
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Stage:
    """A replayable submodule.

    Attributes:
        name: its module name.
        last: network position of its last quantizable layer.
        replaced: the modules that return its output when it is replayed: the stages of its
            chain up to it, or itself alone.
        chain: the chain it belongs to (a single stage: its own name).
    """

    name: str
    last: int
    replaced: tuple[str, ...]
    chain: str


def model_stages(order: Sequence[str]) -> list[Stage]:
    """The stages of a model, in network order, from its quantizable layers' names in network order."""
    last: dict[str, int] = {}
    chain_of: dict[str, str] = {}
    for position, name in enumerate(order):
        for index, (pattern, is_chain) in enumerate(_STAGE_PATTERNS):
            if match := pattern.match(name):
                last[match.group(1)] = position
                chain_of[match.group(1)] = str(index) if is_chain else match.group(1)
    stages: list[Stage] = []
    for name, position in last.items():
        earlier = tuple(s.name for s in stages if s.chain == chain_of[name])
        stages.append(Stage(name, position, (*earlier, name), chain_of[name]))
    return stages


def latest_stages(stages: Sequence[Stage], position: int) -> list[Stage]:
    """The latest stage of each chain (and the single stages) that end before network ``position``:
    what to replay to run the model from there."""
    latest: dict[str, Stage] = {}
    for stage in stages:
        if stage.last < position:
            latest[stage.chain] = stage
    return list(latest.values())


@contextmanager
def replaying(model: nn.Module, recorded: Iterable[tuple[Stage, torch.Tensor]]) -> Iterator[None]:
    """Within the block, each stage's ``replaced`` submodules of ``model`` return the recorded output
    (a copy, so nothing downstream can change the record)."""
    patched = []
    try:
        for stage, output in recorded:
            for name in stage.replaced:
                module = model.get_submodule(name)
                module.forward = lambda *args, output=output, **kwargs: output.clone()
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


class StageCache:
    """Recorded stage outputs of one model on one list of waveforms, by the quantization up to each stage.

    ``layer_key(name, quantization)`` is a string equal only when the layer simulates identically
    (``stablequant.layer_key``); a stage's key hashes those of the quantized layers up to its end.
    Outputs are kept up to ``max_bytes``, the least recently used dropped first.
    """

    def __init__(self, order: Sequence[str], layer_key: Callable[[str, object], str], *,
                 max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.stages = model_stages(order)
        self.position = {name: i for i, name in enumerate(order)}
        self.layer_key, self.max_bytes = layer_key, max_bytes
        self._entries: OrderedDict[tuple[str, str], list[torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self.replayed = 0  # stage outputs replayed so far (one per stage and run)

    def forward_all(self, run: nn.Module, layers: Mapping[str, object],
                    waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``run(wave)`` for each wave, where ``run`` simulates ``layers`` with the cache's model:
        the deepest stages recorded for the same quantization are replayed, the later ones recorded."""
        keys = self._stage_keys(layers)
        replay = self._deepest_recorded(keys)
        start = max((s.last for s in replay), default=-1)
        recording = {s.name: [] for s in self.stages if s.last > start}
        handles = [run.get_submodule(name).register_forward_hook(
            lambda _module, _args, out, sink=sink: sink.append(out)) for name, sink in recording.items()]
        try:
            outputs = []
            for index, wave in enumerate(waves):
                with replaying(run, [(s, self._entries[(s.name, keys[s.name])][index]) for s in replay]):
                    outputs.append(run(wave))
        finally:
            for handle in handles:
                handle.remove()
        self.replayed += len(replay)
        for name, sink in recording.items():
            if len(sink) == len(waves) and all(isinstance(t, torch.Tensor) for t in sink):
                self._store((name, keys[name]), sink)
        return outputs

    def _stage_keys(self, layers: Mapping[str, object]) -> dict[str, str]:
        """Each stage's key: a hash of the quantization of the layers up to its end."""
        items = sorted(layers.items(), key=lambda item: self.position[item[0]])
        digest, keys, next_item = hashlib.sha256(), {}, 0
        for stage in self.stages:
            while next_item < len(items) and self.position[items[next_item][0]] <= stage.last:
                digest.update((self.layer_key(*items[next_item]) + "\n").encode())
                next_item += 1
            keys[stage.name] = digest.copy().hexdigest()
        return keys

    def _deepest_recorded(self, keys: Mapping[str, str]) -> list[Stage]:
        """The stages to replay: those to run the model from the deepest point all are recorded."""
        for stage in reversed(self.stages):
            needed = latest_stages(self.stages, stage.last + 1)
            if all((s.name, keys[s.name]) in self._entries for s in needed):
                for s in needed:
                    self._entries.move_to_end((s.name, keys[s.name]))
                return needed
        return []

    def _store(self, entry: tuple[str, str], outputs: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in outputs)
        if entry in self._entries or size > self.max_bytes // 4:
            return
        self._entries[entry] = outputs
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in dropped)
