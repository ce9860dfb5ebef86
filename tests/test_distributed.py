"""Data-parallel training with torchrun: 2 CPU processes (gloo) on a tiny synthetic dataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from data_builders import TINY_RUN
from mlflow.tracking import MlflowClient

from movierec.data.split import write_dataset
from movierec.data.synthetic import generate_synthetic
from movierec.models.checkpoint import load_checkpoint
from movierec.training import distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
TINY = [
    *TINY_RUN, "train.batch_size=32", "eval.every_steps=100000", "eval.ks=[10]", "eval.protocols=[full]",
    "eval.protocol=full", "train.optimizer=sparse-adam",
]  # fmt: skip


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    interactions, titles = generate_synthetic(seed=5, num_users=200, num_items=120, num_clusters=4)
    data = write_dataset(interactions, root / "data", "syn", source={"kind": "synthetic"}, titles=titles, num_shards=2)
    return {"root": root, "data": str(data), "uri": f"sqlite:///{root / 'mlflow.db'}"}


def run_worker(ws: dict, name: str, *overrides: str, nproc: int = 2, resume: str | None = None) -> Path:
    run_dir = ws["root"] / name
    spec = {"data": ws["data"], "run_dir": str(run_dir), "uri": ws["uri"], "resume": resume,
            "overrides": [*TINY, f"tracking.experiment={name}", *overrides]}  # fmt: skip
    command = torchrun(str(WORKER), json.dumps(spec), nproc=nproc) if nproc > 1 else [sys.executable, str(WORKER)]
    if nproc == 1:
        command.append(json.dumps(spec))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_two_processes_one_run_same_weights_everywhere_and_as_one_process(workspace):
    ddp = run_worker(workspace, "ddp", "train.epochs=2")
    rank0, rank1 = (torch.load(ddp / f"weights-rank{r}.pt") for r in (0, 1))
    for name, tensor in rank0.items():
        torch.testing.assert_close(rank1[name], tensor, rtol=0, atol=0)
    runs = MlflowClient(workspace["uri"]).search_runs(
        [MlflowClient(workspace["uri"]).get_experiment_by_name("ddp").experiment_id]
    )
    assert len(runs) == 1, "rank 0 alone creates the MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["train.world_size"] == "2"
    assert run.data.params["train.global_batch_size"] == "64"
    assert [m.step for m in MlflowClient(workspace["uri"]).get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    # one process accumulating the same two batches per step takes the same steps on the same data
    single = run_worker(workspace, "accumulated", "train.epochs=2", "train.grad_accumulation=2", nproc=1)
    alone = torch.load(single / "weights-rank0.pt")
    for name, tensor in rank0.items():
        if name.endswith("key.bias"):
            # its true gradient is 0 (a key bias shifts every score of a query alike, and softmax ignores
            # that), so Adam turns rounding noise of order 1e-9 into steps of order lr: nothing to compare
            continue
        torch.testing.assert_close(alone[name], tensor, rtol=1e-5, atol=1e-6)
    # the split evaluation reduces to the single process's numbers
    ddp_test = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    alone_run = MlflowClient(workspace["uri"]).search_runs(
        [MlflowClient(workspace["uri"]).get_experiment_by_name("accumulated").experiment_id]
    )[0]
    for key, value in ddp_test.items():
        assert alone_run.data.metrics[key] == pytest.approx(value, abs=1e-3), key


def test_sigkill_of_one_rank_then_resume_is_bit_identical(workspace):
    epochs = 4
    reference = run_worker(workspace, "uninterrupted", f"train.epochs={epochs}")
    run_dir = workspace["root"] / "killed"
    spec = {"data": workspace["data"], "run_dir": str(run_dir), "uri": workspace["uri"],
            "overrides": [*TINY, "tracking.experiment=killed", f"train.epochs={epochs}"]}  # fmt: skip
    launcher = subprocess.Popen(
        torchrun(str(WORKER), json.dumps(spec)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    history = run_dir / "history.json"
    deadline = time.time() + 180
    while time.time() < deadline and launcher.poll() is None:
        if history.is_file() and len(json.loads(history.read_text() or "[]")) >= 2:
            break
        time.sleep(0.05)
    children = psutil.Process(launcher.pid).children(recursive=True)
    workers = [p for p in children if "ddp_worker" in " ".join(p.cmdline())]
    assert workers, "torchrun's workers should be running"
    workers[-1].send_signal(signal.SIGKILL)  # one rank dies; torchrun ends the job
    assert launcher.wait(timeout=120) != 0
    killed_at = load_checkpoint(run_dir).train_state.epoch
    assert 2 <= killed_at < epochs, "the job should be killed mid-way"
    other_world = workspace["root"] / "killed-one-process"
    shutil.copytree(run_dir, other_world)

    run_worker(workspace, "killed", f"train.epochs={epochs}", resume=str(run_dir))
    resumed, expected = (torch.load(d / "weights-rank0.pt") for d in (run_dir, reference))
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)
    finished = load_checkpoint(run_dir)
    assert finished.train_state.epoch == epochs and finished.world_size == 2

    # another world size resumes too, with a notice that it is not bit-identical
    command = [sys.executable, "-m", "movierec", "train", "--resume", str(other_world)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was trained by 2 process(es), this run has 1" in done.stdout
    assert load_checkpoint(other_world).train_state.epoch == epochs


@pytest.mark.parametrize("lost", [1, 0])
def test_a_killed_rank_is_one_line_naming_it_and_the_resume_command(workspace, lost, tmp_path):
    """SIGKILL of one rank mid-training: the survivor says which rank it lost and how to resume (no gloo
    traceback), the MLflow run ends KILLED (by rank 0, or by the survivor when rank 0 is the one killed),
    and `movierec train --resume` finishes the run."""
    name = f"lost-rank{lost}"
    run_dir = workspace["root"] / name
    command = torchrun("-m", "movierec", "train", "--data", workspace["data"], "--run-dir", str(run_dir),
                       "--tracking-uri", workspace["uri"], "--experiment", name, *TINY, "train.epochs=40")  # fmt: skip
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        launcher = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None and not (run_dir / "last.ckpt").is_file():
        time.sleep(0.05)
    workers = {
        int(p.environ()["RANK"]): p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if "movierec" in p.cmdline() and "RANK" in p.environ()
    }
    assert sorted(workers) == [0, 1], (tmp_path / "stderr").read_text()
    workers[lost].send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=60) != 0
    err = (tmp_path / "stderr").read_text()
    killed_at = load_checkpoint(run_dir).train_state.epoch
    assert killed_at < 40, "the job should be killed mid-way"
    errors = [line for line in err.splitlines() if "movierec train: error: " in line]
    assert len(errors) == 1, err
    assert f"error: lost rank {lost} of 2 " in errors[0] and f"-m movierec train --resume {run_dir}`" in errors[0]
    assert "Connection closed" not in err and "DistBackendError" not in err, err
    client = MlflowClient(workspace["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "KILLED"
    if lost == 0:
        assert errors[0].endswith(f"; MLflow run {run.info.run_id} ended KILLED")

    # one more epoch, in one process: what matters is that the killed run's folder and MLflow run resume
    resume = [sys.executable, "-m", "movierec", "train", "--resume", str(run_dir), "--epochs", str(killed_at + 1)]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert load_checkpoint(run_dir).finished


def test_only_a_collective_failing_for_a_lost_peer_is_a_peer_failure(monkeypatch):
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:33512")
    assert not distributed.is_peer_failure(gloo), "not under torchrun"
    alive = distributed.Process.this()
    monkeypatch.setattr(distributed, "_joined", distributed.Distributed(0, 2, processes=(alive, alive)))
    assert distributed.is_peer_failure(gloo)
    assert not distributed.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")), "a bug"
    assert not distributed.is_peer_failure(SystemExit(143)), "a stop while every peer runs"
    gone = distributed.Process(alive.host, alive.pid, alive.started - 60)  # its pid now names another process
    monkeypatch.setattr(distributed, "_joined", distributed.Distributed(0, 2, processes=(alive, gone)))
    assert distributed.is_peer_failure(SystemExit(143)) and distributed.joined().lost_peers() == [1]
