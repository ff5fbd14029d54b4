"""Fold weight normalisation into plain weights before export.

wav2vec2 / HuBERT's positional convolution carries ``weight_norm`` (a
``torch.nn.utils.parametrize`` parametrization, or the legacy ``weight_g`` /
``weight_v`` hook). Exported as is, the graph recomputes ``g * v / ||v||`` on every
call and the quantizer would see a computed weight instead of a parameter.
Folding it once makes the weight a constant the observers and int8 kernels can use.
This runs on the ``nn.Module``, before ``torch.export``.

``copy.deepcopy`` of a parametrized module keeps its class, which
``torch.nn.utils.parametrize`` creates per module and mutates when the
parametrization is removed: folding a plain deep copy deletes ``weight`` from the
original's class too. :func:`folded_copy` gives each copied module its own class first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["fold_weight_norm", "folded_copy"]


def fold_weight_norm(model: nn.Module) -> list[str]:
    """Replace every weight-normalised parameter of ``model`` by its value, in place.

    The folded weight stays an ``nn.Parameter`` (not run under ``no_grad``: with grad
    off, torch re-registers a folded parametrization as a buffer).

    Returns:
        The names of the modules that were folded (empty if none carried weight norm).
    """
    folded = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            folded.append(name)
        elif hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            torch.nn.utils.remove_weight_norm(module)
            folded.append(name)
    return folded


def folded_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its weight norm folded; ``model`` itself is left unchanged.

    Returns:
        The copy (same mode as ``model``).
    """
    replica = copy.deepcopy(model)
    for module in replica.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    fold_weight_norm(replica)
    return replica
