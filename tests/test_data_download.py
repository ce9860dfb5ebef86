"""The real download code against a local HTTP server on 127.0.0.1 (nothing here reaches the internet)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from data_builders import make_zip, md5, ratings, release_members

from movierec.cli import main
from movierec.data import download as dl
from movierec.data.layout import load_sequences, read_meta
from movierec.data.prepare import prepare
from movierec.data.registry import RELEASES
from movierec.errors import DataError


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; `server.behaviour[path]` picks a failure: 500, 404, 'cut-once', 'no-range',
    'trickle' (100 bytes of the body, then a byte every 0.1 s) or 'trickle-headers' (the status line a byte
    every 0.1 s)."""

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        behaviour = server.behaviour.get(self.path)
        data = server.files.get(self.path)
        if behaviour == "trickle-headers":
            self.trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            return
        if behaviour in (500, 404) or data is None:
            self.send_error(behaviour if isinstance(behaviour, int) else 404)
            return
        start = 0
        requested = self.headers.get("Range")
        if requested and behaviour != "no-range":
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if behaviour == "cut-once" and not server.cut_done:
            server.cut_done = True
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if behaviour == "trickle":
            self.wfile.write(body[:100])
            self.trickle(body[100:])
            return
        self.wfile.write(body)

    def trickle(self, data: bytes) -> None:
        for byte in data:
            if self.server.stop.wait(0.1):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.behaviour, httpd.requests, httpd.cut_done = {}, {}, [], False
    httpd.stop = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def ml100k_zip():
    rows = ratings(num_users=12, per_user=8, num_items=10)
    return make_zip(release_members("ml-100k", rows, 10))


def pin(monkeypatch, name: str, checksum: str | None) -> None:
    """Point the registry's MD5 for `name` at our test archive's checksum."""
    monkeypatch.setitem(RELEASES, name, dataclasses.replace(RELEASES[name], md5=checksum))


def serve(server, data: bytes, name: str = "ml-100k.zip", behaviour=None) -> str:
    server.files[f"/mirror/{name}"] = data
    if behaviour is not None:
        server.behaviour[f"/mirror/{name}"] = behaviour
    return f"{server.url}/mirror"


def test_download_success_then_cached(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    base = serve(server, ml100k_zip)
    path = dl.download("ml-100k", home=tmp_path, url=base, progress=True)
    assert path == tmp_path / "ml-100k.zip"
    assert path.read_bytes() == ml100k_zip
    assert not (tmp_path / "ml-100k.zip.part").exists()
    assert len(server.requests) == 1
    assert dl.download("ml-100k", home=tmp_path, url=base) == path
    assert len(server.requests) == 1, "a verified cached file is not downloaded again"


def test_checksum_mismatch_names_url_and_both_checksums(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", "0" * 32)
    base = serve(server, ml100k_zip)
    with pytest.raises(DataError) as err:
        dl.download("ml-100k", home=tmp_path, url=base, progress=False)
    message = str(err.value)
    assert f"{base}/ml-100k.zip" in message
    assert "0" * 32 in message and md5(ml100k_zip) in message
    assert list(tmp_path.iterdir()) == [], "nothing that looks downloaded is left"


def test_interrupted_download_leaves_part_and_resumes(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    base = serve(server, ml100k_zip, behaviour="cut-once")
    with pytest.raises(DataError, match=r"interrupted.*run the same command again to resume"):
        dl.download("ml-100k", home=tmp_path, url=base, progress=False, retries=0)
    part = tmp_path / "ml-100k.zip.part"
    assert not (tmp_path / "ml-100k.zip").exists(), "a partial download never gets the final name"
    assert 0 < part.stat().st_size < len(ml100k_zip)
    half = part.stat().st_size
    path = dl.download("ml-100k", home=tmp_path, url=base, progress=False)
    assert path.read_bytes() == ml100k_zip
    assert server.requests[-1][1] == f"bytes={half}-", "the second run resumed with a Range request"
    assert not part.exists()


def test_dropped_connection_is_retried_and_resumed_in_one_call(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    base = serve(server, ml100k_zip, behaviour="cut-once")
    path = dl.download("ml-100k", home=tmp_path, url=base, progress=False, retries=1)
    assert path.read_bytes() == ml100k_zip
    assert server.requests[0][1] is None and server.requests[1][1].startswith("bytes=")


def test_server_ignoring_range_restarts_cleanly(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    base = serve(server, ml100k_zip, behaviour="no-range")
    (tmp_path / "ml-100k.zip.part").write_bytes(b"garbage from an older attempt")
    path = dl.download("ml-100k", home=tmp_path, url=base, progress=False)
    assert path.read_bytes() == ml100k_zip


def test_complete_part_file_answered_416_is_verified(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    base = serve(server, ml100k_zip)
    (tmp_path / "ml-100k.zip.part").write_bytes(ml100k_zip)
    assert dl.download("ml-100k", home=tmp_path, url=base, progress=False).read_bytes() == ml100k_zip


@pytest.mark.parametrize("status", [500, 404])
def test_server_error_is_a_clear_error(server, ml100k_zip, tmp_path, monkeypatch, status):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    base = serve(server, ml100k_zip, behaviour=status)
    with pytest.raises(DataError) as err:
        dl.download("ml-100k", home=tmp_path, url=base, progress=False)
    assert f"HTTP {status}" in str(err.value) and f"{base}/ml-100k.zip" in str(err.value)
    assert "--archive" in str(err.value)
    assert not (tmp_path / "ml-100k.zip").exists()
    if status == 500:
        assert len(server.requests) == 3, "server errors are retried (twice by default)"


def test_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    with pytest.raises(DataError, match="--archive"):
        dl.download("ml-100k", home=tmp_path, url="http://127.0.0.1:9", progress=False, timeout=2)


@pytest.mark.parametrize("behaviour", ["trickle", "trickle-headers"])
def test_a_trickling_mirror_fails_within_its_deadlines_and_keeps_what_arrived(
    server, ml100k_zip, tmp_path, monkeypatch, behaviour
):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    monkeypatch.setattr(dl, "STALL_S", 1.0)
    monkeypatch.setattr(dl, "STALL_MIN_BYTES", 50)
    assert len(ml100k_zip) > 200, "the archive must outlast the fast first 100 bytes"
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        dl.download("ml-100k", home=tmp_path, url=serve(server, ml100k_zip, behaviour=behaviour),
                    progress=False, timeout=1, retries=1)  # fmt: skip
    message = str(err.value)
    assert time.monotonic() - started < 10 and "\n" not in message and "--archive" in message
    if behaviour == "trickle":  # resumable: the bytes that came are kept, the final name is not used
        assert "stalled" in message and (tmp_path / "ml-100k.zip.part").stat().st_size >= 100
    else:
        assert "no answer within 1 s" in message
    assert not (tmp_path / "ml-100k.zip").exists() and len(server.requests) == 2


def test_a_black_hole_mirror_fails_after_its_tries(tmp_path, monkeypatch):
    hole = socket.socket()  # the kernel completes connections; nothing ever answers
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    try:
        started = time.monotonic()
        with pytest.raises(DataError, match=r"no answer within 1 s"):
            dl.download("ml-100k", home=tmp_path, url=f"http://127.0.0.1:{hole.getsockname()[1]}",
                        progress=False, timeout=1, retries=2)  # fmt: skip
        assert time.monotonic() - started < 6
    finally:
        hole.close()


def test_progress_is_plain_lines_without_a_terminal(server, ml100k_zip, tmp_path, monkeypatch, capsys):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    monkeypatch.setenv("MOVIEREC_PROGRESS_SECONDS", "0")
    dl.download("ml-100k", home=tmp_path, url=serve(server, ml100k_zip), progress=True)
    err = capsys.readouterr().err
    assert f"download ml-100k.zip: {len(ml100k_zip):,} bytes in " in err and "\x1b" not in err


def test_environment_variables_choose_cache_and_mirror(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    monkeypatch.setenv(dl.ENV_DATA_HOME, str(tmp_path / "home"))
    monkeypatch.setenv(dl.ENV_BASE_URL, serve(server, ml100k_zip))
    assert dl.data_home() == tmp_path / "home"
    assert dl.download("ml-100k", progress=False) == tmp_path / "home" / "ml-100k.zip"
    assert dl.data_home(tmp_path / "flag") == tmp_path / "flag", "the flag wins over the environment"


def test_default_data_home(monkeypatch):
    monkeypatch.delenv(dl.ENV_DATA_HOME, raising=False)
    assert dl.data_home() == Path.home() / ".cache" / "movierec"
    monkeypatch.delenv(dl.ENV_BASE_URL, raising=False)
    assert dl.base_url() == "https://files.grouplens.org/datasets/movielens"


def test_no_pinned_md5_release_downloads_without_check(server, tmp_path):
    rows = ratings(num_users=6, per_user=5, num_items=8)
    data = make_zip(release_members("ml-latest-small", rows, 8))
    base = serve(server, data, "ml-latest-small.zip")
    assert RELEASES["ml-latest-small"].md5 is None and "change" in RELEASES["ml-latest-small"].md5_note
    assert dl.download("ml-latest-small", home=tmp_path, url=base, progress=False).read_bytes() == data


def test_corrupted_cache_is_downloaded_again(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    base = serve(server, ml100k_zip)
    (tmp_path / "ml-100k.zip").write_bytes(b"not the archive")
    assert dl.download("ml-100k", home=tmp_path, url=base, progress=False).read_bytes() == ml100k_zip
    assert len(server.requests) == 1


def test_archive_option_verifies_and_can_skip(ml100k_zip, tmp_path, monkeypatch):
    archive = tmp_path / "mine.zip"
    archive.write_bytes(ml100k_zip)
    pin(monkeypatch, "ml-100k", "f" * 32)
    with pytest.raises(DataError, match=f"{md5(ml100k_zip)}.*{'f' * 32}.*--no-verify"):
        dl.verify_archive(RELEASES["ml-100k"], archive)
    assert dl.verify_archive(RELEASES["ml-100k"], archive, verify=False) == md5(ml100k_zip)
    with pytest.raises(DataError, match="does not exist"):
        dl.verify_archive(RELEASES["ml-100k"], tmp_path / "absent.zip")
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    cached = dl.download("ml-100k", home=tmp_path / "cache", archive=archive)
    assert cached.read_bytes() == ml100k_zip, "download --archive copies a verified archive into the cache"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mine.zip"], "no note left beside the archive"


def test_prepare_downloads_implicitly(server, ml100k_zip, tmp_path, monkeypatch):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    base = serve(server, ml100k_zip)
    path = prepare("ml-100k", tmp_path / "out", data_home=tmp_path / "cache", base_url=base, progress=False)
    meta = read_meta(path)
    assert meta["source"]["md5"] == md5(ml100k_zip) and meta["source"]["md5_verified"]
    assert meta["source"]["url"] == f"{base}/ml-100k.zip"
    assert meta["num_users"] == 12
    assert len(load_sequences(path).tested_users) == 12


def test_cli_download_and_errors(server, ml100k_zip, tmp_path, monkeypatch, capsys):
    pin(monkeypatch, "ml-100k", md5(ml100k_zip))
    base = serve(server, ml100k_zip)
    assert main(["download", "ml-100k", "--data-home", str(tmp_path), "--base-url", base]) == 0
    assert str(tmp_path / "ml-100k.zip") in capsys.readouterr().out
    pin(monkeypatch, "ml-1m", "1" * 32)
    server.files["/mirror/ml-1m.zip"] = b"short"
    assert main(["download", "ml-1m", "--data-home", str(tmp_path), "--base-url", base]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("movierec download: error: checksum mismatch")
    assert main(["download", "--list"]) == 0
    assert "ml-20mx16x32" in capsys.readouterr().out
