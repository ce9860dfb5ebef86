"""User-facing errors.

Anything the user can fix (a wrong path, a corrupt file, an id out of range, a mismatched checkpoint) is
raised as :class:`MovierecError` with a message that says what is wrong and how to fix it. The CLI prints
that message on one line and exits with status 2; it never shows a traceback for these.
"""


class MovierecError(Exception):
    """An error caused by input the user can correct."""


class DataError(MovierecError):
    """A dataset file or folder is missing, corrupt or inconsistent."""


class ConfigError(MovierecError):
    """A run configuration or command-line value is invalid."""


class CheckpointError(MovierecError):
    """A checkpoint is missing, corrupt, or does not fit the model or data it is used with."""


class TrackingError(MovierecError):
    """The MLflow tracking store (a server or a local store) cannot be reached or refuses a request."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception's message on one line, at most `limit` characters, for error messages and warnings."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
