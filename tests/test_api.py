"""The HTTP service: every endpoint and error case on the real app (TestClient), and the real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from serving_docs import DOCS, documented_commands, quickstart_layout

from movierec.serving.http import (
    BODY_DEADLINE,
    BODY_TIMEOUT,
    MAX_BATCH,
    MAX_BODY_BYTES,
    MAX_CONCURRENT_REQUESTS,
    MAX_CONCURRENT_UPLOADS,
    MAX_HISTORY,
    MAX_K,
    create_app,
)
from movierec.serving.loader import load_model


@pytest.fixture(scope="module")
def rec(trained_run):
    return load_model(trained_run.run_dir)


@pytest.fixture(scope="module")
def client(rec):
    with TestClient(create_app(rec)) as c:
        yield c


@pytest.fixture(scope="module")
def users(rec) -> list[int]:
    return rec.known_user_ids[[0, 5, -1]].tolist()


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for fragment in fragments:
        assert fragment in detail, detail


def test_health(client, rec):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "sse-pt" and body["dataset"] == "synthetic"
    assert body["num_items"] == rec.num_items == 150 and body["num_users"] == len(rec.known_users)


def test_openapi_schema_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/health",
        "/v1/users/{user_id}/recommendations",
        "/v1/recommendations",
        "/v1/users/recommendations",
        "/v1/items/{movie_id}",
        "/v1/items",
        "/v1/genres",
        "/v1/users/{user_id}/history",
        "/v1/recommendations/explained",
    }
    fields = schema["components"]["schemas"]["RecommendationOut"]["properties"]
    assert set(fields) == {"rank", "movieId", "title", "score"}
    assert schema["components"]["schemas"]["HistoryRequest"]["properties"]["history"]["maxItems"] == MAX_HISTORY


def test_openapi_declares_one_error_schema_for_every_error_status(client):
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            statuses = set(operation["responses"])
            refusals = {"400", "413"} if path == "/health" else {"400", "408", "413", "503"}
            assert {"200", *refusals} <= statuses and ("503" in statuses) == (path != "/health"), (path, method)
            assert ("411" in statuses) == (method == "post"), (path, method)
            assert ("422" in statuses) == (path not in ("/health", "/v1/genres")), (path, method)  # no parameters
            for status, response in operation["responses"].items():
                if status != "200":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorOut", (path, method, status)
    assert schema["components"]["schemas"]["ErrorOut"]["properties"]["detail"]["type"] == "string"


# --------------------------------------------------------------------------- GET user recommendations


def test_user_recommendations(client, rec, users):
    user = users[1]
    body = client.get(f"/v1/users/{user}/recommendations", params={"k": 6}).json()
    assert body["userId"] == user
    recs = body["recommendations"]
    expected = rec.recommend_user(user, 6)
    assert [r["movieId"] for r in recs] == [r.movie_id for r in expected]
    assert [r["rank"] for r in recs] == list(range(1, 7))
    assert [r["title"] for r in recs] == [r.title for r in expected]
    assert not {r["movieId"] for r in recs} & set(rec.history_of(user))
    default = client.get(f"/v1/users/{user}/recommendations").json()["recommendations"]
    assert len(default) == 10
    seen = client.get(f"/v1/users/{user}/recommendations", params={"k": 150, "include_seen": "true"}).json()
    assert {r["movieId"] for r in seen["recommendations"]} == set(rec.item_movie_ids.tolist())


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        ("/v1/users/1/recommendations", 404, "unknown user 1"),
        ("/v1/users/{user}/recommendations?k=0", 422, "k: Input should be greater than or equal to 1"),
        ("/v1/users/{user}/recommendations?k=-1", 422, "k: Input should be greater than or equal to 1"),
        ("/v1/users/{user}/recommendations?k=151", 422, "k must be an integer from 1 to 150"),
        (f"/v1/users/{{user}}/recommendations?k={MAX_K + 1}", 422, f"k: Input should be less than or equal to {MAX_K}"),
        ("/v1/users/{user}/recommendations?k=ten", 422, "k: Input should be a valid integer"),
        ("/v1/users/{user}/recommendations?include_seen=maybe", 422, "include_seen: Input should be a valid boolean"),
        ("/v1/users/abc/recommendations", 422, "user_id: Input should be a valid integer"),
        ("/v1/users/-5/recommendations", 422, "user_id: Input should be greater than or equal to 0"),
        (f"/v1/users/{2**70}/recommendations", 422, "user_id: Input should be less than or equal to"),
        ("/v1/users/1.5/recommendations", 422, "user_id: Input should be a valid integer"),
    ],
)
def test_user_recommendation_errors(client, users, path, status, fragment):
    assert_error(client.get(path.format(user=users[0])), status, fragment)


# --------------------------------------------------------------------------- POST history


def test_history_recommendations(client, rec):
    watched = rec.item_movie_ids[[3, 9, 1]].tolist()
    response = client.post("/v1/recommendations", json={"history": [*watched, 7, 999_999], "k": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["unknownMovieIds"] == [7, 999_999]
    expected = rec.recommend_history(watched, 4).recommendations
    assert [r["movieId"] for r in body["recommendations"]] == [r.movie_id for r in expected]
    assert [r["rank"] for r in body["recommendations"]] == [1, 2, 3, 4]
    assert not {r["movieId"] for r in body["recommendations"]} & set(watched)
    default = client.post("/v1/recommendations", json={"history": watched}).json()
    assert len(default["recommendations"]) == 10 and default["unknownMovieIds"] == []
    with_seen = client.post("/v1/recommendations", json={"history": watched, "k": 150, "include_seen": True}).json()
    assert len(with_seen["recommendations"]) == 150


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"history": []}, 422, "history: List should have at least 1 item"),
        ({"history": [1, 2, 999]}, 422, "none of the history's movieIds is known to this model"),
        ({"history": list(range(MAX_HISTORY + 1))}, 422, f"history: List should have at most {MAX_HISTORY} items"),
        ({"history": [13], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"history": [13], "k": 151}, 422, "k must be an integer from 1 to 150"),
        ({"history": [13], "k": True}, 422, "k: Input should be a valid integer"),
        ({"history": [13], "k": 2.5}, 422, "k: Input should be a valid integer"),
        ({"history": "13,23"}, 422, "history: Input should be a valid list"),
        ({"history": ["13"]}, 422, "history.0: Input should be a valid integer"),
        ({"history": ["../../etc/passwd"]}, 422, "history.0: Input should be a valid integer"),
        ({"history": [-13]}, 422, "history.0: Input should be greater than or equal to 0"),
        ({"history": [2**80]}, 422, "history.0: Input should be less than or equal to"),
        ({"history": [13], "path": "/etc/passwd"}, 422, "path: Extra inputs are not permitted"),
        ({"k": 3}, 422, "history: Field required"),
        ([13, 23], 422, "Input should be a valid dictionary"),
    ],
)
def test_history_errors(client, body, status, fragment):
    assert_error(client.post("/v1/recommendations", json=body), status, fragment)


def test_malformed_and_oversized_bodies(client):
    bad = client.post("/v1/recommendations", content=b'{"history": [13,', headers={"content-type": "application/json"})
    assert_error(bad, 422, "body: JSON decode error at character 16: Expecting value")
    json_type = {"content-type": "application/json"}
    not_utf8 = client.post("/v1/recommendations", content=b'{"history": [13, "\xff"]}', headers=json_type)
    assert_error(not_utf8, 422, "JSON decode error", "not UTF-8")
    latin1 = client.post(
        "/v1/recommendations", content='{"history": [13], "é": 1}'.encode("latin-1"), headers=json_type
    )
    assert_error(latin1, 422, "not UTF-8")
    nested = client.post("/v1/recommendations", content=b"[" * 100_000, headers=json_type)
    assert_error(nested, 422, "nested too deeply")
    untyped = client.post("/v1/recommendations", content=b'{"history": [13]}')  # not parsed without a JSON type
    assert_error(untyped, 422, "Input should be a valid dictionary")
    huge = b'{"history": [' + b"13," * (MAX_BODY_BYTES // 3) + b"13]}"
    assert_error(client.post("/v1/recommendations", content=huge), 413, "request body over")

    def chunks():
        yield b'{"history": [13]}'

    assert_error(client.post("/v1/recommendations", content=chunks()), 411, "Content-Length")
    assert client.put("/v1/recommendations", json={"history": [13]}).status_code == 405
    assert client.get("/v1/recommendations").status_code == 405
    assert client.get("/etc/passwd").status_code == 404


def asgi_request(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict, int]:
    """Call the ASGI app as a server would, the body arriving in `chunks`: status, headers, chunks pulled."""
    pulled, messages = 0, []

    async def receive():
        nonlocal pulled
        if pulled == len(chunks):
            await asyncio.Event().wait()  # nothing more comes until the client hangs up
        pulled += 1
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message):
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    start = messages[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, pulled


def test_body_limit_counts_the_bytes_received_not_content_length(rec, client):
    """A body longer than its Content-Length is cut off at the limit: 413, and the rest is never read."""
    app = create_app(rec)
    piece = b" " * (1 << 16)
    status, headers, pulled = asgi_request(app, "POST", "/v1/recommendations", {"content-length": "16"}, [piece] * 32)
    assert status == 413 and headers["connection"] == "close"
    assert pulled == MAX_BODY_BYTES // len(piece) + 1  # the piece that passed the limit, and no more
    lying = client.post("/v1/recommendations", content=iter([piece] * 32), headers={"content-length": "16"})
    assert_error(lying, 413, f"request body over {MAX_BODY_BYTES} bytes")
    assert lying.headers["connection"] == "close"
    small = create_app(rec, max_body_bytes=100)
    status, _, pulled = asgi_request(small, "GET", "/health", {}, [b"x" * 60, b"x" * 60, b"x" * 60])
    assert status == 413 and pulled == 2  # every method's body is counted
    status, _, _ = asgi_request(small, "GET", "/health", {}, [b"x" * 50, b"x" * 50])
    assert status == 200
    gets = client.request("GET", "/health", content=b" " * (MAX_BODY_BYTES + 1))
    assert_error(gets, 413, "request body over")
    for bad in ({"max_body_bytes": -1}, {"body_timeout": 0}, {"body_deadline": -1.0}, {"max_concurrent_requests": 0}):
        with pytest.raises(ValueError, match="request limits need"):
            create_app(rec, **bad)


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({"transfer-encoding": "chunked", "content-length": "17"}, "both Transfer-Encoding and Content-Length"),
        ([("content-length", "17"), ("content-length", "17")], "at most one Content-Length"),
        ({"content-length": "17 bytes"}, "Content-Length must be a decimal number"),
        ({"content-length": "-17"}, "Content-Length must be a decimal number"),
    ],
)
def test_ambiguous_framing_is_refused(client, headers, fragment):
    response = client.post("/v1/recommendations", content=b'{"history": [13]}', headers=headers)
    assert_error(response, 400, fragment)
    assert response.headers["connection"] == "close"


# --------------------------------------------------------------------------- the OpenAPI document


def conforms(value, schema: dict, components: dict, where: str = "body") -> None:
    """Assert that `value` matches an OpenAPI 3.1 schema: $ref, anyOf, type, required, properties, items."""
    if "$ref" in schema:
        return conforms(value, components[schema["$ref"].rsplit("/", 1)[1]], components, where)
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                return conforms(value, option, components, where)
            except AssertionError:
                pass
        raise AssertionError(f"{where}: {value!r} matches none of {schema['anyOf']}")
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None), "number": (int, float)}
    kind = schema.get("type")
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
    elif kind is not None:
        assert isinstance(value, kinds[kind]), f"{where}: {value!r} is not {kind}"
        assert kind in ("boolean", "null") or not isinstance(value, bool), f"{where}: {value!r} is not {kind}"
    if kind == "object":
        missing = set(schema.get("required", ())) - set(value)
        assert not missing, f"{where}: missing {missing}"
        for name, item in value.items():
            assert name in schema.get("properties", {}), f"{where}: undeclared field {name!r}"
            conforms(item, schema["properties"][name], components, f"{where}.{name}")
    if kind == "array":
        for i, item in enumerate(value):
            conforms(item, schema.get("items", {}), components, f"{where}[{i}]")
    return None


def assert_documented(openapi: dict, method: str, route: str, response: httpx.Response) -> None:
    """The response's status is declared for `method route`, and its JSON body matches the declared schema."""
    declared = openapi["paths"][route][method.lower()]["responses"]
    status = str(response.status_code)
    assert status in declared, f"{method} {route} answered {status}, declared {sorted(declared)}: {response.text}"
    assert response.headers["content-type"] == "application/json"
    schema = declared[status]["content"]["application/json"]["schema"]
    conforms(response.json(), schema, openapi["components"]["schemas"])


USER_ROUTE, HISTORY_ROUTE = "/v1/users/{user_id}/recommendations", "/v1/recommendations"
BATCH_ROUTE, ITEM_ROUTE = "/v1/users/recommendations", "/v1/items/{movie_id}"
JSON = {"content-type": "application/json"}
OVERSIZED = b'{"history": [' + b"13," * (MAX_BODY_BYTES // 3) + b"13]}"
NOT_UTF8 = '{"history": [13], "é": 1}'.encode("latin-1")
CHUNKED_AND_LENGTH = {"transfer-encoding": "chunked", "content-length": "17"}
CONTRACT_CASES = {
    # id: (method, route, url, request arguments, expected status)
    "health": ("GET", "/health", "/health", {}, 200),
    "health-oversized-body": ("GET", "/health", "/health", {"content": OVERSIZED}, 413),
    "health-bad-length": ("GET", "/health", "/health", {"headers": {"content-length": "x"}}, 400),
    "item": ("GET", ITEM_ROUTE, "/v1/items/23", {}, 200),
    "item-negative": ("GET", ITEM_ROUTE, "/v1/items/-1", {}, 422),
    "item-not-a-number": ("GET", ITEM_ROUTE, "/v1/items/abc", {}, 422),
    "item-too-big": ("GET", ITEM_ROUTE, f"/v1/items/{2**64}", {}, 422),
    "item-unknown": ("GET", ITEM_ROUTE, "/v1/items/24", {}, 404),
    "user": ("GET", USER_ROUTE, "/v1/users/{user}/recommendations?k=3", {}, 200),
    "user-negative": ("GET", USER_ROUTE, "/v1/users/-1/recommendations", {}, 422),
    "user-k-not-a-number": ("GET", USER_ROUTE, "/v1/users/{user}/recommendations?k=ten", {}, 422),
    "user-k-over-items": ("GET", USER_ROUTE, "/v1/users/{user}/recommendations?k=151", {}, 422),
    "user-unknown": ("GET", USER_ROUTE, "/v1/users/1/recommendations", {}, 404),
    "history": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"json": {"history": [13, 7]}}, 200),
    "history-not-utf8": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"content": NOT_UTF8, "headers": JSON}, 422),
    "history-bad-json": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"content": b'{"history": [13,', "headers": JSON}, 422),
    "history-deep-json": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"content": b"[" * 100_000, "headers": JSON}, 422),
    "history-no-content-type": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"content": b'{"history": [13]}'}, 422),
    "history-wrong-types": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"json": {"history": ["13"], "k": 2.5}}, 422),
    "history-all-unknown": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"json": {"history": [1, 2]}}, 422),
    "history-oversized": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"content": OVERSIZED}, 413),
    "history-oversized-lying-length": (
        "POST", HISTORY_ROUTE, HISTORY_ROUTE, {"content": [OVERSIZED], "headers": {"content-length": "2"}}, 413
    ),
    "history-chunked": ("POST", HISTORY_ROUTE, HISTORY_ROUTE, {"content": [b'{"history": [13]}']}, 411),
    "history-chunked-and-length": (
        "POST", HISTORY_ROUTE, HISTORY_ROUTE, {"content": b'{"history": [13]}', "headers": CHUNKED_AND_LENGTH}, 400
    ),
    "batch-wrong-types": ("POST", BATCH_ROUTE, BATCH_ROUTE, {"json": {"user_ids": ["1007"]}}, 422),
    "batch-all-unknown": ("POST", BATCH_ROUTE, BATCH_ROUTE, {"json": {"user_ids": [1, 2]}}, 404),
    "batch-declared-oversized": (
        "POST", BATCH_ROUTE, BATCH_ROUTE, {"json": {"user_ids": [0]}, "headers": {"content-length": "9" * 12}}, 413
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "route", "url", "arguments", "status"), CONTRACT_CASES.values(), ids=CONTRACT_CASES.keys()
)
def test_every_response_matches_the_openapi_document(client, users, method, route, url, arguments, status):
    openapi = client.get("/openapi.json").json()
    response = client.request(method, url.format(user=users[0]), **arguments)
    assert response.status_code == status, response.text
    assert_documented(openapi, method, route, response)


# --------------------------------------------------------------------------- POST batch of users


def test_batch_recommendations(client, rec, users):
    response = client.post("/v1/users/recommendations", json={"user_ids": [users[2], 1, users[0], users[2]], "k": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["unknownUserIds"] == [1]
    assert [r["userId"] for r in body["results"]] == [users[2], users[0]]
    for result in body["results"]:
        expected = rec.recommend_user(result["userId"], 3)
        assert [r["movieId"] for r in result["recommendations"]] == [r.movie_id for r in expected]
        assert [r["rank"] for r in result["recommendations"]] == [1, 2, 3]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"user_ids": [1, 2]}, 404, "none of the requested users is known"),
        ({"user_ids": []}, 422, "user_ids: List should have at least 1 item"),
        ({"user_ids": list(range(MAX_BATCH + 1))}, 422, f"user_ids: List should have at most {MAX_BATCH} items"),
        ({"user_ids": [1007], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"user_ids": [1007], "k": 151}, 422, "k must be an integer from 1 to 150"),
        ({"user_ids": ["1007"]}, 422, "user_ids.0: Input should be a valid integer"),
        ({"user_ids": [1007], "include_seen": "yes"}, 422, "include_seen: Input should be a valid boolean"),
        ({"users": [1007]}, 422, "user_ids: Field required"),
    ],
)
def test_batch_errors(client, body, status, fragment):
    assert_error(client.post("/v1/users/recommendations", json=body), status, fragment)


# --------------------------------------------------------------------------- GET item


def test_item(client, rec):
    body = client.get("/v1/items/23").json()
    expected = rec.item(23)
    assert body == {"movieId": 23, "title": expected.title, "year": expected.year, "genres": expected.genres}
    assert body["title"].startswith("Synthetic movie 2 (")
    assert_error(client.get("/v1/items/24"), 404, "unknown movieId 24")
    assert_error(client.get("/v1/items/abc"), 422, "movie_id: Input should be a valid integer")
    assert client.get("/v1/items/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


def test_concurrent_requests_agree(client, users):
    url = f"/v1/users/{users[1]}/recommendations?k=5"
    expected = client.get(url).json()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.get(url).json(), range(16)))
    # scored together or alone, the same items; scores equal to float rounding (serving/batching.py)
    for result in results:
        assert [r["movieId"] for r in result["recommendations"]] == [r["movieId"] for r in expected["recommendations"]]
        for ours, theirs in zip(result["recommendations"], expected["recommendations"], strict=True):
            assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)


# --------------------------------------------------------------------------- the real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, port: int, log: Path) -> httpx.Response:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        except httpx.TransportError:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def limited_server(rec):
    """A uvicorn server in this process, on 127.0.0.1, with short body timeouts, 4 request and 4 upload slots."""
    app = create_app(rec, body_timeout=1.0, body_deadline=2.5, max_concurrent_requests=4, max_concurrent_uploads=4)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield config.port
    server.should_exit = True
    thread.join(timeout=10)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (what this server sends): status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    header_block, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def assert_closed(sock: socket.socket) -> None:
    """The server hung up: the read ends, and it takes no more body (50 MiB cannot be sent)."""
    assert sock.recv(65536) == b""
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(50):
            sock.sendall(b"0" * (1 << 20))


def raw_error(sock: socket.socket, status: int, *fragments: str) -> dict[str, str]:
    got, headers, body = read_response(sock)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and all(f in detail for f in fragments), detail
    return headers


def test_real_server_refuses_chunked_body_with_content_length(limited_server):
    """Request smuggling: uvicorn (h11) would read the chunked body whatever Content-Length says."""
    with connect(limited_server) as sock:
        framing = ("Content-Type: application/json", "Transfer-Encoding: chunked", "Content-Length: 16")
        sock.sendall(head("POST", "/v1/recommendations", *framing) + b"100000\r\n" + b" " * 4096)
        headers = raw_error(sock, 400, "both Transfer-Encoding and Content-Length")
        assert headers["connection"] == "close"
        assert_closed(sock)


def test_real_server_limits_bodies_before_reading_them(limited_server):
    with connect(limited_server) as sock:  # chunked, no Content-Length
        sock.sendall(head("POST", "/v1/recommendations", "Transfer-Encoding: chunked") + b"100000\r\n" + b" " * 4096)
        assert raw_error(sock, 411, "Content-Length")["connection"] == "close"
        assert_closed(sock)
    with connect(limited_server) as sock:  # over the limit: answered on the headers alone
        sock.sendall(head("POST", "/v1/recommendations", f"Content-Length: {MAX_BODY_BYTES + 1}"))
        assert raw_error(sock, 413, f"over {MAX_BODY_BYTES} bytes")["connection"] == "close"
        assert_closed(sock)


def test_real_server_keeps_good_requests_and_connections_alive(limited_server):
    body = json.dumps({"history": [13, 23, 33], "k": 4}).encode()
    request = head("POST", "/v1/recommendations", "Content-Type: application/json", f"Content-Length: {len(body)}")
    with connect(limited_server) as sock:
        for _ in range(2):  # the same connection serves both
            sock.sendall(request + body)
            status, headers, answer = read_response(sock)
            assert status == 200 and "connection" not in headers
            assert len(json.loads(answer)["recommendations"]) == 4
        sock.sendall(head("GET", "/health"))
        assert read_response(sock)[0] == 200


def test_real_server_drops_stalled_uploads_and_frees_their_slots(limited_server, rec):
    """4 stalled uploads hold the 4 upload slots (a 5th upload gets 503) until each gets 408 and is closed;
    meanwhile /health and GET recommendations, which have slots of their own, are answered."""
    base = f"http://127.0.0.1:{limited_server}"
    openapi = httpx.get(f"{base}/openapi.json", timeout=5).json()
    user = int(rec.known_user_ids[0])
    started = time.monotonic()
    stalled = [connect(limited_server) for _ in range(4)]
    try:
        for sock in stalled:
            sock.sendall(head("POST", "/v1/recommendations", "Content-Length: 100") + b'{"history": [')
        time.sleep(0.3)
        busy = httpx.post(f"{base}/v1/recommendations", json={"history": [1], "k": 1}, timeout=5)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "4 uploads are being received" in busy.json()["detail"]
        assert_documented(openapi, "POST", "/v1/recommendations", busy)
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200, "health answers under stalled uploads"
        answered = httpx.get(f"{base}/v1/users/{user}/recommendations?k=3", timeout=5)
        assert answered.status_code == 200 and len(answered.json()["recommendations"]) == 3
        for sock in stalled:
            status, headers, body = read_response(sock)
            assert status == 408 and headers["connection"] == "close", body
            assert "no body bytes for 1 s" in json.loads(body)["detail"]
            assert_documented(
                openapi, "POST", "/v1/recommendations", httpx.Response(408, headers=headers, content=body)
            )
            assert sock.recv(65536) == b""
        assert time.monotonic() - started < 8
    finally:
        for sock in stalled:
            sock.close()
    assert httpx.get(f"http://127.0.0.1:{limited_server}/health", timeout=5).status_code == 200


def test_real_server_drops_a_trickled_upload_at_the_deadline(limited_server):
    """A byte every 0.3 s never trips the 1 s idle timeout, but the whole body may take only 2.5 s."""
    with connect(limited_server) as sock:
        started = time.monotonic()
        sock.sendall(head("POST", "/v1/recommendations", "Content-Length: 1000"))
        while not select.select([sock], [], [], 0.3)[0]:
            assert time.monotonic() - started < 8, "no answer to a trickled upload"
            sock.sendall(b" ")
        raw_error(sock, 408, "over 2.5 s")
        assert 2.4 < time.monotonic() - started < 8


def test_movierec_serve_runs_uvicorn_on_localhost(trained_run, users, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed below, after the process)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "movierec.cli", "serve", str(trained_run.run_dir), "--port", str(port)]
    proc = subprocess.Popen([*argv, "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        health = wait_for_health(proc, port, tmp_path / "serve.log")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        base = f"http://127.0.0.1:{port}"
        recs = httpx.get(f"{base}/v1/users/{users[0]}/recommendations?k=3", timeout=10).json()
        assert len(recs["recommendations"]) == 3
        posted = httpx.post(f"{base}/v1/recommendations", json={"history": [13, 23, 33], "k": 5}, timeout=10)
        assert posted.status_code == 200 and len(posted.json()["recommendations"]) == 5
        assert httpx.get(f"{base}/v1/users/1/recommendations", timeout=10).status_code == 404
        assert json.loads(httpx.get(f"{base}/v1/items/13", timeout=10).text)["movieId"] == 13
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert "movierec serve: listening on http://127.0.0.1:" in (tmp_path / "serve.log").read_text()


def test_serve_with_a_bad_model_is_one_line(tmp_path, capsys):
    from movierec.cli import main

    assert main(["serve", str(tmp_path / "none.ckpt"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be 0-65535" in capsys.readouterr().err


# --------------------------------------------------------------------------- docs/serving.md


def curl(command: str, port: int) -> httpx.Response:
    """Send what a documented `curl [-X M] [-H H] [-d BODY] URL` line sends, to `port` instead of 8000."""
    tokens = shlex.split(command)[1:]
    method, headers, body, url = "GET", {}, None, None
    while tokens:
        token = tokens.pop(0)
        if token == "-X":
            method = tokens.pop(0)
        elif token == "-H":
            name, value = tokens.pop(0).split(":", 1)
            headers[name.strip()] = value.strip()
        elif token == "-d":
            body = tokens.pop(0).encode()
        else:
            assert url is None and token.startswith("http://127.0.0.1:8000/"), command
            url = token.replace(":8000/", f":{port}/")
    return httpx.request(method, url, headers=headers, content=body, timeout=30)


def test_documented_server_and_requests(trained_run, rec, tmp_path, monkeypatch):
    (serve,) = documented_commands("movierec serve")
    requests = documented_commands("curl ")
    assert len(requests) == 9
    quickstart_layout(trained_run, tmp_path)
    port = free_port()
    argv = shlex.split(serve.replace("--port 8000", f"--port {port}"))[1:]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed below, after the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "movierec.cli", *argv], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_health(proc, port, tmp_path / "serve.log")
        for command in requests:
            response = curl(command, port)
            assert response.status_code == 200, f"{command}: {response.text}"
            body = response.json()
            if "/v1/users/1042/history" in command:
                assert [i["movieId"] for i in body["items"]] == rec.history_of(1042)[-20:]
            elif "/v1/items?query=" in command:
                assert isinstance(body["items"], list)  # the tiny run's titles are "Synthetic movie N (year)"
            elif "/v1/recommendations/explained" in command:
                recs = body["recommendations"]
                assert recs and all(
                    "Comedy" in r["genres"] and r["because"]["movieId"] in (13, 263, 1193) for r in recs
                )
            elif "/v1/users/1042/" in command:
                recs = body["recommendations"]
                assert len(recs) == 5
                if "include_seen=true" not in command:
                    assert not {r["movieId"] for r in recs} & set(rec.history_of(1042))
            elif "/v1/recommendations" in command:
                expected = rec.recommend_history([13, 263, 1193], 5).recommendations
                assert [r["movieId"] for r in body["recommendations"]] == [r.movie_id for r in expected]
            elif "/v1/users/recommendations" in command:
                assert [r["userId"] for r in body["results"]] == [1042, 1049] and body["unknownUserIds"] == []
            elif "/v1/items/" in command:
                assert body["movieId"] == 1193 and body["title"] == rec.item(1193).title
            else:
                assert body["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_documented_limits_are_the_defaults():
    text = " ".join(DOCS.read_text().split())
    assert MAX_BODY_BYTES == 1 << 20 and "a body over 1 MiB" in text
    assert f"no byte for {BODY_TIMEOUT:g} s, or not complete after {BODY_DEADLINE:g} s" in text
    assert MAX_CONCURRENT_REQUESTS == MAX_CONCURRENT_UPLOADS == 128
    assert "At most 128 request bodies are received at once, and at most 128 requests are served at once" in text
    assert "| **503** | 128 requests are already being served, or (for a request with a body) 128 bodies" in text


@contextlib.contextmanager
def served_run(run_dir: Path, folder: Path) -> Iterator[int]:
    """`movierec serve` of a run folder, as a user starts it (one torch thread), on a free port of 127.0.0.1;
    yields the port once /health answers. Its log goes to `folder`/serve.log."""
    log_path, port = folder / "serve.log", free_port()
    argv = [sys.executable, "-m", "movierec.cli", "serve", str(run_dir), "--port", str(port), "--threads", "1"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_health(proc, port, log_path)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
