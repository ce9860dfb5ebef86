"""Request limits enforced before the app sees a request: framing, body size, body time, concurrency.

:class:`RequestLimits` is a plain ASGI middleware (no Starlette request objects), so it sees every HTTP
request exactly as the server hands it over and answers a bad one itself, with the same JSON error body
as the app (``{"detail": "<what is wrong>"}``):

- **431** when the request line and headers take more than ``MAX_HEADER_BYTES`` (16 KiB), counted as
  :func:`header_bytes` does; the server's parser must be told to pass on at least that much (``movierec
  serve`` gives h11 ``PARSER_HEADER_BUFFER``), or its own refusal comes first;
- **400** when the framing is ambiguous: both ``Transfer-Encoding`` and ``Content-Length`` (a server and
  a proxy in front of it could disagree on where the body ends: request smuggling), more than one
  ``Content-Length``, or one that is not a decimal number;
- **411** for a method that carries a body (POST, PUT, PATCH) sent without ``Content-Length``;
- **413** when ``Content-Length`` is over the limit, and also as soon as the bytes actually received pass
  it, whatever the headers said: the body is counted as it arrives, never trusted, and nothing past the
  limit is kept;
- **408** when no body bytes arrive for ``body_timeout`` seconds, or the whole body takes longer than
  ``body_deadline`` seconds (a stalled or trickled upload);
- **503** when ``max_uploads`` requests are already reading their bodies (for a request with a body), or
  ``max_concurrent`` requests are already being served. The two budgets are separate, so clients that hold
  uploads open (stalled or slow) cannot take the slots of GET requests, and ``/health`` (``EXEMPT``) is
  never counted: a health check answers whatever the load.

Answers that leave request bytes unread (400, 408, 411, 413, 431, 503) carry ``Connection: close``, so the
server closes the connection instead of reading (and discarding) the rest of the body. A request that
passes is handed to the app with its body already read (at most ``max_body_bytes``), in one message.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MAX_CONTENT_LENGTH_DIGITS = 18  # any longer number is over every sensible limit (and int() of it is cheap)
MAX_HEADER_BYTES = 16 * 1024  # the request line and headers, as header_bytes() counts them
# what `movierec serve` lets h11 buffer of an incomplete header block: every block up to it reaches this
# middleware (431 JSON), a bigger one may get h11's own 400 text/plain instead, depending on how it arrives
PARSER_HEADER_BUFFER = 64 * 1024


EXEMPT = frozenset({"/health"})  # answered whatever the load: a probe must tell "busy" from "down"


def check_limits(
    max_body_bytes: int, body_timeout: float, body_deadline: float, max_concurrent: int, max_uploads: int = 1
) -> None:
    """Raise ValueError for limits that cannot work (a negative size, a timeout that is not positive, ...)."""
    if not (max_body_bytes >= 0 and body_timeout > 0 and body_deadline > 0 and min(max_concurrent, max_uploads) >= 1):
        raise ValueError(
            "request limits need max_body_bytes >= 0, body_timeout > 0, body_deadline > 0, max_concurrent >= 1 and "
            f"max_uploads >= 1; got {max_body_bytes}, {body_timeout}, {body_deadline}, {max_concurrent}, {max_uploads}"
        )


async def send_error(
    send: Send, status: int, detail: str, *, close: bool, headers: dict[str, str] | None = None
) -> None:
    """Answer `status` with the app's error body, `{"detail": detail}`; `close` asks the server to hang up."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    try:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except Exception:
        return


def header_bytes(scope: Scope) -> int:
    """The request line and headers as `METHOD target HTTP/v`, `name: value` lines and CRLFs: what the client
    sent less any optional whitespace (the parser drops it), so a limit on it never depends on segmentation."""
    query = scope.get("query_string") or b""
    target = (scope.get("raw_path") or scope.get("path", "").encode()) + (b"?" + query if query else b"")
    line = f"{scope.get('method', '')}  HTTP/{scope.get('http_version', '')}\r\n"  # the target goes between
    return len(line) + len(target) + sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ())) + 2


def is_json_but_not_utf8(scope: Scope, body: bytes) -> bool:
    """A JSON body in another encoding (UTF-16, UTF-32): Python's json would accept it, the docs promise 422."""
    types = [v for n, v in scope.get("headers", ()) if n.lower() == b"content-type"]
    if not body or not types or b"json" not in types[0].lower():
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


class RequestLimits:
    """ASGI middleware: see the module docstring. One instance per app, so `max_concurrent` is per app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout: float,
        body_deadline: float,
        max_concurrent: int,
        max_uploads: int | None = None,
    ) -> None:
        max_uploads = max_concurrent if max_uploads is None else max_uploads
        check_limits(max_body_bytes, body_timeout, body_deadline, max_concurrent, max_uploads)
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.body_deadline = body_deadline
        self.limits = {"uploads": max_uploads, "requests": max_concurrent}
        self.in_progress = {"uploads": 0, "requests": 0}
        self._count_lock = threading.Lock()  # a server runs one event loop; a test client may run several

    def _enter(self, budget: str) -> bool:
        with self._count_lock:
            if self.in_progress[budget] >= self.limits[budget]:
                return False
            self.in_progress[budget] += 1
            return True

    def _leave(self, budget: str) -> None:
        with self._count_lock:
            self.in_progress[budget] -= 1

    async def _busy(self, send: Send, budget: str) -> None:
        what = "uploads are being received" if budget == "uploads" else "requests are in progress"
        detail = f"the server is busy ({self.limits[budget]} {what}); retry later"
        await send_error(send, 503, detail, close=True, headers={"Retry-After": "1"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._check_headers(scope)
        if problem is not None:
            status, detail = problem
            await send_error(send, status, detail, close=True)
            return
        exempt = scope.get("path") in EXEMPT and scope.get("method") in ("GET", "HEAD")
        framed = {name.lower() for name, _ in scope.get("headers", ())} & {b"content-length", b"transfer-encoding"}
        upload = not exempt and (scope.get("method") in BODY_METHODS or bool(framed))
        if upload and not self._enter("uploads"):  # receiving a body holds an upload slot, never a serving one
            await self._busy(send, "uploads")
            return
        try:
            body = await self._read_body(receive, send)
        finally:
            if upload:
                self._leave("uploads")
        if body is None:
            return  # answered already, or the client went away
        if is_json_but_not_utf8(scope, body):
            await send_error(
                send, 422, "body: JSON decode error: the body is not UTF-8 (JSON must be UTF-8)", close=False
            )
            return
        if not exempt and not self._enter("requests"):
            await self._busy(send, "requests")
            return
        try:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()  # only `http.disconnect` is left to come
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)
        finally:
            if not exempt:
                self._leave("requests")

    def _check_headers(self, scope: Scope) -> tuple[int, str] | None:
        if header_bytes(scope) > MAX_HEADER_BYTES:
            return 431, f"request line and headers over {MAX_HEADER_BYTES} bytes"
        lengths, encodings = [], []
        for name, value in scope.get("headers", ()):
            name = name.lower()
            if name == b"content-length":
                lengths.append(value.strip())
            elif name == b"transfer-encoding":
                encodings.append(value)
        if lengths and encodings:
            return 400, "a request must not have both Transfer-Encoding and Content-Length"
        if len(lengths) > 1:
            return 400, "a request must have at most one Content-Length header"
        if lengths:
            length = lengths[0]
            if not length.isdigit():
                return 400, f"Content-Length must be a decimal number of bytes, got {length.decode('latin-1')!r}"
            if len(length) > MAX_CONTENT_LENGTH_DIGITS or int(length) > self.max_body_bytes:
                return 413, f"request body over {self.max_body_bytes} bytes"
        elif scope.get("method") in BODY_METHODS:
            return 411, "a request body needs a Content-Length header"
        return None

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once a 408/413 has been sent or the client has disconnected."""
        body = bytearray()
        deadline = anyio.current_time() + self.body_deadline
        more_body = True
        while more_body:
            wait = min(self.body_timeout, deadline - anyio.current_time())
            message = None
            if wait > 0:
                with anyio.move_on_after(wait):
                    message = await receive()
            if message is None:
                stalled = wait >= self.body_timeout
                why = f"no body bytes for {self.body_timeout:g} s" if stalled else f"over {self.body_deadline:g} s"
                await send_error(send, 408, f"request body not received in time ({why})", close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await send_error(send, 413, f"request body over {self.max_body_bytes} bytes", close=True)
                return None
            more_body = message.get("more_body", False)
        return bytes(body)
