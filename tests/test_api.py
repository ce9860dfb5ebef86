"""The HTTP service: every endpoint and error case on the real app (TestClient), and the real server."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serving_docs import documented_commands, quickstart_layout

from movierec.serving.api import MAX_BATCH, MAX_BODY_BYTES, MAX_HISTORY, MAX_K, create_app
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
    }
    fields = schema["components"]["schemas"]["RecommendationOut"]["properties"]
    assert set(fields) == {"rank", "movieId", "title", "score"}
    assert schema["components"]["schemas"]["HistoryRequest"]["properties"]["history"]["maxItems"] == MAX_HISTORY


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
    assert_error(bad, 422, "JSON decode error")
    huge = b'{"history": [' + b"13," * (MAX_BODY_BYTES // 3) + b"13]}"
    assert_error(client.post("/v1/recommendations", content=huge), 413, "request body over")

    def chunks():
        yield b'{"history": [13]}'

    assert_error(client.post("/v1/recommendations", content=chunks()), 411, "Content-Length")
    assert client.put("/v1/recommendations", json={"history": [13]}).status_code == 405
    assert client.get("/v1/recommendations").status_code == 405
    assert client.get("/etc/passwd").status_code == 404


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
    assert all(r == expected for r in results)


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
    assert "Uvicorn running on http://127.0.0.1:" in (tmp_path / "serve.log").read_text()


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
    assert len(requests) == 6
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
            if "/v1/users/1042/" in command:
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
