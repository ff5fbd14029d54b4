"""Lower a converted int8 graph to an ExecuTorch ``.pte`` with the XNNPACK delegate.

By default the program is exported at one fixed waveform length (the example's): a
``.pte`` exported from a 5 s example only accepts 5 s, so :class:`PteRunner` checks the
input length and raises instead of failing obscurely on device. With a
:class:`~sq_pt2e.framing.LengthRange` the program takes any frame-aligned length up to
a maximum; its int8 CNN convolutions then run as int8 GEMMs over windows
(:class:`~sq_pt2e.passes.conv1d_as_window_gemm.QuantizedConv1dAsWindowGemmPass`),
because executorch 1.5.1's XNNPACK runtime crashes on a quantized convolution of
dynamic length. The lowering report says how much of the graph XNNPACK took (delegate
calls, nodes left to ExecuTorch's portable kernels, by op) and compares the ``.pte``
output with eager.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule

from sq_pt2e.atomic import atomic_write_bytes
from sq_pt2e.errors import AudioError, BackendError, NumericsMismatchError
from sq_pt2e.framing import LengthRange

__all__ = ["LoweringReport", "PteRunner", "check_pte", "lower_to_xnnpack", "save_pte", "xnnpack_friendly"]

_DELEGATE_CALL = "executorch_call_delegate"


@dataclass(frozen=True)
class LoweringReport:
    """How the graph was split between XNNPACK and ExecuTorch's portable kernels, and how many
    Linears store 4-bit packed weights."""

    delegate_calls: int
    portable_ops: dict[str, int]
    input_samples: int
    pte_bytes: int
    lower_seconds: float
    int4_linear_layers: int = 0
    cosine: float | None = None
    max_abs_diff: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def portable_op_count(self) -> int:
        return sum(self.portable_ops.values())

    def summary(self) -> str:
        """``N XNNPACK partitions, M portable ops`` and the Linears with 4-bit packed weights, if any."""
        text = f"{self.delegate_calls} XNNPACK partitions, {self.portable_op_count} portable ops"
        if self.int4_linear_layers:
            text += f", {self.int4_linear_layers} Linears with 4-bit packed weights"
        return text


def _split_report(graph_module: GraphModule) -> tuple[int, dict[str, int]]:
    delegates, portable = 0, Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if _DELEGATE_CALL in name:
            delegates += 1
        elif name != "getitem":
            portable[name] += 1
    return delegates, dict(sorted(portable.items()))


def xnnpack_friendly(model: torch.nn.Module, example: torch.Tensor, lengths: LengthRange | None = None
                     ) -> GraphModule:
    """A copy of ``model`` as a GraphModule with norms and attention in XNNPACK-delegated ops.

    Applies :class:`~sq_pt2e.passes.decompose_norms.DecomposeNormsPass` and
    :class:`~sq_pt2e.passes.decompose_attention.DecomposeAttentionPass` (numerics unchanged up
    to float rounding), and marks 4-bit Linear weights for packing
    (:func:`~sq_pt2e.passes.int4_linear_weights.pack_int4_linear_weights`; exact).
    """
    from sq_pt2e.passes.decompose_attention import DecomposeAttentionPass
    from sq_pt2e.passes.decompose_norms import DecomposeNormsPass
    from sq_pt2e.passes.int4_linear_weights import pack_int4_linear_weights
    from sq_pt2e.passes.remove_trivial_attention_mask import RemoveTrivialAttentionMaskPass

    if isinstance(model, GraphModule):
        graph = copy.deepcopy(model)
    else:
        with torch.no_grad():
            graph = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(lengths)).module()
    for graph_pass in (RemoveTrivialAttentionMaskPass(), DecomposeNormsPass(), DecomposeAttentionPass()):
        graph_pass(graph)
    pack_int4_linear_weights(graph)
    return graph


def lower_to_xnnpack(
    model: torch.nn.Module, example: torch.Tensor, *, friendly: bool = True, lengths: LengthRange | None = None
) -> tuple[bytes, LoweringReport]:
    """Export ``model`` at ``example``'s shape (or over ``lengths``) and lower it with the XNNPACK partitioner.

    Args:
        model: an int8 ``convert_pt2e`` graph (quantized with ``target="xnnpack"``) or a
            float model.
        example: the ``(batch, samples)`` waveform that fixes the program's input shape
            (with ``lengths``: one of the lengths, to trace with).
        friendly: first rewrite norms and attention into ops XNNPACK runs, so fewer ops fall
            back to portable kernels, and pack 4-bit Linear weights (:func:`xnnpack_friendly`).
        lengths: make the program take every length of this range (export the int8 model
            with the same range: ``quantize_model(..., lengths=lengths)``).

    Returns:
        The ``.pte`` bytes and the lowering report (without numerics; see :class:`PteRunner`).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.kernels import quantized  # noqa: F401  (out variants of q/dq ops left outside XNNPACK)

    from sq_pt2e.passes.conv1d_as_window_gemm import QuantizedConv1dAsWindowGemmPass
    from sq_pt2e.passes.infer_symbolic_reshape_dim import infer_symbolic_reshape_dim
    from sq_pt2e.passes.int4_linear_weights import packed_int4_linear_weights

    start = time.perf_counter()
    try:
        program = xnnpack_friendly(model, example, lengths) if friendly else model
        if lengths is not None and isinstance(program, GraphModule):
            program = copy.deepcopy(program) if program is model else program
            QuantizedConv1dAsWindowGemmPass()(program)
        int4_linears = len(packed_int4_linear_weights(program)) if isinstance(program, GraphModule) else 0
        with torch.no_grad():
            exported = torch.export.export(program, (example,), dynamic_shapes=_dynamic_shapes(lengths))
            edge = to_edge_transform_and_lower(exported, transform_passes=[infer_symbolic_reshape_dim],
                                               partitioner=[XnnpackPartitioner()])
            delegates, portable = _split_report(edge.exported_program().graph_module)
            program = edge.to_executorch()
    except Exception as exc:  # executorch raises many types; keep the cause
        raise BackendError(f"lowering to ExecuTorch/XNNPACK failed: {exc}") from exc
    data = bytes(program.buffer)
    report = LoweringReport(
        delegate_calls=delegates,
        portable_ops=portable,
        input_samples=int(example.shape[-1]) if lengths is None else lengths.max_samples,
        pte_bytes=len(data),
        lower_seconds=time.perf_counter() - start,
        int4_linear_layers=int4_linears,
    )
    return data, report


def _dynamic_shapes(lengths: LengthRange | None) -> tuple[dict[int, object]] | None:
    return None if lengths is None else ({1: lengths.export_dim()},)


def save_pte(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write a ``.pte`` atomically."""
    return atomic_write_bytes(path, data)


class PteRunner:
    """Run a ``.pte`` with the ExecuTorch Python runtime (XNNPACK threads set before load).

    Args:
        program: ``.pte`` bytes or a path to a ``.pte`` file.
        input_samples: the waveform length the program was exported for (its maximum, with ``lengths``).
        threads: XNNPACK thread pool size.
        lengths: the range a dynamic-length program was exported over; a waveform in it is
            cut to :meth:`~sq_pt2e.framing.LengthRange.aligned` length (the dropped trailing
            samples, fewer than a hop, complete no frame).
    """

    def __init__(self, program: bytes | str | os.PathLike[str], input_samples: int, threads: int | None = None,
                 *, lengths: LengthRange | None = None) -> None:
        from executorch.runtime import Runtime

        if threads is not None:
            _set_xnnpack_threads(threads)
        # The runtime reads the program from this buffer without copying it: keep the
        # bytes and the Program alive as long as the Method (freeing them crashes).
        self._data = program if isinstance(program, bytes) else Path(program).read_bytes()
        self.input_samples = input_samples
        self.lengths = lengths
        self._program = Runtime.get().load_program(self._data)
        self._method = self._program.load_method("forward")

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.ndim != 2:
            raise BackendError(f"this .pte takes a (1, samples) waveform; got shape {tuple(wave.shape)}")
        if self.lengths is not None:
            try:
                wave = self.lengths.cut(wave)
            except AudioError as exc:
                raise BackendError(str(exc)) from exc
        elif wave.shape[-1] != self.input_samples:
            msg = (
                f"this .pte was exported for waveforms of shape (1, {self.input_samples}); got "
                f"{tuple(wave.shape)}: pad/chunk the audio, export at the length you need or export with a "
                "range of lengths (lower_to_xnnpack(..., lengths=...), sq-pt2e export --dynamic)"
            )
            raise BackendError(msg)
        (output,) = self._method.execute([wave.contiguous()])
        return output


def _set_xnnpack_threads(threads: int) -> None:
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    except ImportError:
        return
    _unsafe_reset_threadpool(threads)


def check_pte(runner: PteRunner, reference: torch.Tensor, wave: torch.Tensor, report: LoweringReport,
              *, min_cosine: float = 0.99) -> LoweringReport:
    """Compare the ``.pte`` output with ``reference`` (eager int8); raise if they disagree."""
    from sq_pt2e.backends.inductor import compare_outputs

    cosine, max_diff = compare_outputs(reference, runner(wave))
    checked = LoweringReport(**{**report.__dict__, "cosine": cosine, "max_abs_diff": max_diff})
    if cosine < min_cosine:
        msg = f".pte output disagrees with eager int8: cosine {cosine:.5f} < {min_cosine} (max abs diff {max_diff:.4g})"
        raise NumericsMismatchError(msg)
    return checked
