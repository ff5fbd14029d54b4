"""How much faster int8 GEMMs are than float32 GEMMs on this CPU: the most int8 can gain.

A Transformer speech model spends most of its time in the feed-forward and attention
projections, so no int8 flow can make it faster than the int8 GEMM kernels are against
the float32 ones on the same CPU. This module times one feed-forward block (two Linears,
``frames x hidden -> intermediate -> hidden``, at the model's own shapes) in float32 and
in int8, through inductor (oneDNN int8 against MKL float32) and through ExecuTorch
(XNNPACK qs8 against f32). Both int8 paths are verified: inductor's compiled code must
call the oneDNN int8 kernels (:func:`~sq_pt2e.backends.inductor.compile_inductor`), and
the ``.pte`` must be one XNNPACK partition with no portable op; both outputs must agree
with float32. The ratio depends on the CPU's ISA entirely (AVX2 without VNNI multiplies
int8 through 16-bit products), which is why the benchmark prints it next to its rows.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sq_pt2e.compare import timed_runs_ms
from sq_pt2e.errors import Int8NotUsedError, NumericsMismatchError

__all__ = ["BACKENDS", "GemmCeiling", "feed_forward_shape", "measure_gemm_ceiling"]

BACKENDS = ("inductor", "xnnpack")
_MIN_COSINE = 0.99


@dataclass(frozen=True)
class GemmCeiling:
    """Float32 and int8 latency of one feed-forward block on one backend."""

    backend: str
    frames: int
    hidden: int
    intermediate: int
    threads: int
    fp32_ms: float
    int8_ms: float

    @property
    def macs(self) -> int:
        return 2 * self.frames * self.hidden * self.intermediate

    @property
    def speedup(self) -> float:
        """Float32 time over int8 time."""
        return self.fp32_ms / self.int8_ms


def feed_forward_shape(model: nn.Module, samples: int) -> tuple[int, int, int]:
    """``(frames, hidden, intermediate)`` of ``model``'s feed-forward blocks for ``samples`` of audio."""
    from sq_pt2e.framing import cnn_geometry, frame_count, speech_config

    config = speech_config(model)
    if config is None or not hasattr(config, "intermediate_size"):
        raise ValueError(f"{type(model).__name__} has no wav2vec2/HuBERT config (hidden_size, intermediate_size)")
    return frame_count(samples, cnn_geometry(model)), int(config.hidden_size), int(config.intermediate_size)


def _block(hidden: int, intermediate: int) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    block = nn.Sequential(nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5)
    return block


def _check_agrees(reference: torch.Tensor, output: torch.Tensor, what: str) -> None:
    from sq_pt2e.backends.inductor import compare_outputs

    cosine, _ = compare_outputs(reference, output)
    if cosine < _MIN_COSINE:
        raise NumericsMismatchError(f"{what} disagrees with float32: cosine {cosine:.4f} < {_MIN_COSINE}")


def _quantized(block: nn.Module, x: torch.Tensor, quantizer: object) -> torch.fx.GraphModule:
    """``block`` exported, prepared with ``quantizer``, calibrated on ``x`` and converted."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(torch.export.export(copy.deepcopy(block), (x,)).module(), quantizer)
    with torch.no_grad():
        prepared(x)
    return convert_pt2e(prepared)


def _inductor_pair(block: nn.Module, x: torch.Tensor, threads: int, runs: int) -> tuple[float, float]:
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from sq_pt2e.backends.inductor import compile_inductor
    from sq_pt2e.bench import compiled_forward

    fp32 = compiled_forward(copy.deepcopy(block), x)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    # compile_inductor checks that both Linears run oneDNN int8 kernels and that compiled int8 matches eager int8.
    int8 = compile_inductor(_quantized(block, x, quantizer), x, threads=threads, min_cosine=_MIN_COSINE,
                            conv_as_gemm=False)
    with torch.no_grad():
        _check_agrees(block(x), int8(x), "inductor int8")
    return _median_ms(fp32, x, runs), _median_ms(int8, x, runs)


def _xnnpack_pair(block: nn.Module, x: torch.Tensor, threads: int, runs: int) -> tuple[float, float]:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    from sq_pt2e.backends.executorch_xnnpack import PteRunner, lower_to_xnnpack

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    runners = []
    for program in (block, _quantized(block, x, quantizer)):
        data, report = lower_to_xnnpack(program, x, friendly=False)
        if report.delegate_calls != 1 or report.portable_op_count:
            raise Int8NotUsedError(f"the feed-forward block lowered to {report.delegate_calls} XNNPACK partitions "
                                   f"and {report.portable_op_count} portable ops (expected one partition, none)")
        runners.append(PteRunner(data, x.shape[-1], threads=threads))
    with torch.no_grad():
        _check_agrees(block(x), runners[1](x), "XNNPACK int8 .pte")
    return _median_ms(runners[0], x, runs), _median_ms(runners[1], x, runs)


def _median_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, runs: int) -> float:
    return statistics.median(timed_runs_ms(fn, x, runs=runs))


def measure_gemm_ceiling(frames: int, hidden: int, intermediate: int, *, threads: int, runs: int = 10,
                         backends: Sequence[str] = BACKENDS) -> list[GemmCeiling]:
    """Time a ``frames x hidden -> intermediate -> hidden`` Linear pair in float32 and int8 per backend.

    Args:
        frames, hidden, intermediate: the block's shape (:func:`feed_forward_shape` of a model).
        threads: intra-op threads (inductor) and XNNPACK thread pool size.
        runs: timed calls per variant, after 2 warm-up calls (the median is kept).
        backends: ``"inductor"`` and/or ``"xnnpack"``.

    Raises:
        Int8NotUsedError: an int8 variant would not run int8 kernels.
        NumericsMismatchError: an int8 variant disagrees with float32.
    """
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown} (known: {', '.join(BACKENDS)})")
    torch.set_num_threads(threads)
    block = _block(hidden, intermediate)
    x = torch.randn(frames, hidden, generator=torch.Generator().manual_seed(1))
    pairs = {"inductor": _inductor_pair, "xnnpack": _xnnpack_pair}
    results = []
    for backend in backends:
        fp32_ms, int8_ms = pairs[backend](block, x, threads, runs)
        results.append(GemmCeiling(backend, frames, hidden, intermediate, threads, fp32_ms, int8_ms))
    return results
