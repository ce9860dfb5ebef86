"""Downloading MovieLens archives into a local cache: resumable, atomic, checksum-verified.

- Cache ("data home"): `--data-home`, else the environment variable MOVIEREC_DATA_HOME, else
  `~/.cache/movierec`. An archive lands there under its GroupLens file name (`ml-1m.zip`).
- Atomic: bytes go to `<file>.part`; only a complete, verified file is renamed to `<file>`, so a file with
  the final name is always complete. An interrupted download leaves the `.part` file, and the next run
  resumes it with an HTTP Range request (falling back to a fresh start when the server ignores ranges).
- Verified: the MD5 of every release that has a published one is checked; a mismatch names the URL and
  both checksums and deletes the bad bytes. A verified file gets a `<file>.md5` note (checksum, size, mtime)
  so that later runs need not hash it again while it is unchanged.
- Deadlines: the answer's headers must arrive within `timeout` seconds in all (connect included), and a body
  that delivers less than STALL_MIN_BYTES in any STALL_S seconds counts as a dropped connection (retried,
  resuming), so neither a black-hole mirror nor one that trickles a byte at a time can hang a download.
- Progress: a bar on a terminal, else a plain line every 10 s (`MOVIEREC_PROGRESS_SECONDS`).
- Offline: `--archive PATH` uses an archive you already have (verified the same way; `--no-verify` skips
  the check) and `--base-url` / MOVIEREC_BASE_URL points at a mirror holding the same file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from movierec.data.registry import DEFAULT_BASE_URL, Release, get_release
from movierec.errors import DataError

ENV_DATA_HOME = "MOVIEREC_DATA_HOME"
ENV_BASE_URL = "MOVIEREC_BASE_URL"
CHUNK = 1 << 20
STALL_S = 30.0  # a body that delivers less than STALL_MIN_BYTES in this many seconds has stalled
STALL_MIN_BYTES = 64 << 10


def data_home(path: str | Path | None = None) -> Path:
    """The download cache: `path`, else $MOVIEREC_DATA_HOME, else ~/.cache/movierec."""
    chosen = path or os.environ.get(ENV_DATA_HOME) or Path.home() / ".cache" / "movierec"
    return Path(chosen).expanduser()


def base_url(url: str | None = None) -> str:
    """Where archives are downloaded from: `url`, else $MOVIEREC_BASE_URL, else GroupLens."""
    return (url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")


def md5_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _note_path(path: Path) -> Path:
    return path.with_name(path.name + ".md5")


def _write_note(path: Path, md5: str) -> None:
    stat = path.stat()
    note = {"md5": md5, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _note_path(path).write_text(json.dumps(note) + "\n")


def cached_md5(path: Path, remember: bool = True) -> str:
    """MD5 of `path`, taken from its `.md5` note when size and mtime still match, else computed.

    With `remember`, a computed MD5 is written to the note (used for files in the cache, not for archives
    the user passes, whose folders we leave alone).
    """
    try:
        note = json.loads(_note_path(path).read_text())
        stat = path.stat()
        if note["size"] == stat.st_size and note["mtime_ns"] == stat.st_mtime_ns:
            return str(note["md5"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    md5 = md5_file(path)
    if not remember:
        return md5
    with contextlib.suppress(OSError):  # a read-only archive folder: just hash again next time
        _write_note(path, md5)
    return md5


class _ByteProgress:
    """Bytes received: a rich download bar on a terminal, plain `Progress` lines otherwise, nothing if off."""

    def __init__(self, label: str, total: int | None, done: int, enabled: bool):
        from movierec.progress import Progress

        self.bar = self.lines = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
            from rich.progress import Progress as Bar

            columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
            self.bar = Bar(*columns, console=Console(stderr=True))
            self.task = self.bar.add_task(label, total=total, completed=done)
        elif enabled:
            self.lines = Progress(f"download {label}", total or 0, "bytes")
            self.lines.done = done

    def __enter__(self) -> _ByteProgress:
        for shown in (self.bar, self.lines):
            if shown is not None:
                shown.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        for shown in (self.bar, self.lines):
            if shown is not None:
                shown.__exit__(*exc_info)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)
        if self.lines is not None:
            self.lines.advance(n)


def _open(request: urllib.request.Request, timeout: float):
    """`urlopen(request)` whose status line and headers arrive within `timeout` seconds in all (on a thread,
    so that a server trickling its headers cannot hold it longer; socket reads time out after `timeout`)."""
    outcome: list = []

    def open_it() -> None:
        try:
            outcome.append(urllib.request.urlopen(request, timeout=timeout))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=open_it, daemon=True)
    thread.start()
    thread.join(timeout)
    failure = outcome[0] if outcome else TimeoutError()
    if isinstance(getattr(failure, "reason", None), TimeoutError):  # urllib's wrapping of a connect timeout
        failure = failure.reason
    if isinstance(failure, TimeoutError):
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    if isinstance(failure, BaseException):
        raise failure
    return failure


def _hint(release: Release | None) -> str:
    if release is None:
        return "check the URL"
    return (
        f"check the network or the mirror (--base-url / ${ENV_BASE_URL}), or get {release.filename} "
        "another way and pass --archive PATH"
    )


def _content_range_start(header: str | None) -> tuple[int, int | None] | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header or "")
    if not match:
        return None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def fetch(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    release: Release | None = None,
    progress: bool = True,
    retries: int = 2,
    timeout: float = 20.0,
    retry_wait: float = 1.0,
) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming a previous partial download.

    A dropped, silent or stalled connection is retried `retries` times, each time resuming where it stopped
    (a black-hole mirror fails after about (retries + 1) * timeout seconds). The file is renamed to `dest`
    only when it is complete and, if `md5` is given, matches it.
    """
    from movierec import __version__

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": f"movierec/{__version__}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            error = _fetch_once(request, part, offset, progress, timeout, dest.name)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                break  # the .part file already holds everything the server has: verify it below
            if exc.code >= 500 and attempt < retries:
                attempt += 1
                time.sleep(retry_wait)
                continue
            raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}; {_hint(release)}") from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            error = f"{type(exc).__name__}: {reason}"
        if error is None:
            break
        if attempt < retries:
            attempt += 1
            time.sleep(retry_wait)
            continue
        have = part.stat().st_size if part.exists() else 0
        raise DataError(
            f"download of {url} was interrupted ({error}) with {have:,} bytes in {part}; run the same command "
            f"again to resume, or {_hint(release)}"
        )
    if md5 is not None:
        actual = md5_file(part)
        if actual != md5:
            part.unlink(missing_ok=True)
            raise DataError(
                f"checksum mismatch for {url}: expected MD5 {md5}, got {actual}; the download was deleted. "
                f"Run again to retry, or {_hint(release)}"
            )
        os.replace(part, dest)
        _write_note(dest, md5)
    else:
        os.replace(part, dest)
    return dest


def _fetch_once(request, part: Path, offset: int, progress: bool, timeout: float, label: str) -> str | None:
    """One HTTP request appending to `part`; returns None when complete, else why it stopped early."""
    with _open(request, timeout) as response:
        status = response.status
        length = response.headers.get("Content-Length")
        total: int | None = None
        if offset and status == 206:
            start_total = _content_range_start(response.headers.get("Content-Range"))
            if start_total is None or start_total[0] != offset:
                part.unlink(missing_ok=True)  # an unexpected range: start over rather than corrupt the file
                return f"unexpected Content-Range {response.headers.get('Content-Range')!r}"
            mode, total = "ab", start_total[1]
        else:
            offset, mode = 0, "wb"  # 200: the server sent the whole file (it ignores ranges)
        if total is None and length is not None and length.isdigit():
            total = offset + int(length)
        received = offset
        window_start, window_bytes = time.monotonic(), 0
        with open(part, mode) as handle, _ByteProgress(label, total, offset, progress) as shown:
            try:
                while block := response.read1(CHUNK):  # what has arrived, so that the stall check runs
                    handle.write(block)
                    received += len(block)
                    window_bytes += len(block)
                    shown.advance(len(block))
                    if time.monotonic() - window_start >= STALL_S:
                        if window_bytes < STALL_MIN_BYTES:
                            return f"stalled: {window_bytes:,} bytes in {STALL_S:.0f} s after {received:,} bytes"
                        window_start, window_bytes = time.monotonic(), 0
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
                return f"{type(exc).__name__} after {received:,} bytes"
    if total is not None and received < total:
        return f"connection closed after {received:,} of {total:,} bytes"
    return None


def verify_archive(release: Release, path: str | Path, verify: bool = True) -> str | None:
    """Check an archive the user supplied against the release's MD5 (unless `verify` is off); return its MD5."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"archive {path} does not exist; pass the path of {release.filename}")
    actual = cached_md5(path, remember=False)
    if verify and release.md5 is not None and actual != release.md5:
        raise DataError(
            f"archive {path} has MD5 {actual}, but {release.name} ({release.url()}) has MD5 {release.md5}: it is "
            "corrupt, truncated or another release; download it again, or pass --no-verify to use it anyway"
        )
    return actual


def download(
    name: str,
    *,
    home: str | Path | None = None,
    url: str | None = None,
    archive: str | Path | None = None,
    verify: bool = True,
    progress: bool = True,
    retries: int = 2,
    timeout: float = 20.0,
) -> Path:
    """Make sure release `name` is in the cache and return its path.

    With `archive`, that file is verified and copied into the cache instead of downloading (offline use).
    A cached file is re-checked (cheaply, through its `.md5` note) before it is returned.
    """
    release = get_release(name)
    home = data_home(home)
    dest = home / release.filename
    if archive is not None:
        verify_archive(release, archive, verify)
        home.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        shutil.copyfile(Path(archive).expanduser(), part)
        os.replace(part, dest)
        if release.md5 and verify:
            _write_note(dest, release.md5)
        return dest
    if dest.is_file():
        if release.md5 is None or not verify:
            return dest
        actual = cached_md5(dest)
        if actual == release.md5:
            return dest
        print(
            f"movierec: cached {dest} has MD5 {actual}, expected {release.md5}; downloading it again",
            file=sys.stderr,
        )
        dest.unlink()
        _note_path(dest).unlink(missing_ok=True)
    source = release.url(base_url(url))
    return fetch(
        source,
        dest,
        md5=release.md5 if verify else None,
        release=release,
        progress=progress,
        retries=retries,
        timeout=timeout,
    )


def obtain_archive(
    name: str,
    *,
    archive: str | Path | None = None,
    home: str | Path | None = None,
    url: str | None = None,
    verify: bool = True,
    progress: bool = True,
) -> tuple[Path, dict]:
    """The archive to prepare from: the user's `archive` (verified in place) or the cached download.

    Returns (path, source description for meta.json).
    """
    release = get_release(name)
    if archive is not None:
        path = Path(archive).expanduser()
        md5 = verify_archive(release, path, verify)
        return path, {"archive": str(path.resolve()), "md5": md5, "md5_verified": bool(verify and release.md5)}
    path = download(name, home=home, url=url, verify=verify, progress=progress)
    md5 = cached_md5(path)
    return path, {
        "archive": str(path.resolve()),
        "url": release.url(base_url(url)),
        "md5": md5,
        "md5_verified": bool(verify and release.md5),
    }
