"""Malformed and oversized requests, sent as raw bytes to one real `movierec serve`: each gets the answer that
docs/serving.md lists for it (the table under "Malformed and oversized requests": the HTTP parser's own
plain-text 400, the app's JSON 400/413/431, or a normal answer), and the server goes on serving."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from itertools import dropwhile, takewhile
from typing import NamedTuple

import httpx
import pytest
from serving_docs import DOCS
from test_api import connect, head, read_response, served_run

from movierec.serving.limits import MAX_HEADER_BYTES, PARSER_HEADER_BUFFER

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
PARSER_BODY = b"Invalid HTTP request received."
ANSWERS = {  # the docs' answer column: the (status, content type) pairs each label allows
    "400 text/plain": {(400, TEXT)},
    "400 JSON": {(400, JSON)},
    "413 JSON": {(413, JSON)},
    "431 JSON": {(431, JSON)},
    "431 JSON or 400 text/plain": {(431, JSON), (400, TEXT)},
    "accepted": {(200, JSON)},
}
RECOMMEND = b'{"history": [13], "k": 1}'
PIECE = 4000  # requests go out in pieces a moment apart: a header block of up to 64 KiB must survive arriving so


class Case(NamedTuple):
    id: str
    row: str  # the request column of the docs' table
    answer: str  # its answer column
    request: bytes


def post(*headers: str) -> bytes:
    return head("POST", "/v1/recommendations", "Content-Type: application/json", *headers)


def padded(size: int) -> bytes:
    """GET /health with an `X-Pad` header making the request line and headers exactly `size` bytes."""
    return head("GET", "/health", "X-Pad: " + "a" * (size - len(head("GET", "/health", "X-Pad: "))))


def big_header(size: int) -> bytes:
    return head("GET", "/health", "X-Big: " + "a" * size)


PARSER = "400 text/plain"
BAD_VALUE = "a NUL, CR, VT or FF byte in a header value"
BAD_TARGET = "a byte that is not printable ASCII in the request target (a NUL, raw UTF-8)"
NOT_A_NUMBER = "a `Content-Length` that is not a decimal number (`abc`, `-1`)"
OVER = "request line and headers of 16 KiB + 1 byte to 64 KiB (a 20 KB or a 60 KB header)"
TLS_CLIENT_HELLO = bytes.fromhex("16030100c4010000c00303") + bytes(32)  # what an https:// client sends first
CASES = [
    Case("nul-in-header-value", BAD_VALUE, PARSER, head("GET", "/health", "X-A: a\0b")),
    Case("cr-in-header-value", BAD_VALUE, PARSER, head("GET", "/health", "X-A: a\rb")),
    Case("bad-byte-in-header-name", "a space or another byte not allowed in a header name (`X A: 1`, `Host : x`)",
         PARSER, head("GET", "/health", "X A: 1")),
    Case("header-without-colon", "a header line without a colon", PARSER, head("GET", "/health", "NoColon")),
    Case("nul-in-path", BAD_TARGET, PARSER, head("GET", "/he\0alth")),
    Case("utf8-in-path", BAD_TARGET, PARSER, head("GET", "/h\u00e9alth")),
    Case("http11-without-host", "HTTP/1.1 without a `Host` header", PARSER, b"GET /health HTTP/1.1\r\n\r\n"),
    Case("two-hosts", "two `Host` headers", PARSER, head("GET", "/health", "Host: example.org")),
    Case("two-content-lengths", "two `Content-Length` headers with different values", PARSER,
         post("Content-Length: 5", "Content-Length: 6")),
    Case("content-length-not-a-number", NOT_A_NUMBER, PARSER, post("Content-Length: abc")),
    Case("content-length-negative", NOT_A_NUMBER, PARSER, post("Content-Length: -1")),
    Case("content-length-26-digits", "a `Content-Length` of more than 20 digits", PARSER,
         post("Content-Length: " + "9" * 26)),
    Case("transfer-encoding-gzip", "a `Transfer-Encoding` other than `chunked` (`gzip`)", PARSER,
         post("Transfer-Encoding: gzip")),
    Case("transfer-encoding-twice", "two `Transfer-Encoding` headers", PARSER,
         post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked")),
    Case("tls", "TLS: an `https://` client on this plain-HTTP port", PARSER, TLS_CLIENT_HELLO),
    Case("1-MB-header", "request line and headers over 320 KiB (a 1 MB header)", PARSER, big_header(1_000_000)),
    Case("100-KB-header", "request line and headers of 64 KiB + 1 byte to 320 KiB (a 100 KB header)",
         "431 JSON or 400 text/plain", big_header(100_000)),
    Case("60-KB-header", OVER, "431 JSON", big_header(60_000)),
    Case("20-KB-header", OVER, "431 JSON", big_header(20_000)),
    Case("16-KiB-and-1-byte", OVER, "431 JSON", padded(MAX_HEADER_BYTES + 1)),
    Case("16-KiB", "request line and headers of at most 16 KiB (16,384 bytes)", "accepted",
         padded(MAX_HEADER_BYTES)),
    Case("control-byte-in-header-value", "another control byte in a header value (`\\x01`, DEL)", "accepted",
         head("GET", "/health", "X-A: a\x01b\x7f")),
    Case("transfer-encoding-and-content-length", "both `Transfer-Encoding: chunked` and `Content-Length`",
         "400 JSON", post("Transfer-Encoding: chunked", "Content-Length: 5")),
    Case("same-content-length-twice", "two `Content-Length` headers with the same value (read as one)", "accepted",
         post(f"Content-Length: {len(RECOMMEND)}", f"Content-Length: {len(RECOMMEND)}") + RECOMMEND),
    Case("content-length-20-digits", "a `Content-Length` over 1 MiB of up to 20 digits", "413 JSON",
         post("Content-Length: " + "9" * 20)),
]  # fmt: skip


@pytest.fixture(scope="module")
def port(trained_run, tmp_path_factory) -> Iterator[int]:
    """`movierec serve` of the tiny trained run, as a user starts it, on a free port of 127.0.0.1."""
    with served_run(trained_run.run_dir, tmp_path_factory.mktemp("parser-server")) as port:
        yield port


def documented_answers() -> dict[str, str]:
    """The table under "Malformed and oversized requests" in docs/serving.md: request -> answer."""
    lines = DOCS.read_text().split("#### Malformed and oversized requests", 1)[1].splitlines()
    table = list(takewhile(lambda line: line.startswith("|"), dropwhile(lambda line: not line.startswith("|"), lines)))
    return dict(line[2:-2].split(" | ") for line in table[2:])  # after the header and separator rows


def test_the_docs_list_every_case():
    assert documented_answers() == {case.row: case.answer for case in CASES}
    assert {case.answer for case in CASES} == set(ANSWERS)
    assert MAX_HEADER_BYTES == 16 * 1024 and PARSER_HEADER_BUFFER == 64 * 1024  # the table's numbers


def receive_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection (a reset after its answer ends it too)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_request_gets_the_documented_answer(port, case):
    with connect(port) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it was all sent
            for start in range(0, len(case.request), PIECE):
                sock.sendall(case.request[start : start + PIECE])
                time.sleep(0.002)
        if case.answer == "accepted":  # answered, and the connection serves the next request
            status, headers, body = read_response(sock)
            assert (status, headers["content-type"]) == (200, JSON), body
            assert "connection" not in headers and json.loads(body)
            sock.sendall(head("GET", "/health"))
            assert read_response(sock)[0] == 200
        else:  # refused, and the connection closed (reading to its end proves it)
            answer = receive_until_closed(sock)
            assert b"\r\n\r\n" in answer, answer
            head_block, body = answer.split(b"\r\n\r\n", 1)
            status_line, *lines = head_block.decode("latin-1").split("\r\n")
            headers = {name.strip().lower(): value.strip() for name, value in (x.split(":", 1) for x in lines)}
            status = int(status_line.split()[1])
            assert (status, headers["content-type"]) in ANSWERS[case.answer], answer
            assert headers["connection"] == "close"
            if headers["content-type"] == TEXT:
                assert body == PARSER_BODY
            else:
                assert len(body) == int(headers["content-length"])
                assert isinstance(json.loads(body)["detail"], str)
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200


def test_the_listening_socket_gets_tcp_nodelay_connections():
    """asyncio sets TCP_NODELAY only on connections of a socket made with IPPROTO_TCP; without it every
    keep-alive answer (headers and body written apart) waited out a ~40 ms delayed ACK."""
    import asyncio.base_events
    import socket

    from movierec.cli import bind

    listener = bind("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        asyncio.base_events._set_nodelay(accepted)  # what the event loop does to each accepted connection
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for sock in (accepted, client, listener):
            sock.close()
