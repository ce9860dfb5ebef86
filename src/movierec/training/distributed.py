"""Data-parallel training under `torchrun`: process group, device per rank, and the few collectives we use.

`torchrun --nproc_per_node N -m movierec train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the
run is one process and every helper here is a no-op, so single-process code paths need no branches.
Backend: nccl when the run trains on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from movierec.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of a float64 array over all ranks (the array itself when alone)."""
        if not self.enabled:
            return values
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        if self.backend == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def all_reduce_min(self, value: int) -> int:
        """The smallest `value` over all ranks (`value` itself when alone)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device="cuda" if self.backend == "nccl" else "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())


def setup(device_name: str) -> tuple[Distributed, str]:
    """Join the torchrun process group when launched by torchrun; returns it and the device for this rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device_name
    if "RANK" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={world_size} but RANK is not set: launch several processes with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={device_name} but CUDA is not available on rank {rank}")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"rank {rank} could not join the {backend} process group: {exc}") from exc
    return Distributed(rank, world_size, local_rank, backend), device_name


def teardown(finished: bool = True) -> None:
    """Leave the process group. After a finished run the ranks first wait for each other: rank 0 still
    logs to MLflow after the last collective, and a rank that destroyed its gloo group and exited while
    its peer was busy was seen to abort (SIGABRT) once under load. After a failure nobody waits: torchrun
    stops the other ranks."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()
