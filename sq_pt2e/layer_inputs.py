"""Run audio through a model while callbacks watch the inputs of chosen layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["watch_layer_inputs"]


def watch_layer_inputs(model: nn.Module, watchers: Mapping[nn.Module, Callable[[torch.Tensor], object]],
                       waves: Iterable[torch.Tensor]) -> None:
    """Run each ``(batch, samples)`` wave (or ``(samples,)``) through ``model``; ``watchers[m]`` sees
    every input of module ``m``. The hooks are removed afterwards, also on error."""

    def hook_for(watch: Callable[[torch.Tensor], object]) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            watch(args[0])

        return hook

    handles = [module.register_forward_pre_hook(hook_for(watch)) for module, watch in watchers.items()]
    try:
        for wave in waves:
            model(wave if wave.ndim == 2 else wave.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
