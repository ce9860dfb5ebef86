"""Where MLflow runs live, and how this package talks to MLflow: shared by training (which logs runs) and by
serving and export (which read `runs:/` and `models:/` references), so that none of them imports another."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

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
