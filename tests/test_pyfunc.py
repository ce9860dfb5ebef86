"""The MLflow pyfunc model every training run logs, end to end against a real `mlflow server`: one tiny training
with tracking.log_model=true, registered as `movierec`; the documented `mlflow models serve` and
`mlflow.pyfunc.load_model` of docs/serving.md answer what `movierec recommend --history` answers, with neither
the dataset nor the run folder left where they run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow.artifacts
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import movie_id_of, user_id_of
from mlflow.tracking import MlflowClient
from serving_docs import DOCS, documented_commands
from test_tracking_server import MLFLOW, free_port, server, server_process, train_args  # noqa: F401 (the fixtures)

from movierec.cli import main
from movierec.data.split import Interactions, write_dataset
from movierec.data.synthetic import generate_synthetic
from movierec.models.checkpoint import load_checkpoint

HISTORY = [13, 263, 1193]  # movieIds of Synthetic movies 1, 26 and 119: the documented history
NAME = "movierec"  # the registered model of the documented commands


@dataclass(frozen=True)
class Registered:
    uri: str  # the tracking server
    run_id: str
    expected: dict  # `movierec recommend models:/movierec/1 --history ... --k 5 --json`, with the dataset there


@pytest.fixture(scope="module")
def registered(request, tmp_path_factory) -> Registered:
    """A tiny run that logs its pyfunc model to the server, registered as models:/movierec/1; then its dataset
    and run folder are removed: the model has to carry what it needs."""
    uri = request.getfixturevalue("server")  # test_tracking_server's `mlflow server`, started for this module
    root = tmp_path_factory.mktemp("pyfunc")
    raw, titles = generate_synthetic(seed=0, num_users=200, num_items=150, num_clusters=4)
    interactions = Interactions(
        users=user_id_of(raw.users), items=movie_id_of(raw.items), timestamps=raw.timestamps, ratings=raw.ratings
    )
    titles = titles.set_column(0, "movie_id", pa.array(movie_id_of(titles["movie_id"].to_numpy()), pa.int64()))
    data = write_dataset(interactions, root / "data", "synthetic", source={"kind": "synthetic"}, titles=titles)
    args = train_args(data, root / "run", uri, "pyfunc", 1, "tracking.log_model=true")
    assert main(args) == 0
    run_id = load_checkpoint(root / "run" / "best.ckpt").mlflow_run_id
    assert main(["export", str(root / "run"), "--register", NAME, "--tracking-uri", uri]) == 0
    recommend = [sys.executable, "-m", "movierec.cli", "recommend", f"models:/{NAME}/1", "--tracking-uri", uri,
                 "--history", ",".join(map(str, HISTORY)), "--k", "5", "--json"]  # fmt: skip
    done = subprocess.run(recommend, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for folder in (data, root / "run"):
        folder.rename(folder.with_name(folder.name + "-gone"))
    return Registered(uri, run_id, json.loads(done.stdout))


def test_the_logged_model_holds_tensors_a_config_and_items_and_no_pickle(registered, tmp_path):
    client = MlflowClient(registered.uri)
    run = client.get_run(registered.run_id)
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert (logged.name, logged.source_run_id) == ("model", registered.run_id)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{registered.run_id}/model", dst_path=str(tmp_path),
                                                     tracking_uri=registered.uri))  # fmt: skip
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc.py", "artifacts/weights.pt", "artifacts/model_config.json", "artifacts/items.parquet",
            "input_example.json", "requirements.txt"} <= files  # fmt: skip
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc.py") and "python_model" not in flavor
    weights = torch.load(local / "artifacts" / "weights.pt", weights_only=True)
    assert weights and all(isinstance(t, torch.Tensor) for t in weights.values())
    items = pq.read_table(local / "artifacts" / "items.parquet")
    assert items.column_names == ["movie_id", "title", "year", "genres"] and items.num_rows == 150
    assert items["movie_id"].to_pylist() == sorted(items["movie_id"].to_pylist())
    signature = yaml.safe_load((local / "MLmodel").read_text())["signature"]
    assert [c["name"] for c in json.loads(signature["inputs"])] == ["history", "k"]
    assert "movierec==" in (local / "requirements.txt").read_text()


def test_mlflow_models_serve_answers_like_movierec_recommend(registered, tmp_path):
    (command,) = documented_commands("mlflow models serve")
    port = free_port()
    argv = shlex.split(re.sub(r"--port \d+", f"--port {port}", command))
    # MLflow starts `uvicorn` by name: the environment's bin folder on PATH, as in an activated virtualenv
    path = f"{MLFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri, "PATH": path}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(MLFLOW), *argv[1:]], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while not ping(base):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        body = {"dataframe_records": [{"history": HISTORY, "k": 5}, {"history": [13], "k": 3}]}
        answer = httpx.post(f"{base}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        first, one = answer.json()["predictions"]
        assert len(one["movieIds"]) == 3 and 13 not in one["movieIds"]
        without_k = {"dataframe_records": [{"history": [*HISTORY, 24]}]}
        (second,) = httpx.post(f"{base}/invocations", json=without_k, timeout=60).json()["predictions"]
        expected = registered.expected["recommendations"]
        assert first["movieIds"] == [r["movieId"] for r in expected]
        assert first["titles"] == [r["title"] for r in expected]
        assert first["scores"] == pytest.approx([r["score"] for r in expected], abs=1e-5)
        assert first["unknownMovieIds"] == registered.expected["unknownMovieIds"] == []
        assert second["movieIds"][:5] == first["movieIds"] and len(second["movieIds"]) == 10  # k defaults to 10
        assert second["unknownMovieIds"] == [24]  # ignored, as `movierec recommend` ignores it
        refused = httpx.post(f"{base}/invocations", json={"dataframe_records": [{"history": [24]}]}, timeout=60)
        assert refused.status_code == 400 and "none of the history's movieIds is known" in refused.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the session started here
        proc.wait(timeout=30)


def ping(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ping", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_pyfunc_load_model_from_an_empty_folder(registered, tmp_path):
    (snippet,) = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri}
    code = snippet.replace("<RUN_ID>", registered.run_id)
    done = subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    expected = registered.expected["recommendations"]
    assert row["movieIds"] == [r["movieId"] for r in expected]
    assert row["scores"] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    assert list(empty.iterdir()) == []  # nothing written where it ran
