"""Data-parallel training under `torchrun`: process group, device per rank, and the few collectives we use.

`torchrun --nproc_per_node N -m movierec train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the
run is one process and every helper here is a no-op, so single-process code paths need no branches.
Backend: nccl when the run trains on CUDA, gloo on CPU.

A rank that dies (SIGKILL, out of memory) breaks the job: gloo raises in the survivors' next collective at
once, and torchrun SIGTERMs them within its monitor interval (0.1 s), whichever comes first. Both end as
one `PeerLostError` naming the lost rank (`is_peer_failure`, `sigterm_raises_system_exit`), not a traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import psutil
import torch
import torch.distributed as dist

from movierec.errors import ConfigError, MovierecError

# what gloo's errors say when a peer's process is gone (its sockets closed) or no longer answers (timeout)
PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out")


class PeerLostError(MovierecError):
    """Another process of the torchrun job died or stopped answering, so this one cannot go on."""


@dataclass(frozen=True)
class Process:
    """A rank's process, as its peers can check whether it still runs."""

    host: str
    pid: int
    started: float  # psutil's create_time: a reused pid is not mistaken for the process

    @classmethod
    def this(cls) -> Process:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def ended(self) -> bool:
        """Whether it ran on this host and is gone (or a zombie); a process of another host is not known to be."""
        if self.host != socket.gethostname():
            return False
        try:
            process = psutil.Process(self.pid)
            return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - self.started) >= 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:
            return False


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    processes: tuple[Process, ...] = ()  # per rank, exchanged when the group is joined

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

    def from_main(self, value: str | None) -> str | None:
        """Rank 0's `value` on every rank (`value` itself when alone)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def ended_peers(self) -> list[int]:
        """The other ranks whose process on this host is gone."""
        return [rank for rank, process in enumerate(self.processes) if rank != self.rank and process.ended()]

    def lost_peers(self, wait_s: float = 2.0) -> list[int]:
        """The ranks a peer failure lost: those whose process is gone, polled for up to `wait_s` seconds (a
        dying process closes its sockets a moment before it is gone); else, of two processes, the other one;
        else none known (a peer on another host)."""
        deadline = time.monotonic() + wait_s
        while not (ended := self.ended_peers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not ended and self.world_size == 2:
            return [1 - self.rank]
        return ended

    def describe_lost(self, lost: list[int]) -> str:
        """The start of a survivor's line: which ranks it lost, where known."""
        if not lost:
            return "lost a peer process"
        return f"lost rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {self.world_size}"


_joined: Distributed | None = None  # the group this process joined: process-global, like torch's own


def joined() -> Distributed:
    """The group this process joined (a one-process Distributed before `setup` or after `teardown`)."""
    return _joined or Distributed()


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` stops this rank because a peer died or stopped answering: a torch.distributed collective
    failing so (not a bug: a mismatched collective or a wrong tensor still raises as it is), or torchrun's
    SIGTERM (SystemExit, `sigterm_raises_system_exit`) after a peer on this host ended."""
    if _joined is None:
        return False
    if isinstance(exc, SystemExit):
        return bool(_joined.ended_peers())
    text = str(exc).lower()  # torch's DistBackendError is a RuntimeError
    return isinstance(exc, RuntimeError) and any(marker in text for marker in PEER_FAILURE_MARKERS)


@contextmanager
def sigterm_raises_system_exit() -> Iterator[None]:
    """While inside (the main thread of a torchrun job), SIGTERM raises SystemExit(143), on every rank: rank 0
    ends its MLflow run KILLED (this replaces tracking.sigterm_raises_system_exit under torchrun), and when
    torchrun sends it because a peer died, `is_peer_failure` tells. A SystemExit is not caught and rewrapped by
    libraries, as an error would be. A SIGTERM that arrives while an error is being handled (gloo's, a moment
    earlier) lets that finish; after a PeerLostError SIGTERM is ignored, so the process exits with its status
    2, not as -15 (torchrun SIGKILLs a process that does not exit in 30 s)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    main_thread = threading.current_thread() is threading.main_thread()
    if world_size <= 1 or not main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        if sys.exc_info()[1] is not None:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except PeerLostError:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def setup(device_name: str) -> tuple[Distributed, str]:
    """Join the torchrun process group when launched by torchrun; returns it and the device for this rank.
    The ranks exchange their process ids, so that a survivor can name the rank it lost."""
    global _joined
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
    processes: list[Process | None] = [None] * world_size
    dist.all_gather_object(processes, Process.this())
    _joined = Distributed(rank, world_size, local_rank, backend, tuple(processes))
    return _joined, device_name


def teardown(finished: bool = True) -> None:
    """Leave the process group. After a finished run the ranks first wait for each other: rank 0 still
    logs to MLflow after the last collective, and a rank that destroyed its gloo group and exited while
    its peer was busy was seen to abort (SIGABRT) once under load. After a failure nobody waits: torchrun
    stops the other ranks."""
    global _joined
    _joined = None
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()
