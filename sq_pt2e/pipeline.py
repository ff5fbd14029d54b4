"""The PT2E flow in one call: export, annotate from a plan, calibrate, convert.

Example:
    >>> model = build_model("tiny-wav2vec2")
    >>> result = quantize_model(model, example_wave, calibration_waves, plan=QuantPlan())
    >>> logits = result.converted(example_wave)
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from sq_pt2e.errors import QuantizationError
from sq_pt2e.export import export_speech_model
from sq_pt2e.framing import LengthRange
from sq_pt2e.graph import group_channels
from sq_pt2e.passes.snap_bias_to_int32_grid import snap_biases_to_int32_grid
from sq_pt2e.passes.verify_quantization import QuantizedGraphSummary, require_int8_layers
from sq_pt2e.plan import QuantPlan
from sq_pt2e.quantizer import LayerStatus, StableQuantQuantizer, Target

__all__ = ["QuantizedModel", "calibrate", "load_program", "quantize_model", "quantize_exported", "save_program"]


@dataclass
class QuantizedModel:
    """A converted int8 graph, the plan that made it and what became int8 or stayed float."""

    converted: GraphModule
    plan: QuantPlan
    target: Target
    layer_status: tuple[LayerStatus, ...]
    summary: QuantizedGraphSummary

    def bit_widths(self) -> str:
        """The distinct widths of the int8 layers, e.g. ``"W7A8"`` or ``"W4A8/W8A8"``."""
        return "/".join(sorted({f"W{s.weight_bits}A{s.act_bits}" for s in self.layer_status if s.status == "int8"}))


@torch.no_grad()
def calibrate(prepared: GraphModule, waves: Iterable[torch.Tensor | tuple[torch.Tensor, ...]]) -> int:
    """Run calibration inputs through a prepared model; returns how many were run.

    Each item is a waveform (``(batch, samples)`` or ``(samples,)``) or, for programs
    with several inputs, the tuple of their arguments.
    """
    count = 0
    for wave in waves:
        if isinstance(wave, tuple):
            prepared(*wave)
        else:
            prepared(wave if wave.ndim == 2 else wave.unsqueeze(0))
        count += 1
    if count == 0:
        raise QuantizationError("calibration got no waveforms: pass at least one (batch, samples) tensor")
    return count


def quantize_exported(
    exported: ExportedProgram,
    calibration: Iterable[torch.Tensor | tuple[torch.Tensor, ...]],
    *,
    plan: QuantPlan | None = None,
    target: Target = "x86_inductor",
    fit_to_cpu: bool = True,
) -> QuantizedModel:
    """prepare_pt2e -> calibrate -> convert_pt2e on an exported speech model.

    Args:
        exported: from :func:`~sq_pt2e.export.export_speech_model`.
        calibration: ``(batch, samples)`` waveforms for the activation observers (tuples
            of arguments for programs with several inputs).
        plan: per-layer decisions (default: W8A8, max calibration everywhere).
        target: ``"x86_inductor"`` or ``"xnnpack"`` (whose graph adds each int8 layer's bias
            rounded to XNNPACK's int32 grid, as the ``.pte`` does: ``passes.snap_bias_to_int32_grid``).
        fit_to_cpu: for x86, fit the plan to the CPU's int8 kernels (W7A8 without VNNI,
            where 8x8-bit products saturate; small-group grouped convs in float on AMX;
            see ``sq_pt2e.backends.inductor.fit_plan_to_cpu``); the returned ``plan`` records it.

    Raises:
        PlanError: the plan names layers the graph does not have.
        Int8NotUsedError: a layer the plan quantizes is float after conversion.
    """
    plan = plan if plan is not None else QuantPlan()
    if target == "x86_inductor" and fit_to_cpu:
        from sq_pt2e.backends.inductor import fit_plan_to_cpu

        plan, _ = fit_plan_to_cpu(plan, group_channels=group_channels(exported.graph_module))
    quantizer = StableQuantQuantizer(plan, target=target)
    prepared = prepare_pt2e(exported.module(), quantizer)
    calibrate(prepared, calibration)
    converted = convert_pt2e(prepared)
    if target == "xnnpack":
        snap_biases_to_int32_grid(converted)
    planned = [s.name for s in quantizer.layer_status if s.status == "int8"]
    summary = require_int8_layers(converted, planned)
    return QuantizedModel(converted, quantizer.plan, target, quantizer.layer_status, summary)


def quantize_model(
    model: nn.Module,
    example: torch.Tensor,
    calibration: Iterable[torch.Tensor],
    *,
    plan: QuantPlan | None = None,
    target: Target = "x86_inductor",
    fit_to_cpu: bool = True,
    dynamic_time: bool = False,
    lengths: LengthRange | None = None,
) -> QuantizedModel:
    """Export ``model`` and quantize it with ``plan`` (see :func:`quantize_exported`).

    ``dynamic_time=False`` (default) exports one fixed length, ``example``'s: the safe
    route for inductor's int8 convolutions. ``lengths`` exports a bounded range of
    frame-aligned lengths instead, for a dynamic-length ExecuTorch program
    (:func:`~sq_pt2e.backends.executorch_xnnpack.lower_to_xnnpack`).
    """
    exported = export_speech_model(model, example, dynamic_time=dynamic_time, lengths=lengths)
    return quantize_exported(exported, calibration, plan=plan, target=target, fit_to_cpu=fit_to_cpu)


def save_program(quantized: QuantizedModel, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Save the converted int8 graph as a ``torch.export`` program (``.pt2``), atomically.

    The program takes ``(1, samples)`` waveforms of ``example``'s length. Load it with
    :func:`load_program` and run it eagerly, or compile it with
    ``sq_pt2e.backends.inductor.compile_inductor``.

    Returns:
        The path written.
    """
    from sq_pt2e.atomic import atomic_write_bytes

    program = torch.export.export(quantized.converted, (example,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_program(path: str | os.PathLike[str]) -> GraphModule:
    """The int8 graph saved by :func:`save_program`, ready to run or compile.

    Raises:
        FileNotFoundError: no such file.
        QuantizationError: the file is not a saved program.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"quantized program {source} does not exist (written by `sq-pt2e quantize`)")
    try:
        return torch.export.load(source).module()
    except Exception as exc:  # torch raises several unrelated types for a damaged archive
        raise QuantizationError(f"cannot load quantized program {source}: {exc}") from exc
