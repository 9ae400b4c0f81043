"""Which floating-point type to compute in: bfloat16 where the hardware has bf16 units, else float32.

"auto" (the default of every dtype / bf16 setting) is resolved here, where the model runs (a Ray
Train worker, an engine actor), never on the driver: the driver of a GPU cluster job may have no GPU.

Why it matters: bf16 is only fast with hardware support. Measured on two x86 CPUs of the same family
(2 cores): with AVX-512 BF16, a bf16 matmul runs ~7x faster than float32 (760 vs 110 GFLOP/s); with
AVX2 only, oneDNN has no bf16 kernels and the same matmul runs at ~1 GFLOP/s, 100x *slower* than
float32 (SmolLM2-135M forward + backward: 4 tokens/s in bf16, 105 in float32). A fixed bf16 setting
makes the main job unusable on the second machine; a fixed float32 wastes the first.
"""

from __future__ import annotations

import functools
import os

import torch

# CPU flags (Linux /proc/cpuinfo) that give oneDNN bf16 matmul kernels.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_bf16(device: str | torch.device | None = None) -> bool:
    """True where bfloat16 matmuls are at least as fast as float32 ones on `device` (default: CUDA
    when this process sees a GPU, else the CPU). MAHALO_BF16=0/1 overrides the detection."""
    forced = os.environ.get("MAHALO_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_bf16_units()
    return False


def cpu_bf16_units() -> bool:
    """The CPU has bf16 matmul units: torch's own probes (what oneDNN and vLLM's CPU backend use), else
    the Linux CPU flags."""
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is not None:
        return bool(avx512_bf16() or (amx is not None and amx()))
    return any(f in cpu_flags() for f in BF16_CPU_FLAGS)


def resolve_dtype(name: str, device: str | torch.device | None = None) -> str:
    """A dtype name from config: "auto" becomes "bfloat16" or "float32" (fast_bf16); others pass."""
    if name == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    return name


def resolve_bf16(flag: bool | str, device: str | torch.device | None = None) -> bool:
    """A bf16 setting from config (true, false or "auto") as a bool."""
    if flag == "auto":
        return fast_bf16(device)
    return bool(flag)


def dtype_name(bf16: bool | str) -> str:
    """The model dtype name of a bf16 setting: true -> "bfloat16", false -> "float32", "auto" stays
    "auto" (resolved where the model is loaded)."""
    if bf16 == "auto":
        return "auto"
    return "bfloat16" if bf16 else "float32"
