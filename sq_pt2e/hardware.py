"""What the CPU can do for int8 and bf16: model name and the relevant ISA flags."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuInfo", "cpu_info"]

_RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class CpuInfo:
    """CPU model and the ISA flags that decide int8 / bf16 speed and exactness."""

    model: str
    flags: tuple[str, ...]
    logical_cpus: int

    @property
    def has_vnni(self) -> bool:
        """True when u8*s8 dot products accumulate in int32 without int16 saturation."""
        return any(f in self.flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))

    @property
    def has_amx_int8(self) -> bool:
        """True when oneDNN runs int8 kernels on AMX tiles (Intel Sapphire Rapids and later)."""
        return "amx_int8" in self.flags

    def summary(self) -> str:
        return f"{self.model} ({self.logical_cpus} CPUs; {' '.join(self.flags) or 'no AVX2'})"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """Read ``/proc/cpuinfo`` (Linux); other systems report the platform name only."""
    import os

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
    return CpuInfo(model=model, flags=relevant, logical_cpus=os.cpu_count() or 1)
