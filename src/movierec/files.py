"""Atomic file writes and folder locks: a reader (or a crash) never sees half a checkpoint, model or export,
and two runs never write into one run folder."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from movierec.errors import MovierecError

STALE_AFTER_S = 24 * 3600  # a temporary file of ours this old is left over, whoever wrote it


def umask() -> int:
    """The process umask, read without changing it (Linux exposes it; elsewhere set-and-restore)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def shared_mode(directory: bool = False) -> int:
    """Permissions for what we create: 0666 (files) or 0777 (folders) less the umask, as `open` would give.

    `mkstemp`/`mkdtemp` create private 0600/0700 entries, which would make outputs unreadable to others.
    """
    return (0o777 if directory else 0o666) & ~umask()


def _owner_tag() -> str:
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


def _is_left_over(tmp: Path, out_name: str) -> bool:
    """Whether `tmp` (a `.NAME.HOST-PID.XXXX.tmp` file of ours) belongs to no running process."""
    owner = tmp.name[len(out_name) + 2 :].split(".", 1)[0]
    host, _, pid = owner.rpartition("-")
    if host == socket.gethostname().split(".")[0] and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        return time.time() - tmp.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def remove_left_over_temporaries(out: Path) -> None:
    """Delete the temporary files a killed writer of `out` left behind (ours only, never a live writer's)."""
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        if _is_left_over(tmp, out.name):
            tmp.unlink(missing_ok=True)


def check_output_file(out: str | Path, flag: str) -> Path:
    """`out` as a file to write later, checked now (before hours of work): not a folder, and not under a file."""
    out = Path(out)
    if out.is_dir():
        raise MovierecError(f"{flag} {out} is a folder; give a file name")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MovierecError(f"{flag} {out}: {parent} is a file, not a folder")
    return out


@contextlib.contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; once the caller has written it, flush it to disk and rename it
    over `out`. On any error (a full disk included) the temporary file is removed and `out` is left as it was.
    Temporary files left by a killed writer of the same `out` are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_left_over_temporaries(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{_owner_tag()}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, shared_mode())
        os.replace(tmp, out)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(out)) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


class GuardedWriter:
    """A binary file for torch's serializers that keeps the first OSError (a full disk) and re-raises it
    once the serializer is done. Torch's zip writer cannot take an error in the middle of an archive: it
    turns it into an opaque RuntimeError, or aborts the process from a destructor (TorchScript)."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # noqa: SIM115 (closed in __exit__)
        self.error: OSError | None = None

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self._file.write(data)
            except OSError as exc:
                self.error = exc
        return len(memoryview(data))

    def flush(self) -> None:
        if self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self.error = exc

    def __enter__(self) -> GuardedWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._file.close()
        except OSError as exc:
            self.error = self.error or exc
        if self.error is not None and exc_info[0] is None:
            raise self.error


class FolderLock:
    """An exclusive lock on a folder for the life of one process: `with FolderLock(run_dir, "train"): ...`.

    It is an `fcntl.flock` on `<folder>/.lock`, so the kernel releases it when the holder exits, however it
    exits: a lock left by a killed process is simply taken over. The file names the holder (pid, host,
    start time) so that the refusal can say who has the folder.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path, purpose: str):
        self.folder, self.purpose = Path(folder), purpose
        self._handle = None

    def __enter__(self) -> FolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / self.NAME, "a+")  # held open: closing it releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise MovierecError(
                f"{self.folder} is in use by a running `movierec {self.purpose}` ({holder}); wait for it to "
                "finish or choose another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None
