"""Where MLflow runs live, and how this package talks to MLflow: shared by training (which logs runs) and by
serving and export (which read `runs:/` and `models:/` references), so that none of them imports another."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import logging
import os
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from movierec.errors import TrackingError, one_line

DEFAULT_DB = "mlflow.db"
# MLflow's usage telemetry would try to reach the internet; a training run has no business doing that.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's HTTP client waits 120 s for an answer and retries 7 times with backoff 2: a closed port fails after
# about 4.5 minutes, a server that accepts but never answers after about 20. These defaults (a user's own
# settings win) make a call to a server that is gone fail within about 2 minutes (a few seconds for a closed
# port) while still riding out a restart of a few seconds. `check_server` fails faster still, before training.
HTTP_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
for _name, _value in HTTP_CLIENT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
logging.getLogger("mlflow.utils.requirements_utils").setLevel(logging.ERROR)
# creating a fresh SQLite store logs INFO lines on stderr, which would break the CLI's one-line errors
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    A relative `sqlite:///path` is made absolute: MLflow caches stores by URI string for the life of the
    process, so a relative one would stay bound to the working directory it was first used from.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        uri = f"sqlite:///{Path(path).resolve()}{sep}{query}"
    return uri


@contextlib.contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive `flock` on a SQLite store's file while MLflow opens it.

    Opening a new or older SQLite store creates or migrates its schema, and MLflow does that without a lock:
    two trainings started together on one store both run the migration, and the loser fails with "index ...
    already exists" (or leaves the schema half-migrated). `flock` is independent of SQLite's own `fcntl`
    locks, so holding it on the database file itself serialises the openings and nothing else. Other URIs
    pass through.
    """
    name = uri.removeprefix("sqlite:///").partition("?")[0] if uri.startswith("sqlite:///") else ""
    if name in ("", ":memory:"):
        yield
        return
    import fcntl

    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # an empty file is what SQLite makes of a new database anyway
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


PROBE_TIMEOUT_S = 5.0  # per try of `check_server`, for the whole answer (not per read: a trickle is no answer)
PROBE_PAUSES_S = (1.0, 2.0)  # between its tries: 3 tries, at most about 18 s in all
SQLITE_HEADER = b"SQLite format 3\x00"


def check_uri(uri: str) -> None:
    """A tracking URI MLflow can use, or a one-line TrackingError: an http(s) URL that parses, a SQLite
    store that is a database file (or none yet), a database URI whose driver is installed."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        try:
            parsed = urllib.parse.urlsplit(uri)
            parsed.port  # noqa: B018 (raises on a bad port)
        except ValueError as exc:
            raise TrackingError(f"tracking URI {uri} is not a valid URL ({exc})") from exc
        if not parsed.hostname:
            raise TrackingError(f"tracking URI {uri} names no host")
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
        if path.is_dir():
            raise TrackingError(f"tracking URI {uri}: {path} is a folder, not a SQLite store file")
        if path.is_file() and path.stat().st_size and path.open("rb").read(16) != SQLITE_HEADER:
            raise TrackingError(f"tracking URI {uri}: {path} is not a SQLite database")
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        driver = {"postgresql": "psycopg2", "mysql": "pymysql", "mssql": "pyodbc"}[scheme.split("+")[0]]
        if "+" not in scheme and importlib.util.find_spec(driver) is None:
            raise TrackingError(f"tracking URI {uri} needs the database driver {driver}: pip install {driver}")


def _probe(url: str) -> BaseException | None:
    """One GET of `url`, the whole answer within PROBE_TIMEOUT_S (on a thread, so that a server sending a byte
    at a time cannot hold it longer); None when it answered, else why not."""
    outcome: list = []

    def fetch() -> None:
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as answer:
                answer.read(1 << 16)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return outcome[0] if outcome else TimeoutError()


def check_server(uri: str, experiment: str = "Default") -> None:
    """Fail fast, with one line naming `uri`, when an http(s) tracking server does not answer.

    Called before training starts: three tries of `PROBE_TIMEOUT_S` each (so about 3 s for a closed port,
    18 s for a server that accepts connections but never answers), instead of MLflow's own minutes of retries.
    Any HTTP answer below 500 counts as answering (404: no such experiment yet; 401/403: MLflow's request will
    carry the credentials), as does a TLS error (MLflow has its own TLS settings); other URIs are not probed.
    """
    check_uri(uri)
    if not uri.lower().startswith(("http://", "https://")):
        return
    query = urllib.parse.urlencode({"experiment_name": experiment})
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    started, reason = time.monotonic(), ""
    for pause in (*PROBE_PAUSES_S, None):
        exc = _probe(url)
        if exc is None:
            return
        if isinstance(exc, urllib.error.HTTPError):
            if exc.code < 500:
                return
            reason = f"it answered HTTP {exc.code} {exc.reason}"
        elif isinstance(exc, urllib.error.URLError):
            if isinstance(exc.reason, ssl.SSLError):
                return
            reason = _describe(exc.reason)
        else:
            reason = _describe(exc)
        if pause is not None:
            time.sleep(pause)
    tries = len(PROBE_PAUSES_S) + 1
    raise TrackingError(
        f"MLflow tracking server {uri} is not answering ({reason}; {tries} tries in "
        f"{time.monotonic() - started:.0f} s): start it, or point --tracking-uri / MLFLOW_TRACKING_URI at one "
        "that runs (or at a local store, e.g. sqlite:///mlflow.db)"
    )


def _describe(exc: BaseException | str) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer within {PROBE_TIMEOUT_S:.0f} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "it closed the connection without answering"
    return one_line(exc)


class _DeadlinePassed(BaseException):
    """Raised by SIGALRM inside MLflow's client; a BaseException, so that no `except Exception` in a library
    on the way can swallow it and go on waiting."""


def request_deadline_s(extra_bytes: int = 0) -> float:
    """The most a request to the tracking server may take in all: MLflow's HTTP client settings' worst case
    (every try timing out, plus the backoff between tries) and 5 s, plus a second per MB uploaded."""
    try:
        timeout = float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        retries = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        backoff = float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    except (KeyError, ValueError) as exc:
        raise TrackingError(f"MLflow HTTP client settings are not numbers: {one_line(exc)}") from exc
    return timeout * (retries + 1) + sum(backoff * 2**i for i in range(retries)) + 5 + extra_bytes / 1e6


@contextlib.contextmanager
def request_deadline(uri: str, what: str, seconds: float | None = None) -> Iterator[None]:
    """Fail `what` with a one-line TrackingError when an http(s) tracking server has not finished it within
    `seconds` (default `request_deadline_s()`) in all.

    MLflow's timeout is per socket read, so a server that trickles bytes, or answers each retry just in time,
    can hold a call for ever. A timer signal interrupts the blocked call instead; it needs the main thread
    (the CLI's), so elsewhere (and for local stores) MLflow's own timeouts are all there is.
    """
    if not uri.lower().startswith(("http://", "https://")) or threading.current_thread() is not threading.main_thread():
        yield
        return
    seconds = request_deadline_s() if seconds is None else seconds

    def expire(signum, frame) -> None:
        raise _DeadlinePassed

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _DeadlinePassed:
        raise TrackingError(f"MLflow tracking server {uri} did not finish {what} within {seconds:.0f} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
