"""Per-channel input scaling ("smoothing") of conv1d / linear layers before quantization.

A layer ``y = W x`` computes the same with ``x' = x / s`` and ``W' = W * s`` (``s`` one
positive factor per *input* channel). Choosing ``s_c = max|x_c|**alpha / max|W_c|**(1 - alpha)``
(SmoothQuant, Xiao et al. 2023) moves range from the activation channels with the
largest values into the weights, which are quantized per output channel and barely
notice. The inputs of the wav2vec2 CNN encoder (GELU outputs, max |x| 17-69 with most
mass below 1) are the case it is for.

The division cannot be folded into the previous op (a GELU), so it stays an explicit
multiply by ``1 / s`` in front of the layer's input quantization: inductor fuses it into
the quantize kernel; XNNPACK delegates it. The plan carries ``s`` per layer
(``LayerPlan.input_scale``), and the three places that compute with it share the two
functions below, so the simulation, the PT2E graph and the statistics agree exactly:
:func:`scaled_weight` and :func:`inverse_input_scale`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from sq_pt2e.errors import PlanError, QuantizationError
from sq_pt2e.graph import named_layers
from sq_pt2e.layer_inputs import watch_layer_inputs
from sq_pt2e.models.build import to_ctc_logits
from sq_pt2e.passes.fold_weight_norm import fold_weight_norm
from sq_pt2e.passes.rewrite_utils import drop_unused_attributes

__all__ = [
    "apply_input_scales",
    "channel_maxima",
    "inverse_input_scale",
    "scaled_weight",
    "smoothing_scales",
]

_MIN_SCALE, _MAX_SCALE = 1e-2, 1e2
_TINY = 1e-5


def _channel_view(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """``scale`` shaped to broadcast over dim 1 of a conv ``(N, C, T)`` or the last dim of a linear input."""
    return scale.view(1, -1, 1) if ndim == 3 else scale


def scaled_weight(weight: torch.Tensor, scale: Sequence[float] | torch.Tensor, *, layer: str = "") -> torch.Tensor:
    """``W * s`` along the input channels (dim 1) of a conv ``(out, in, k)`` or linear ``(out, in)`` weight.

    Raises:
        PlanError: ``scale`` does not have one entry per input channel.
    """
    s = torch.as_tensor(scale, dtype=torch.float32)
    if s.ndim != 1 or s.numel() != weight.shape[1]:
        raise PlanError(f"layer {layer!r}: input_scale has {s.numel()} entries for {weight.shape[1]} input channels")
    return weight * (s.view(1, -1, 1) if weight.ndim == 3 else s.view(1, -1))


def inverse_input_scale(scale: Sequence[float] | torch.Tensor, ndim: int) -> torch.Tensor:
    """``1 / s`` as float32, shaped to multiply an input of ``ndim`` dims (3: conv, else linear)."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    return _channel_view(1.0 / s, ndim)


@torch.no_grad()
def channel_maxima(model: nn.Module, waves: Iterable[torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Max |x| per input channel of each named conv1d / linear layer over ``waves``.

    Raises:
        PlanError: a name is not a Conv1d / Linear of the model.
    """
    wrapper = to_ctc_logits(model).eval()
    fold_weight_norm(wrapper)
    modules = dict(wrapper.named_modules())
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable[[torch.Tensor], None]:
        def watch(x: torch.Tensor) -> None:
            x = x.detach()
            per_channel = x.abs().amax(dim=(0, 2)) if x.ndim == 3 else x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
            maxima[name] = per_channel if name not in maxima else torch.maximum(maxima[name], per_channel)

        return watch

    for name in names:
        if not isinstance(modules.get(name), (nn.Conv1d, nn.Linear)):
            raise PlanError(f"cannot smooth {name!r}: not a Conv1d / Linear of the model")
    watch_layer_inputs(wrapper, {modules[name]: record(name) for name in names}, waves)
    return maxima


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> tuple[float, ...]:
    """SmoothQuant factors ``max|x_c|**alpha / max|W_c|**(1 - alpha)``, clamped to [0.01, 100].

    Args:
        act_max: max |x| per input channel (:func:`channel_maxima`).
        weight: the layer's float weight, ``(out, in[, k])``.
        alpha: migration strength, 0 (no change to x) .. 1 (all range into the weights).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} (expected 0 <= alpha <= 1)")
    dims = (0, 2) if weight.ndim == 3 else (0,)
    w_max = weight.detach().abs().amax(dim=dims).clamp(min=_TINY)
    s = act_max.double().clamp(min=_TINY) ** alpha / w_max.double() ** (1.0 - alpha)
    return tuple(float(v) for v in s.clamp(_MIN_SCALE, _MAX_SCALE).float())


def apply_input_scales(gm: GraphModule, scales: dict[str, tuple[float, ...]]) -> GraphModule:
    """Rewrite an exported graph so each named layer computes ``(W * s)(x * (1 / s))``.

    The weight constant is replaced by its scaled copy and a multiply is inserted on the
    layer's input edge (only that edge: other users of ``x`` see it unscaled).

    Raises:
        QuantizationError: a named layer is not in the graph, or its weight is not a constant.
    """
    if not scales:
        return gm
    layers = named_layers(gm, scales, "input_scale")
    replaced: list[str] = []
    for index, (name, scale) in enumerate(sorted(scales.items())):
        node = layers[name].node
        x, weight = node.args[0], node.args[1]
        if weight.op != "get_attr":
            raise QuantizationError(f"layer {name!r}: its weight is computed in the graph ({weight.op}), "
                                    "cannot scale it (fold weight norm before export)")
        original = operator.attrgetter(weight.target)(gm)
        weight_attr, inverse_attr = f"_sq_scaled_weight_{index}", f"_sq_inverse_input_scale_{index}"
        gm.register_buffer(weight_attr, scaled_weight(original.detach(), scale, layer=name))
        gm.register_buffer(inverse_attr, inverse_input_scale(scale, original.ndim))
        with gm.graph.inserting_before(node):
            new_weight = gm.graph.get_attr(weight_attr)
            inverse = gm.graph.get_attr(inverse_attr)
            scaled_x = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, inverse))
        for new, like in ((new_weight, weight), (inverse, weight), (scaled_x, x)):
            new.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")})
        new_weight.meta["val"] = getattr(gm, weight_attr)
        inverse.meta["val"] = getattr(gm, inverse_attr)
        if "val" in x.meta:
            scaled_x.meta["val"] = x.meta["val"]
        node.replace_input_with(weight, new_weight)
        node.replace_input_with(x, scaled_x)
        replaced.append(weight.target)
    gm.graph.eliminate_dead_code()
    drop_unused_attributes(gm, replaced)
    gm.recompile()
    return gm
