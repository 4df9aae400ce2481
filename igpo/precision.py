"""bf16 where the hardware computes it natively, fp32 elsewhere.

bf16 autocast pays only on hardware with bf16 instructions. Measured with benchmarks/sft_throughput.py on two
2-core x86 machines that both report AVX-512 (torch 2.13.0+cpu, the tiny model's SFT step, real tokens/s):

    CPU with native bf16 (2026-12-02):                    bf16 5,357   fp32 3,741   (fp32 0.70x)
    CPU without (oneDNN "AVX-512 with DL Boost", 12-03):  bf16 1,681   fp32 4,226   (fp32 2.51x)

On the second machine `make demo` took 38 minutes with bf16 everywhere, against 9.8 on the first. So the CPU
configs ask `${igpo.if_native_bf16:A,B}`, an OmegaConf resolver registered when igpo is imported: A where
training would compute in bf16 natively (a CUDA GPU with bf16 support; a CPU with AVX-512 bf16 or AMX), else B.
It is resolved when the config is (resolved_config.yaml records the value), and it decides a warm start's bytes,
so the SFT cache key holds the resolved `bf16` and the CPU features (igpo.artifacts.numerics).
Objects built in Python choose the same way by default: `PrecisionSettings()` ("native"), `SFTConfig(bf16=None)`,
`VLLMGenerator(dtype="native")`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

RESOLVER = "igpo.if_native_bf16"


def cpu_features() -> list[str]:
    """The CPU's matmul extensions torch checks for (bf16, AMX tiles and fp16, VNNI), as named by torch.cpu."""
    import torch

    return [name for name in ("avx512_bf16", "amx_tile", "amx_fp16", "vnni")
            if getattr(torch.cpu, f"_is_{name}_supported", lambda: False)()]


def native_bf16(device: str | None = None) -> bool:
    """Whether bf16 matmuls run natively on `device` ("cpu" or "cuda"; None: CUDA when available, as Lightning's
    "auto" accelerator picks it, else the CPU). On the CPU: AVX-512 bf16 or AMX tiles (torch.cpu's checks)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device != "cpu":
        raise ValueError(f"native_bf16: device must be 'cpu' or 'cuda', got {device!r}")
    return bool({"avx512_bf16", "amx_tile"} & set(cpu_features()))


def if_native_bf16(when_native: Any, otherwise: Any) -> Any:
    """`when_native` if this machine trains in bf16 natively (native_bf16()), else `otherwise`."""
    return when_native if native_bf16() else otherwise


def register_resolvers() -> None:
    """Register `${igpo.if_native_bf16:A,B}` (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, if_native_bf16)
