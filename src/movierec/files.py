"""Atomic file writes: a reader (or a crash) never sees half a checkpoint, model or export."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(out: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `out`; once the caller has written it, flush it to disk and rename it
    over `out`. On any error the temporary file is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
