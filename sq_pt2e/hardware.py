"""What the CPU can do for int8 and bf16: model name and the relevant ISA flags.

oneDNN runs no instructions above ``ONEDNN_MAX_CPU_ISA`` when that is set (e.g. ``AVX2`` on a
CPU with VNNI, to reproduce an AVX2-only machine): :func:`cpu_info` then drops the flags the
cap hides, so plans are fitted to the kernels that really run.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuInfo", "capped_by_onednn", "cpu_info"]

_RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
_AMX = ("amx_bf16", "amx_int8", "amx_tile")
# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) below the top: the flags of ours each one hides
_HIDDEN_BY_ONEDNN_ISA_CAP = {
    **dict.fromkeys(("SSE41", "AVX", "AVX2"), ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", *_AMX)),
    **dict.fromkeys(("AVX2_VNNI", "AVX2_VNNI_2"), ("avx512f", "avx512_vnni", "avx512_bf16", *_AMX)),
    "AVX512_CORE": ("avx512_vnni", "avx_vnni", "avx512_bf16", *_AMX),
    "AVX512_CORE_VNNI": ("avx512_bf16", *_AMX),
    **dict.fromkeys(("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"), _AMX),
}


@dataclass(frozen=True)
class CpuInfo:
    """CPU model and the ISA flags that decide int8 / bf16 speed and exactness."""

    model: str
    flags: tuple[str, ...]
    logical_cpus: int
    isa_cap: str = ""  # ONEDNN_MAX_CPU_ISA when it hid some of the CPU's flags

    @property
    def has_vnni(self) -> bool:
        """True when u8*s8 dot products accumulate in int32 without int16 saturation."""
        return any(f in self.flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))

    @property
    def has_amx_int8(self) -> bool:
        """True when oneDNN runs int8 kernels on AMX tiles (Intel Sapphire Rapids and later)."""
        return "amx_int8" in self.flags

    @property
    def exact_int8_operand_bits(self) -> int:
        """Widest signed grid of an int8 GEMM's second operand (weights, attention's k and v) whose
        products with uint8 inputs are exact: 8 with VNNI; 7 without, where pairs of u8*s8 products
        are summed in a saturating int16 (``vpmaddubsw``) and 255 * 64 * 2 < 2**15."""
        return 8 if self.has_vnni else 7

    def summary(self) -> str:
        cap = f"; oneDNN capped at {self.isa_cap}" if self.isa_cap else ""
        return f"{self.model} ({self.logical_cpus} CPUs; {' '.join(self.flags) or 'no AVX2'}{cap})"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """Read ``/proc/cpuinfo`` (Linux), less what ``ONEDNN_MAX_CPU_ISA`` hides; other systems
    report the platform name only."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
    relevant = tuple(f for f in _RELEVANT_FLAGS if f in flags)
    return capped_by_onednn(CpuInfo(model=model, flags=relevant, logical_cpus=os.cpu_count() or 1),
                            os.environ.get("ONEDNN_MAX_CPU_ISA", ""))


def capped_by_onednn(cpu: CpuInfo, max_isa: str) -> CpuInfo:
    """``cpu`` as oneDNN sees it under ``ONEDNN_MAX_CPU_ISA=max_isa`` (empty or ``ALL``: unchanged)."""
    cap = max_isa.strip().upper()
    hidden = set(_HIDDEN_BY_ONEDNN_ISA_CAP.get(cap, ())) & set(cpu.flags)
    if not hidden:
        return cpu
    return CpuInfo(cpu.model, tuple(f for f in cpu.flags if f not in hidden), cpu.logical_cpus, cap)
