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
