"""Least-squares weight reconstruction ("refit") of quantized layers.

In the int8 model a layer ``y = W x + b`` does not see the float model's input ``x`` but
``q``: that input as the int8 layers before it computed it, rounded to the layer's own
int8 grid. For the dense, one-sided inputs of the CNN feature encoder (GELU outputs) this
error is not noise-like: it is a deterministic function of ``x`` that adds up coherently
over the 512 x 3 inputs of a conv, and no normalisation follows to absorb it. On
ref-wav2vec2, rounding the input of CNN conv 1 to its int8 grid raises the dev logit KL to
0.145, uniform noise of the same step only to 0.005; the weights' own int8 rounding costs
nothing (KL < 1e-4).

Reconstruction replaces ``(W, b)`` by the ``(W', b')`` that minimise
``sum ||W x + b - (W' q + b')||^2`` over calibration audio: a linear least-squares problem,
solved in closed form from its normal equations (ridge-regularised). Here ``x`` comes from
the float model with every quantized layer's input clipped to its grid but not rounded:
the refit corrects rounding error and keeps the clipping the search chose (fitting the raw
float model, the squared error of the rare clipped outliers dominated and made a clipped
plan worse). Layers are refit in network order, each one's ``q`` computed with the layers
before it already refit, so each refit also cancels rounding error accumulated upstream
(sequential reconstruction, as GPTQ does for weight rounding; here the target is the
activation error).

Measured on ref-wav2vec2 at W8A8 (30 dev utterances, 32 LibriSpeech calibration clips),
refitting the CNN convs 1-6: dev logit KL 0.122 -> 0.023 for the plan searched at smoothing
alpha 0.75 (no clip helped there), 0.0205 -> 0.0137 for the one searched at alpha 0.5 (CNN
convs 1-3 clipped at p99.5-99.8). Linear layers see a few thousand frames per calibration
set against up to 3,000 inputs: refitting them overfit (dev KL rose), so the search refits
conv layers only by default.

At 4 weight bits the weights' own rounding to nearest is no longer free. With
``round_weights`` each refit weight is rounded to its grid by GPTQ on the same normal
equations: since the least-squares solution ``W*`` is optimal,
``||W x - W' q||^2 = ||W x - W* q||^2 + ||(W* - W') q||^2`` for any ``W'``, so rounding ``W*``
to minimise its own output error on ``q`` (what GPTQ does) minimises the whole error among
grid weights, approximately. On ref-wav2vec2 W4A8 refitting and rounding every conv and
Linear layer took the dev logit KL from 0.030 (CNN convs refit, rounded to nearest) to
0.018; refitting the Linear layers without rounding reached 0.024, rounding them without
refitting 0.023. The weights are written already on their grid: the quantizer computes
the same per-channel scales from them and rounds nothing.

The refit weights are part of the plan (:class:`RefitWeights`, saved next to the plan
file): the quantizer swaps them into the exported graph and the simulation into the
float model, so both compute with the same weights.
"""

from __future__ import annotations

import copy
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from sq_pt2e.digest import tensor_digest
from sq_pt2e.errors import PlanError, QuantizationError
from sq_pt2e.graph import named_layers
from sq_pt2e.observers import grid_bounds, weight_scales
from sq_pt2e.passes.rewrite_utils import drop_unused_attributes
from sq_pt2e.replay import Stage, latest_stages, model_stages, replaying

__all__ = [
    "RefitWeights",
    "apply_refit_weights",
    "load_refits",
    "reconstruct_layers",
    "save_refits",
]

DEFAULT_RIDGE = 1e-3
DEFAULT_GPTQ_DAMP = 0.01
REFIT_FORMAT = "sq-pt2e-refit/1"


@dataclass(frozen=True, eq=False)
class RefitWeights:
    """A layer's reconstructed float weight and bias, and which float weights they replace.

    Attributes:
        weight: the new weight, shaped as the layer's (before any smoothing scales).
        bias: the new bias, one value per output channel.
        source: :func:`tensor_digest` of the float weight (and bias, if any) this refit replaces.
        digest: :func:`tensor_digest` of ``weight`` and ``bias``; two refits are equal when it is.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    source: str
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        if self.bias.ndim != 1 or self.bias.shape[0] != self.weight.shape[0]:
            raise PlanError(f"refit bias of shape {tuple(self.bias.shape)} for a weight of shape "
                            f"{tuple(self.weight.shape)} (expected one value per output channel)")
        object.__setattr__(self, "weight", self.weight.detach().float().contiguous())
        object.__setattr__(self, "bias", self.bias.detach().float().contiguous())
        object.__setattr__(self, "digest", tensor_digest(self.weight, self.bias))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RefitWeights) and other.digest == self.digest and other.source == self.source

    def __hash__(self) -> int:
        return hash((self.digest, self.source))

    def check_source(self, weight: torch.Tensor, bias: torch.Tensor | None, *, layer: str) -> None:
        """Raise ``QuantizationError`` unless ``weight``/``bias`` are the float weights this refit replaces."""
        found = source_digest(weight, bias)
        if found != self.source:
            raise QuantizationError(
                f"layer {layer!r}: the plan's reconstructed weights were computed for other float weights "
                f"(digest {self.source}, this model has {found}): the plan belongs to another checkpoint; "
                "search again for this one")


def source_digest(weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The digest a refit of a layer with these float weights records as its ``source``."""
    return tensor_digest(weight) if bias is None else tensor_digest(weight, bias)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the watched input is seen."""


def _captured(run: nn.Module, module: nn.Module, wave: torch.Tensor, *, output: bool = False,
              replay: Iterable[tuple[Stage, torch.Tensor]] = ()) -> torch.Tensor:
    """The (last hook-transformed) input of ``module``, or its output, in one forward of ``run``;
    stops the forward there. ``replay``: recorded stage outputs (:func:`sq_pt2e.replay.replaying`)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor | None = None) -> None:
        seen.append((out if output else args[0]).detach())
        raise _Stop

    handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
    try:
        with replaying(run, replay):
            run(wave if wave.ndim == 2 else wave.unsqueeze(0))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise PlanError("a layer to refit was never called on the calibration audio")
    return seen[0]


class _StageRecords:
    """Stage outputs of the float reference and the simulated model on each calibration wave, to replay.

    Layers are refit in network order, so once the fit reaches a layer after a stage
    (:mod:`sq_pt2e.replay`), the stage's output is fixed: it is recorded once in both models and
    the later fits replay it instead of running the model up to there again (the cost of the fit
    falls from quadratic to linear in the depth; the refits are the same to the bit).

    ``models``: the float reference and the model the simulation runs (the same submodules).
    """

    def __init__(self, order: Sequence[str], waves: Sequence[torch.Tensor],
                 models: tuple[nn.Module, nn.Module]) -> None:
        self.stages, self.waves, self.models = model_stages(order), waves, models
        self.recorded: dict[str, list[list[torch.Tensor]]] = {}  # stage -> [float outputs, simulated outputs]
        self.replay: list[Stage] = []

    def advance(self, position: int, runs: tuple[nn.Module, nn.Module]) -> None:
        """Prepare the replay for the layer at network ``position``; ``runs``: the two models'
        waveform -> logits modules, to record what is missing."""
        self.replay = latest_stages(self.stages, position)
        for stage in self.replay:
            self._record(stage, runs)
        self.recorded = {s.name: self.recorded[s.name] for s in self.replay}  # the others are behind

    def _record(self, stage: Stage, runs: tuple[nn.Module, nn.Module]) -> None:
        if stage.name in self.recorded:
            return
        before = latest_stages(self.stages, stage.last)
        for earlier in before:
            self._record(earlier, runs)
        self.recorded[stage.name] = [
            [_captured(run, model.get_submodule(stage.name), wave, output=True,
                       replay=[(s, self.recorded[s.name][role][index]) for s in before])
             for index, wave in enumerate(self.waves)]
            for role, (run, model) in enumerate(zip(runs, self.models))]

    def pairs(self, role: int, index: int) -> list[tuple[Stage, torch.Tensor]]:
        """What to replay for wave ``index`` in the reference (role 0) or the simulated model (1)."""
        return [(s, self.recorded[s.name][role][index]) for s in self.replay]


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as one column per output position, ``(features + 1, positions)`` float64, last row ones."""
    if isinstance(module, nn.Linear):
        cols = x.reshape(-1, x.shape[-1]).T
    else:
        k, stride = module.kernel_size[0], module.stride[0]
        padding, dilation = module.padding[0], module.dilation[0]
        unfolded = F.unfold(x.unsqueeze(-1), (k, 1), stride=(stride, 1), padding=(padding, 0), dilation=(dilation, 1))
        cols = unfolded.permute(1, 0, 2).reshape(unfolded.shape[1], -1)
    cols = cols.double()
    return torch.cat([cols, torch.ones(1, cols.shape[1], dtype=torch.float64)])


def _clip_inputs(modules: Mapping[str, nn.Module], layers: Mapping[str, object]) -> None:
    """Clamp the input of each of ``layers`` (``LayerQuant``) to its grids' interval, with forward pre-hooks.

    An outlier split's second grid widens the interval: those outliers are computed, not clipped.
    """
    for name, quant in layers.items():
        low, high = grid_bounds(quant.act_range, quant.act_bits, quant.act_floor, quant.outlier_range)
        module = modules[name]
        view = torch.ones(())
        if quant.input_scale is not None:
            channel = torch.as_tensor(quant.input_scale, dtype=torch.float32)
            view = channel.view(1, -1, 1) if isinstance(module, nn.Conv1d) else channel

        def clamp(_module: nn.Module, args: tuple[torch.Tensor, ...], low: float = low, high: float = high,
                  view: torch.Tensor = view) -> tuple[torch.Tensor, ...]:
            return ((args[0] / view).clamp(low, high) * view, *args[1:])

        module.register_forward_pre_hook(clamp)


def _check_refittable(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv1d) and (module.groups != 1 or not isinstance(module.padding, tuple)):
        raise PlanError(f"cannot refit {name!r}: only dense conv1d with numeric padding and linear layers")
    if not isinstance(module, (nn.Conv1d, nn.Linear)):
        raise PlanError(f"cannot refit {name!r}: not a Conv1d / Linear")


@torch.no_grad()
def reconstruct_layers(
    model: nn.Module,
    layers: Mapping[str, object],
    names: Sequence[str],
    waves: Iterable[torch.Tensor],
    *,
    ridge: float = DEFAULT_RIDGE,
    clip_target: bool = True,
    round_weights: bool = False,
) -> dict[str, RefitWeights]:
    """Refit the ``names`` layers of ``model`` under the simulated quantization ``layers``, in network order.

    Args:
        model: the float model (left unchanged).
        layers: the quantization to correct for (``{name: LayerQuant}``, as simulated by
            :func:`sq_pt2e.simulate.fake_quantized`); each named layer must be in it.
        names: the layers to refit; refit in the model's order whatever order they are given in.
        waves: calibration audio, ``(1, samples)`` each (iterated once per layer).
        ridge: regularisation, as a share of the mean diagonal of the normal equations.
        clip_target: fit to the float model with every quantized layer's input clipped to its
            grid (so the refit corrects rounding error only), not the raw float model: the
            squared error of the rare clipped outliers would otherwise dominate the fit and
            undo the clipping the search chose.
        round_weights: round each refit weight to the layer's weight grid with GPTQ
            (:func:`round_to_grid`) on the same inputs before the next layer is fit, instead of
            leaving the rounding to the quantizer (to nearest).

    Returns:
        ``{name: RefitWeights}``.

    Raises:
        PlanError: a name is not a quantized Conv1d / Linear of the model, or no audio.
    """
    from sq_pt2e.models.build import to_ctc_logits
    from sq_pt2e.simulate import fake_quantized, quantizable_modules

    waves = list(waves)
    if not waves:
        raise PlanError("weight reconstruction needs calibration audio: got none")
    wrapper = to_ctc_logits(model).eval()
    order = [m.name for m in quantizable_modules(wrapper)]
    unknown = sorted(set(names) - set(order) | {n for n in names if n not in layers})
    if unknown:
        raise PlanError(f"cannot refit {unknown[:3]}: not quantized layers of the model")
    reference = copy.deepcopy(wrapper)  # the float model, untouched by the simulation's weight swaps
    modules = {m.name: m.module for m in quantizable_modules(wrapper)}
    float_modules = {m.name: m.module for m in quantizable_modules(reference)}
    current = dict(layers)
    refits: dict[str, RefitWeights] = {}
    if clip_target:  # the reference clips every quantized input to its grid, without rounding
        _clip_inputs(float_modules, layers)
    stages = _StageRecords(order, waves, (reference, wrapper))
    for name in sorted(set(names), key=order.index):
        module = modules[name]
        _check_refittable(name, module)
        quant = current[name]
        scale = torch.ones(module.weight.shape[1], dtype=torch.float64)
        if quant.input_scale is not None:
            scale = torch.as_tensor(quant.input_scale, dtype=torch.float64)
        features = module.weight[0].numel() + 1
        gram = torch.zeros(features, features, dtype=torch.float64)
        cross = torch.zeros(features, features, dtype=torch.float64)
        with fake_quantized(model, current) as simulated:
            stages.advance(order.index(name), (reference, simulated))
            for index, wave in enumerate(waves):
                target = _columns(module, _captured(reference, float_modules[name], wave,
                                                    replay=stages.pairs(0, index)))
                seen = _columns(module, _captured(simulated, module, wave, replay=stages.pairs(1, index)))
                gram += seen @ seen.T
                cross += target @ seen.T
        weight = module.weight.detach().double().reshape(module.weight.shape[0], -1)
        bias = module.bias.detach().double() if module.bias is not None else torch.zeros(weight.shape[0],
                                                                                        dtype=torch.float64)
        per_input = scale.repeat_interleave(module.weight[0].numel() // scale.numel())
        rhs = torch.cat([weight, bias[:, None]], 1) @ cross
        damping = ridge * float(gram.diagonal().mean()) * torch.eye(features, dtype=torch.float64)
        solved = torch.linalg.solve(gram + damping, rhs.T).T  # acts on the smoothed, quantized input
        if round_weights:
            solved = round_to_grid(solved, gram, quant.weight_bits, quant.weight_calibration, layer=name)
        new_weight = (solved[:, :-1] / per_input).reshape(module.weight.shape)
        refit = RefitWeights(new_weight, solved[:, -1], source_digest(module.weight, module.bias))
        refits[name] = refit
        current[name] = quant.with_refit(refit)
    return refits


def round_to_grid(weight: torch.Tensor, gram: torch.Tensor, bits: int, calibration: str, *,
                  damp: float = DEFAULT_GPTQ_DAMP, layer: str = "") -> torch.Tensor:
    """Round a layer's ``[W | b]`` to its per-channel ``bits`` grid with GPTQ (Frantar et al., 2023).

    Input columns are rounded one after the other; each one's rounding error is spread over
    the columns not yet rounded, weighted by the inverse of ``gram`` (the inputs' second
    moments), so the layer's output on those inputs changes as little as possible. The bias
    (last column) is never rounded and absorbs what is left. With uncorrelated inputs this is
    round-to-nearest.

    Args:
        weight: ``(out, features + 1)`` float64, the bias as last column (as :func:`_columns` lays out inputs).
        gram: ``(features + 1, features + 1)``, the sum of ``x x^T`` over the layer's (quantized) inputs.
        bits: weight bits (signed symmetric grid, per output channel).
        calibration: ``"max"`` or ``"mse"``: how the quantizer computes the channel scales.
        damp: added to the diagonal of ``gram``, as a share of its mean, so it can be inverted.

    Returns:
        ``[W' | b']``: ``W'`` on the grid whose scales ``calibration`` gives for ``W``. Each channel's
        largest weight is set to the end of the grid whatever error was spread onto it, so the
        quantizer computes the same scales from ``W'`` and takes ``W'`` as it is.
    """
    qmax = 2 ** (bits - 1) - 1
    rounded = weight.clone()
    features = rounded.shape[1] - 1
    scales = weight_scales(rounded[:, :features].float(), qmax, calibration, layer=layer).double()
    hessian = gram.clone()
    dead = hessian.diagonal() == 0  # inputs that were always zero: any weight fits them
    hessian[dead, dead] = 1.0
    hessian += damp * float(hessian.diagonal().mean()) * torch.eye(features + 1, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    # each channel's largest weight stays at the end of the grid, so the quantizer finds the same scale
    pinned = rounded[:, :features].abs().argmax(dim=1)
    pinned_value = torch.sign(rounded[torch.arange(rounded.shape[0]), pinned]) * qmax * scales
    for j in range(features):
        column = torch.clamp(torch.round(rounded[:, j] / scales), -qmax, qmax) * scales
        column = torch.where(pinned == j, pinned_value, column)
        error = (rounded[:, j] - column) / upper[j, j]
        rounded[:, j] = column
        rounded[:, j + 1:] -= error[:, None] * upper[j, j + 1:][None, :]
    return rounded


def apply_refit_weights(gm: GraphModule, refits: Mapping[str, RefitWeights]) -> GraphModule:
    """Swap each named layer's weight and bias constants in an exported graph for its refit.

    Raises:
        QuantizationError: a named layer is not in the graph, its weight is computed in the
            graph, or its float weights are not those the refit was computed for.
    """
    if not refits:
        return gm
    layers = named_layers(gm, refits, "reconstructed weights")
    replaced: list[str] = []
    for index, (name, refit) in enumerate(sorted(refits.items())):
        node = layers[name].node
        weight = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        constants = [weight] + ([bias] if isinstance(bias, Node) else [])
        if any(c.op != "get_attr" for c in constants):
            raise QuantizationError(f"layer {name!r}: its weight or bias is computed in the graph, cannot refit it "
                                    "(fold weight norm before export)")
        refit.check_source(operator.attrgetter(weight.target)(gm),
                           operator.attrgetter(bias.target)(gm) if isinstance(bias, Node) else None, layer=name)
        new_nodes = []
        for role, value in (("weight", refit.weight), ("bias", refit.bias)):
            attr = f"_sq_refit_{role}_{index}"
            gm.register_buffer(attr, value.clone())
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(attr)
            new.meta.update({k: v for k, v in weight.meta.items() if k in ("nn_module_stack", "stack_trace")})
            new.meta["val"] = getattr(gm, attr)
            new_nodes.append(new)
        args = list(node.args) + [None] * (3 - len(node.args))
        args[1], args[2] = new_nodes
        node.args = tuple(args)
        replaced += [c.target for c in constants]
    gm.graph.eliminate_dead_code()
    drop_unused_attributes(gm, replaced)
    gm.recompile()
    return gm


def save_refits(path: str | os.PathLike[str], refits: Mapping[str, RefitWeights]) -> Path:
    """Write ``refits`` as one safetensors file, atomically.

    Tensors ``<layer>.weight`` / ``<layer>.bias``; each layer's ``source`` digest as metadata.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"{name}.{role}": getattr(refit, role) for name, refit in refits.items() for role in ("weight", "bias")}
    metadata = {"format": REFIT_FORMAT, **{name: refit.source for name, refit in refits.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_refits(path: str | os.PathLike[str], digests: Mapping[str, str], *,
                plan: str = "plan") -> dict[str, RefitWeights]:
    """Read the refits of the layers ``digests`` names from ``path`` and check each against its digest.

    Raises:
        PlanError: the file is missing or unreadable, lacks a layer, or holds other weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{plan}: {len(digests)} layer(s) compute with reconstructed weights, kept in {path}, "
                        "which does not exist (QuantPlan.save writes it next to the plan: copy both files)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != REFIT_FORMAT:
                raise PlanError(f"{plan}: {path} is not a reconstructed-weights file of this format ({REFIT_FORMAT})")
            keys = set(handle.keys())
            refits = {}
            for name, digest in digests.items():
                roles = [f"{name}.weight", f"{name}.bias"]
                if not set(roles) <= keys or name not in metadata:
                    raise PlanError(f"{plan}: {path} holds no reconstructed weights for layer {name!r}")
                refit = RefitWeights(handle.get_tensor(roles[0]), handle.get_tensor(roles[1]), metadata[name])
                if refit.digest != digest:
                    raise PlanError(f"{plan}: the reconstructed weights of layer {name!r} in {path} have digest "
                                    f"{refit.digest}, the plan expects {digest}: the two files do not belong together")
                refits[name] = refit
    except (SafetensorError, OSError) as exc:
        raise PlanError(f"{plan}: cannot read reconstructed weights {path}: {exc}") from exc
    return refits
