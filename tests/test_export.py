"""`movierec export`: ONNX and TorchScript exports score like PyTorch; MLflow Model Registry round trip."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from movierec.cli import main
from movierec.models.base import ModelConfig
from movierec.models.checkpoint import (
    Checkpoint,
    DatasetIdentity,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from movierec.models.sse_pt import SSEPT
from movierec.serving.export import INPUT_NAMES, load_metadata

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

ATOL = 1e-4
BATCH_SIZES = (1, 4, 33)


def tiny_checkpoint(path: Path, kind: str, seed: int = 0) -> Path:
    """A checkpoint of an untrained (random) model: export must reproduce whatever the weights are."""
    torch.manual_seed(seed)
    config = ModelConfig(num_users=40, num_items=60, kind=kind, max_len=12, d_item=16, d_user=8, num_heads=2)
    model = SSEPT(config)
    dataset = DatasetIdentity(
        name="tiny", meta_sha256="0" * 64, num_users=40, num_items=60,
        item_movie_ids=torch.arange(1000, 1060), user_ids=torch.arange(500, 540),
    )  # fmt: skip
    return save_checkpoint(path, Checkpoint(model.state_dict(), config.to_dict(), {}, dataset))


def histories(config: ModelConfig, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded histories of every length from empty to full; users, every third a new person (0)."""
    rng = np.random.default_rng(seed)
    history = rng.integers(1, config.num_items + 1, size=(batch, config.max_len))
    lengths = rng.integers(0, config.max_len + 1, size=batch)
    lengths[0] = config.max_len
    history[np.arange(config.max_len)[None, :] < (config.max_len - lengths)[:, None]] = 0
    users = rng.integers(1, config.num_users + 1, size=batch)
    users[1::3] = 0  # new persons
    return history.astype(np.int64), users.astype(np.int64)


def pytorch_scores(model: SSEPT, history: np.ndarray, users: np.ndarray) -> np.ndarray:
    """The model's own scores; SSE-PT user 0 (a new person) gets the mean trained user vector."""
    with torch.inference_mode():
        users_t = torch.from_numpy(users)
        user_vecs = model.user_vectors(users_t.clamp(min=1))
        if user_vecs is not None:
            mean = model.user_emb.weight[1:].mean(0) * model.config.d_user**0.5
            user_vecs[users_t == 0] = mean
        hidden = model(torch.from_numpy(history), user_vecs)[:, -1]
        scores = hidden[:, : model.config.d_item] @ model.item_emb.weight.t()
        if user_vecs is not None:
            scores = scores + (hidden[:, model.config.d_item :] * user_vecs).sum(-1, keepdim=True)
        scores[:, 0] = float("-inf")
        return scores.numpy()


def export_scores(path: Path, fmt: str, history: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Score the way a consumer without movierec would."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
        return session.run(None, {"history": history, "users": users})[0]
    scripted = torch.jit.load(str(path))
    with torch.inference_mode():
        return scripted(torch.from_numpy(history), torch.from_numpy(users)).numpy()


@pytest.mark.parametrize("kind", ["sse-pt", "sasrec"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_scores_match_pytorch(tmp_path, capsys, kind, fmt):
    checkpoint = tiny_checkpoint(tmp_path / "best.ckpt", kind)
    out = tmp_path / "export" / ("model.onnx" if fmt == "onnx" else "model.pt")
    assert main(["export", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    reported = float(re.search(r"PyTorch\| on random batches of 1 and 7: (\S+)", printed).group(1))
    assert reported <= ATOL

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    for seed, batch in enumerate(BATCH_SIZES):
        history, users = histories(model.config, batch, seed)
        expected = pytorch_scores(model, history, users)
        got = export_scores(out, fmt, history, users)
        assert got.shape == (batch, model.config.num_items + 1) and got.dtype == np.float32
        assert np.all(got[:, 0] == -np.inf)  # padding never ranks
        np.testing.assert_allclose(got[:, 1:], expected[:, 1:], rtol=0, atol=ATOL)
        assert np.array_equal(np.argsort(-got[:, 1:], axis=1)[:, :5], np.argsort(-expected[:, 1:], axis=1)[:, :5])

    if kind == "sasrec":  # the user input is accepted and ignored
        history, users = histories(model.config, 3, 9)
        np.testing.assert_array_equal(
            export_scores(out, fmt, history, users), export_scores(out, fmt, history, np.zeros_like(users))
        )

    meta = load_metadata(out)
    assert meta["kind"] == kind and meta["max_len"] == 12 and meta["num_items"] == 60
    assert meta["item_movie_ids"][:2] == [1000, 1001] and meta["user_ids"][-1] == 539
    assert meta["export_format"] == fmt and meta["mlflow_run_id"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "onnx"], "give --out FILE to export, --register NAME to register, or both"),
        (["--out", "{tmp}"], "is a folder; give a file name"),
        (["--register", "movierec-tiny"], "has no MLflow run id"),
    ],
)
def test_export_errors_are_one_line(tmp_path, capsys, argv, message):
    checkpoint = tiny_checkpoint(tmp_path / "best.ckpt", "sasrec")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["export", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("movierec export: error: ") and err.count("\n") == 1 and message in err


def test_export_of_a_missing_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- MLflow Model Registry


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> dict:
    """One tiny training (1 epoch) that logs its model to a SQLite MLflow store, laid out like `make run`'s
    runs/quickstart (data/, run/, mlflow.db) so that docs/deploy.md's commands run as written."""
    from movierec.data.split import write_dataset
    from movierec.data.synthetic import generate_synthetic
    from movierec.training.config import load_config
    from movierec.training.run import train

    workdir = tmp_path_factory.mktemp("export-run")
    root = workdir / "runs" / "quickstart"
    interactions, titles = generate_synthetic(seed=3, num_users=120, num_items=80, num_clusters=4)
    data = write_dataset(interactions, root / "data", "synthetic", source={"kind": "synthetic"}, titles=titles)
    config = load_config(None, ["model.max_len=16", "model.d_item=16", "model.d_user=8", "eval.ks=[10]"])
    config.data.path, config.run_dir = str(data), str(root / "run")
    config.tracking.uri, config.tracking.system_metrics = f"sqlite:///{root / 'mlflow.db'}", False
    config.train.epochs = 1
    result = train(config)
    return {
        "workdir": workdir,
        "run_dir": Path(result.run_dir),
        "run_id": result.run_id,
        "uri": config.tracking.uri,
    }


def test_register_and_load_back_by_models_uri(logged_run, tmp_path, capsys, monkeypatch):
    import mlflow.pyfunc

    uri = logged_run["uri"]
    out = tmp_path / "model.onnx"
    argv = ["export", str(logged_run["run_dir"]), "--out", str(out), "--register", "movierec-tiny"]
    assert main([*argv, "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    first = re.search(r"registered models:/movierec-tiny/(\d+)", printed).group(1)
    # without --tracking-uri a checkpoint registers in the store its run logged to: the next version
    assert main(["export", str(logged_run["run_dir"] / "best.ckpt"), "--register", "movierec-tiny"]) == 0
    second = re.search(r"registered models:/movierec-tiny/(\d+)", capsys.readouterr().out).group(1)
    assert int(second) == int(first) + 1

    state = load_checkpoint(logged_run["run_dir"], prefer="best.ckpt")
    assert state.mlflow_run_id == logged_run["run_id"]
    model = model_from_checkpoint(state)
    mlflow.set_tracking_uri(uri)
    # the registered pyfunc model's network (rebuilt from its logged state dict and config)
    registered = mlflow.pyfunc.load_model(f"models:/movierec-tiny/{first}").unwrap_python_model().recommender.model
    client = mlflow.MlflowClient(uri)
    assert client.get_model_version("movierec-tiny", first).run_id == logged_run["run_id"]
    for seed, batch in enumerate(BATCH_SIZES):
        history, users = histories(model.config, batch, seed)
        expected = pytorch_scores(model, history, users)
        np.testing.assert_allclose(pytorch_scores(registered, history, users), expected, rtol=0, atol=ATOL)
        np.testing.assert_allclose(export_scores(out, "onnx", history, users)[:, 1:], expected[:, 1:], atol=ATOL)
    assert json.loads(json.dumps(load_metadata(out)))["mlflow_run_id"] == logged_run["run_id"]

    # and exported straight from the registry (the run's logged checkpoint, found through the version)
    ts = tmp_path / "registered.pt"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["export", f"models:/movierec-tiny/{first}", "--format", "torchscript", "--out", str(ts)]) == 2
    assert "cannot load" in capsys.readouterr().err  # the default store (./mlflow.db) does not hold it
    argv = ["export", f"models:/movierec-tiny/{first}", "--tracking-uri", uri, "--format", "torchscript"]
    assert main([*argv, "--out", str(ts)]) == 0
    history, users = histories(model.config, 5, 7)
    np.testing.assert_allclose(
        export_scores(ts, "torchscript", history, users)[:, 1:],
        pytorch_scores(model, history, users)[:, 1:],
        atol=ATOL,
    )


def test_register_in_a_store_without_the_run_is_an_error(logged_run, tmp_path, capsys):
    import mlflow

    argv = ["export", str(logged_run["run_dir"]), "--register", "x", "--tracking-uri"]
    assert main([*argv, f"sqlite:///{tmp_path}/none.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow store at" in err and not (tmp_path / "none.db").exists()

    mlflow.MlflowClient(f"sqlite:///{tmp_path}/other.db").search_experiments()  # an empty store
    capsys.readouterr()
    assert main([*argv, f"sqlite:///{tmp_path}/other.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot register run {logged_run['run_id']}" in err


# --------------------------------------------------------------------------- docs/deploy.md, as written

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_mlflow_ui(argv: list[str], run_id: str) -> None:
    """Start the documented `mlflow ui` (on a free port, one worker), see the run and the registered model."""
    port = free_port()
    argv = [a if a != "5000" else str(port) for a in argv]
    assert str(port) in argv
    bin_dir = Path(sys.executable).parent
    process = subprocess.Popen(
        [str(bin_dir / argv[0]), *argv[1:], "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, "mlflow ui exited"
            assert time.monotonic() < deadline, "mlflow ui did not start in 120 s"
            time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as response:
            run = json.load(response)["run"]
        assert any(p["key"] == "model.kind" for p in run["data"]["params"])
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/registered-models/get?name=movierec", timeout=30) as r:
            assert json.load(r)["registered_model"]["name"] == "movierec"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_documented_export_and_registry_commands_run_as_written(logged_run, monkeypatch, capsys):
    monkeypatch.chdir(logged_run["workdir"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = DOCS.read_text()
    section = text[text.index("## Export a model") : text.index("## Docker")]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    assert [language for language, _ in blocks] == ["bash", "python", "bash", "bash"]
    commands, ui = 0, None
    for language, code in blocks:
        if language == "python":
            exec(compile(code, str(DOCS), "exec"), {})
            top10 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            movie_ids = load_metadata("model.onnx")["item_movie_ids"]
            assert len(top10) == 10 and set(top10) <= set(movie_ids) and not set(top10) & set(movie_ids[:5])
            continue
        for line in filter(None, (line.strip() for line in code.splitlines())):
            argv = shlex.split(line)
            commands += 1
            if argv[0] == "mlflow":
                ui = argv  # started last, to also show the model registered below
                continue
            assert argv[0] == "movierec" and main(argv[1:]) == 0, line
            out = capsys.readouterr().out
            if "--register" in argv:
                assert "registered models:/movierec/1" in out  # the version the next command uses
            if "--out" in argv:
                assert Path(argv[argv.index("--out") + 1]).is_file()
    assert commands == 5
    check_mlflow_ui(ui, logged_run["run_id"])
    model = model_from_checkpoint(load_checkpoint(logged_run["run_dir"], prefer="best.ckpt"))
    history, users = histories(model.config, 4, 0)
    expected = pytorch_scores(model, history, users)[:, 1:]
    for path, fmt in (("model.onnx", "onnx"), ("model.pt", "torchscript"), ("registered.onnx", "onnx")):
        np.testing.assert_allclose(export_scores(Path(path), fmt, history, users)[:, 1:], expected, atol=ATOL)


def test_relative_sqlite_uris_are_made_absolute(tmp_path, monkeypatch):
    """MLflow caches stores by URI string: a relative SQLite URI would stay bound to the first folder."""
    from movierec.mlflow_store import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    for uri in ("sqlite:////abs/mlflow.db", "http://mlflow:5000", "file:///x"):
        assert tracking_uri(uri) == uri
