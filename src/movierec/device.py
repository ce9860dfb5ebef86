"""Which device and precision a command runs on: one check for `train.device`, `evaluate --device` and the rest."""

from __future__ import annotations

import torch

from movierec.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r} (movierec trains on those)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return device


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether to use a GradScaler)."""
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; on CPU use fp32 or bf16")
        return torch.float16, True
    if name == "bf16":
        return torch.bfloat16, False
    return None, False


def available_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can take on `device`: free GPU memory, or the OS's estimate of available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)
