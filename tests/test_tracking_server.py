"""MLflow tracking end to end: a real `mlflow server` over HTTP, a server that is down or hung, dead runs.

One `mlflow server` (SQLite backend, proxied artifacts, as in docker-compose.yml) is started for the module;
every training here is a few tiny epochs on a 200-user synthetic dataset.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from data_builders import TINY_RUN
from mlflow.tracking import MlflowClient

from movierec.cli import main
from movierec.data.layout import read_users
from movierec.data.split import write_dataset
from movierec.data.synthetic import generate_synthetic
from movierec.errors import TrackingError
from movierec.models.checkpoint import load_checkpoint
from movierec.training.config import load_config
from movierec.training.engine import Engine
from movierec.training.run import Run, train
from movierec.training.tracking import HOST_TAG, PID_TAG

MLFLOW = Path(sys.executable).parent / "mlflow"
TINY = [*TINY_RUN, "train.batch_size=64", "eval.every_steps=1", "eval.ks=[10]", "eval.protocols=[full]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    interactions, titles = generate_synthetic(seed=3, num_users=200, num_items=120, num_clusters=4)
    root = tmp_path_factory.mktemp("tracking-data")
    return write_dataset(interactions, root, "synthetic", source={"kind": "synthetic", "seed": 3}, titles=titles)


@pytest.fixture(scope="module", autouse=True)
def server_process(tmp_path_factory):
    """`mlflow server` on a free port of 127.0.0.1: SQLite backend, artifacts proxied into a local folder.

    Started when the module starts (autouse), so its ~15 s of start-up overlap the tests that need no server.
    """
    missing = [name for name in ("uvicorn", "fastapi") if importlib.util.find_spec(name) is None]
    if missing or not MLFLOW.is_file():
        yield None
        return
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: we run none
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the session started here
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(server_process) -> str:
    """The server's URI, once /health answers."""
    if server_process is None:
        pytest.skip("mlflow's server extras (uvicorn, fastapi) or the mlflow executable are not installed")
    proc, uri, log = server_process
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return uri
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def train_args(data: Path, run_dir: Path, uri: str, experiment: str, epochs: int, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--run-dir", str(run_dir), "--tracking-uri", uri,
        "--experiment", experiment, "--epochs", str(epochs), *TINY, *extra,
    ]  # fmt: skip


def tiny_config(data: Path, run_dir: Path, uri: str, experiment: str, epochs: int = 1):
    config = load_config(None, TINY)
    config.data.path, config.run_dir, config.train.epochs = str(data), str(run_dir), epochs
    config.tracking.uri, config.tracking.experiment = uri, experiment
    return config


def start_training(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "movierec.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_for_epochs(proc: subprocess.Popen, run_dir: Path, epochs: int = 1) -> None:
    """Until the run's history (written with its checkpoint, which records the MLflow run id) has `epochs`."""
    history, deadline = run_dir / "history.json", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if len(json.loads(history.read_text())) >= epochs:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no epoch in {run_dir} (exit status {proc.poll()}): {proc.communicate()[1][-2000:]}")


def status(uri: str, run_id: str) -> str:
    return MlflowClient(uri).get_run(run_id).info.status


# --------------------------------------------------------------------------- a server that is down or hung


def test_a_hung_server_or_a_closed_port_fails_fast_with_one_line(data, tmp_path):
    hung = socket.socket()  # accepts connections (the kernel completes them) and never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hung.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(hung.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    uris = {"hung": f"http://127.0.0.1:{hung.getsockname()[1]}", "closed": f"http://127.0.0.1:{free_port()}"}
    try:
        started = time.monotonic()
        procs = {
            name: start_training(*train_args(data, tmp_path / name, uri, "fail-fast", 1)) for name, uri in uris.items()
        }  # both at once: the test takes as long as the slower one
        for name, proc in procs.items():
            err = proc.communicate(timeout=90)[1]
            elapsed = time.monotonic() - started
            err = err.decode()
            assert proc.returncode == 2, (name, err)
            assert err.count("\n") == 1 and err.startswith("movierec train: error: "), (name, err)
            assert uris[name] in err and "not answering" in err, err
            assert elapsed < 60, (name, elapsed)
            print(f"{name}: exit 2 after {elapsed:.1f} s: {err.strip()}")
        assert accepted, "the hung server was never contacted"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        hung.close()


@contextlib.contextmanager
def trickling_server(pause_s: float, answer_first: bool = False):
    """The URL of a server on 127.0.0.1 that answers every request a byte every `pause_s` seconds, which no
    per-read timeout ends (with `answer_first`, the first request gets a quick 404, as a pre-check would)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop, answered = threading.Event(), []

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            if answer_first and not answered:
                answered.append(True)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                if stop.wait(pause_s):
                    return
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_server_that_trickles_bytes_is_given_a_total_deadline(monkeypatch):
    """A server that sends one byte a second never times out a read; the probe's deadline is for the whole answer."""
    from movierec import mlflow_store

    monkeypatch.setattr(mlflow_store, "PROBE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(mlflow_store, "PROBE_PAUSES_S", (0.1,))
    with trickling_server(pause_s=0.2) as uri:
        started = time.monotonic()
        with pytest.raises(TrackingError, match=r"not answering \(no answer within 1 s; 2 tries") as caught:
            mlflow_store.check_server(uri)
        assert time.monotonic() - started < 5
        assert uri in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://", "names no host"),
        ("http://127.0.0.1:99999", "is not a valid URL"),
        ("sqlite:///{tmp}", "is a folder, not a SQLite store file"),
        ("sqlite:///{tmp}/notes.txt", "is not a SQLite database"),
        ("postgresql://u@127.0.0.1/db", "needs the database driver psycopg2"),
    ],
)
def test_malformed_tracking_uris_are_one_line(tmp_path, uri, message):
    from movierec.mlflow_store import check_server

    (tmp_path / "notes.txt").write_text("not a database")
    uri = uri.format(tmp=tmp_path)
    if message.startswith("needs") and importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("psycopg2 is installed here")
    with pytest.raises(TrackingError, match=message) as caught:
        check_server(uri)
    assert "\n" not in str(caught.value)


def test_serving_from_a_server_that_is_down_is_one_line_within_seconds(tmp_path, capsys):
    started = time.monotonic()
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["recommend", "runs:/0123456789abcdef", "--user", "1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and uri in err and "connection refused" in err, err
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- a real server over HTTP


def test_training_registering_and_recommending_over_http(server, data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = train_args(data, run_dir, server, "e2e", 2, "tracking.log_model=true", "--run-name", "over-http")
    assert main(args) == 0
    run_id = load_checkpoint(run_dir / "best.ckpt").mlflow_run_id
    assert f"mlflow run id: {run_id}" in capsys.readouterr().out
    client = MlflowClient(server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "over-http"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    params = run.data.params
    assert params["model.d_item"] == "16" and params["dataset.num_users"] == "200" and params["git_commit"]
    assert run.data.tags[PID_TAG] == str(os.getpid()) and run.data.tags[HOST_TAG] == socket.gethostname()
    for key in ("train_loss", "val_loss", "val_full/ndcg_at_10", "sequences_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert "test_full/ndcg_at_10" in run.data.metrics and "best_epoch" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoints", "config.yaml", "history.json", "curves.png"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in logged] == [("model", run_id)]

    assert main(["export", str(run_dir), "--register", "movierec-e2e", "--tracking-uri", server]) == 0
    assert "registered models:/movierec-e2e/1" in capsys.readouterr().out
    version = client.get_model_version("movierec-e2e", "1")
    assert version.run_id == run_id and version.status == "READY"

    # from an empty folder, with the run folder gone: the model comes from the server alone
    run_dir.rename(tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    user = int(read_users(data)["user_id"][0].as_py())
    recommend = [
        sys.executable, "-m", "movierec.cli", "recommend", "models:/movierec-e2e/1", "--user", str(user),
        "--tracking-uri", server, "--k", "5", "--json",
    ]  # fmt: skip
    done = subprocess.run(recommend, cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["userId"] == user and len(out["recommendations"]) == 5
    assert list(elsewhere.iterdir()) == []  # no local store or cache was made in the working directory


# --------------------------------------------------------------------------- how runs end


def test_a_sigkilled_run_is_marked_killed_and_resume_continues_it(server, data, tmp_path):
    experiment = "dead-runs"
    killed_dir, stopped_dir = tmp_path / "killed", tmp_path / "stopped"
    killed = start_training(*train_args(data, killed_dir, server, experiment, 100))
    stopped = start_training(*train_args(data, stopped_dir, server, experiment, 100))
    wait_for_epochs(killed, killed_dir)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    wait_for_epochs(stopped, stopped_dir)
    stopped.send_signal(signal.SIGTERM)  # as `kill`, `docker stop` or a scheduler would
    stopped.communicate(timeout=120)
    assert stopped.returncode == 143

    client = MlflowClient(server)
    killed_state = load_checkpoint(killed_dir / "last.ckpt")
    killed_id, killed_at = killed_state.mlflow_run_id, killed_state.train_state.epoch
    run = client.get_run(killed_id)
    # nobody could end it, unless the other training's start (it looks for runs of dead processes of this host)
    # came after the kill, which a loaded machine allows
    assert run.info.status in ("RUNNING", "KILLED") and run.data.tags[PID_TAG] == str(killed.pid)
    stopped_state = load_checkpoint(stopped_dir / "last.ckpt")
    assert status(server, stopped_state.mlflow_run_id) == "KILLED" and not stopped_state.finished

    # the next training against the experiment, on this host, sees that the process is gone
    other = train(tiny_config(data, tmp_path / "other", server, experiment))
    assert status(server, killed_id) == "KILLED" and status(server, other.run_id) == "FINISHED"

    # --resume continues the same MLflow run: RUNNING again while it trains, FINISHED at the end
    seen: list[str] = []
    original = Run._epoch

    def epoch(self):
        seen.append(status(server, self.run_id))
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "_epoch", epoch)
        assert main(["train", "--resume", str(killed_dir), "--epochs", str(killed_at + 1)]) == 0
    assert seen == ["RUNNING"]
    run = client.get_run(killed_id)
    assert run.info.status == "FINISHED" and run.data.tags[PID_TAG] == str(os.getpid())
    steps = [m.step for m in client.get_metric_history(killed_id, "train_loss")]
    assert sorted(steps) == list(range(1, killed_at + 2))  # each epoch once


def test_an_error_ends_the_run_failed_and_ctrl_c_killed(server, data, tmp_path, monkeypatch):
    original = Engine.train_epoch

    def failing(self, *args, **kwargs):
        if self.state.epoch == 1:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "train_epoch", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(data, tmp_path / "failed", server, "endings", epochs=3))
    assert status(server, load_checkpoint(tmp_path / "failed" / "last.ckpt").mlflow_run_id) == "FAILED"

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "train_epoch", interrupted)
    run = Run(tiny_config(data, tmp_path / "interrupted", server, "endings"))
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    assert status(server, run.run_id) == "KILLED"


def test_a_store_failing_mid_run_loses_nothing(server, data, tmp_path, monkeypatch, capsys):
    """The epoch's checkpoint is written before its metrics are logged; --resume logs what MLflow missed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    original = mlflow.log_metrics

    def log_metrics(metrics, step=None, **kwargs):
        if step == 2 and "train_loss" in metrics:
            raise MlflowException("API request to /api/2.0/mlflow/runs/log-batch failed:\nMax retries exceeded")
        return original(metrics, step=step, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", log_metrics)
    run_dir = tmp_path / "flaky"
    args = train_args(data, run_dir, server, "flaky", 3)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and server in err and "at epoch 2" in err
    assert f"movierec train --resume {run_dir}" in err
    state = load_checkpoint(run_dir / "last.ckpt")
    assert state.train_state.epoch == 2 and not state.finished
    assert status(server, state.mlflow_run_id) == "FAILED"
    monkeypatch.setattr(mlflow, "log_metrics", original)
    assert main(["train", "--resume", str(run_dir)]) == 0
    steps = [m.step for m in MlflowClient(server).get_metric_history(state.mlflow_run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3]
    assert status(server, state.mlflow_run_id) == "FINISHED"


def test_a_store_that_stops_answering_mid_run_is_given_a_total_deadline(server, data, tmp_path, monkeypatch, capsys):
    """A request that neither answers nor times out (a server trickling bytes keeps every read alive) is cut
    at its total deadline: one line with the resume command, the checkpoints kept."""
    import mlflow

    original = mlflow.log_metrics

    def log_metrics(metrics, step=None, **kwargs):
        if step == 2 and "train_loss" in metrics:
            time.sleep(600)  # what a trickled answer looks like from here
        return original(metrics, step=step, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", log_metrics)
    for name, value in {"TIMEOUT": "1", "MAX_RETRIES": "0", "BACKOFF_FACTOR": "0"}.items():
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", value)  # a total deadline of 1 + 5 s
    run_dir = tmp_path / "hung"
    started = time.monotonic()
    assert main(train_args(data, run_dir, server, "hung", 3)) == 2
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not finish logging epoch 2 within 6 s" in err, err
    assert f"movierec train --resume {run_dir}" in err
    assert load_checkpoint(run_dir / "last.ckpt").train_state.epoch == 2


def test_a_server_that_answers_the_check_and_then_trickles_fails_in_seconds(data, tmp_path):
    """The pre-check gets an answer; every later request gets a byte every 0.3 s, which no per-read timeout
    ends. The run is cut at its total deadline before training starts."""
    env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}  # fmt: skip
    with trickling_server(pause_s=0.3, answer_first=True) as uri:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "movierec.cli", *train_args(data, tmp_path / "run", uri, "trickled", 1)],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "did not finish creating the run within 6 s" in proc.stderr
        assert time.monotonic() - started < 60


def test_a_failure_in_the_final_logging_leaves_the_run_resumable(server, data, tmp_path, monkeypatch):
    import mlflow

    original = mlflow.log_artifact

    def log_artifact(path, *args, **kwargs):
        if str(path).endswith("history.json"):
            raise TrackingError("store gone")  # not an MLflow exception: passed through unchanged
        return original(path, *args, **kwargs)

    monkeypatch.setattr(mlflow, "log_artifact", log_artifact)
    config = tiny_config(data, tmp_path / "final", server, "final", epochs=1)
    with pytest.raises(TrackingError, match="store gone"):
        train(config)
    assert not load_checkpoint(tmp_path / "final" / "last.ckpt").finished
    monkeypatch.setattr(mlflow, "log_artifact", original)
    result = train(config, resume=tmp_path / "final")
    artifacts = {a.path for a in MlflowClient(server).list_artifacts(result.run_id)}
    assert {"history.json", "curves.png"} <= artifacts and status(server, result.run_id) == "FINISHED"
    assert load_checkpoint(tmp_path / "final" / "last.ckpt").finished


def test_only_runs_of_dead_processes_of_this_host_are_ended(tmp_path):
    """No server needed: the same bookkeeping on a SQLite store, with a reused pid and foreign runs."""
    from movierec.training.tracking import PROCESS_STARTED_TAG, end_dead_runs, ensure_experiment, process_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = ensure_experiment("bookkeeping", uri)
    assert ensure_experiment("bookkeeping", uri) == experiment
    client, tags = MlflowClient(uri), process_tags()
    runs = {
        "alive": tags,
        "dead": {**tags, PID_TAG: "999999999"},
        "pid reused": {**tags, PROCESS_STARTED_TAG: "12345.0"},
        "other host": {**tags, HOST_TAG: "elsewhere", PID_TAG: "999999999"},
        "untagged": {},
    }
    ids = {name: client.create_run(experiment, tags=run_tags).info.run_id for name, run_tags in runs.items()}
    assert sorted(end_dead_runs(uri, experiment)) == sorted([ids["dead"], ids["pid reused"]])
    statuses = {name: status(uri, run_id) for name, run_id in ids.items()}
    assert statuses == {
        "alive": "RUNNING", "dead": "KILLED", "pid reused": "KILLED", "other host": "RUNNING", "untagged": "RUNNING",
    }  # fmt: skip


def test_trainings_started_together_on_a_new_sqlite_store_all_open_it(tmp_path):
    """MLflow creates and migrates a SQLite schema without a lock; three processes opening a new store at
    once used to fail with "index ... already exists" (seen with two `movierec train` started together)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "import sys; from movierec.training.tracking import ensure_experiment as e; print(e('e', sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err[-500:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment, the same id for all
