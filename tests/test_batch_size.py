"""`train.batch_size: auto`: halving from train.max_batch_size on out-of-memory, the learning-rate scaling, the
chosen size in MLflow and on resume, the CPU memory budget, and the one-line error when nothing fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from data_builders import TINY_RUN
from mlflow.tracking import MlflowClient
from test_training import make_dataset

from movierec.cli import main
from movierec.errors import ConfigError
from movierec.models.checkpoint import load_checkpoint, save_checkpoint
from movierec.training import batch_size
from movierec.training.batch_size import PeakTensorMemory, choose_batch_size, scaled_lr
from movierec.training.config import load_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("auto-batch"), seed=3, num_users=120, num_items=60)


def simulate_gpu_memory(monkeypatch, fits_up_to: int) -> list[int]:
    """Make every trial above `fits_up_to` sequences fail as a GPU out of memory would; returns the sizes tried."""
    real, tried = batch_size.trial_step, []

    def trial(size, *args, **kwargs):
        tried.append(size)
        if size > fits_up_to:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated above {fits_up_to})")
        return real(size, *args, **kwargs)

    monkeypatch.setattr(batch_size, "trial_step", trial)
    return tried


def args(data: Path, tmp_path: Path, run: str, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--run-dir", str(tmp_path / run), "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}", "--epochs", "1", *TINY_RUN, *extra,
    ]  # fmt: skip


def test_auto_halves_to_what_fits_scales_lr_and_a_resume_keeps_it(data, tmp_path, monkeypatch, capsys):
    tried = simulate_gpu_memory(monkeypatch, fits_up_to=40)
    auto = ["train.batch_size=auto", "train.max_batch_size=256", "train.lr_scaling=linear", "train.lr=0.002"]
    assert main(args(data, tmp_path, "run", *auto)) == 0
    assert tried == [256, 128, 64, 32]
    assert "setup batch size: auto: 32 (tried 256 out of memory" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "run")
    assert state.config["train"]["batch_size"] == 32
    assert state.config["train"]["lr"] == pytest.approx(0.002 * 32 / 256)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 32 and saved["eval"]["batch_size"] == 32, "evaluation batches as tried"
    params = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(state.mlflow_run_id).data.params
    assert params["train.batch_size"] == "32" and params["train.batch_size_requested"] == "auto"
    assert (
        params["train.batch_size_tried"].startswith("256 out of memory")
        and "32 fits" in params["train.batch_size_tried"]
    )
    # a resume uses the chosen size and learning rate, with no new search
    state.finished = False  # as if it had been killed after its first epoch
    save_checkpoint(tmp_path / "run" / "last.ckpt", state)
    tried.clear()
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 0
    resumed = load_checkpoint(tmp_path / "run")
    assert tried == [] and resumed.train_state.epoch == 2
    assert resumed.config["train"]["batch_size"] == 32 and resumed.config["train"]["lr"] == state.config["train"]["lr"]


def test_nothing_fits_is_one_line_naming_the_smallest_size(data, tmp_path, monkeypatch, capsys):
    simulate_gpu_memory(monkeypatch, fits_up_to=0)
    assert main(args(data, tmp_path, "none", "train.batch_size=auto", "train.max_batch_size=8")) == 2
    err = capsys.readouterr().err
    assert "nothing fits in memory, not even the smallest size tried, 1 (tried 8, 4, 2, 1)" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none" / "last.ckpt").exists()


def test_cpu_budget_is_checked_against_a_real_trial_step(data, tmp_path, capsys):
    import psutil

    resident_gb = psutil.Process().memory_info().rss / 1e9
    budget = f"train.memory_limit_gb={resident_gb * 0.5:.4f}"  # less than the process already holds
    assert main(args(data, tmp_path, "small", "train.batch_size=auto", "train.max_batch_size=4", budget)) == 2
    assert "not even the smallest size tried, 1" in capsys.readouterr().err
    roomy = f"train.memory_limit_gb={resident_gb + 8:.4f}"
    assert main(args(data, tmp_path, "roomy", "train.batch_size=auto", "train.max_batch_size=64", roomy)) == 0
    assert "auto: 64 (tried 64 fits (peak " in capsys.readouterr().out


def test_the_tensor_peak_counts_what_is_alive_at_once_backward_included():
    with PeakTensorMemory() as tracker:
        first = torch.empty(1_000_000)  # 4 MB
        second = torch.empty(2_000_000)  # 8 MB
        del first
        third = torch.empty(500_000)  # 2 MB
    assert (tracker.live, tracker.peak) == (10_000_000, 12_000_000)
    del second, third
    weight = torch.randn(100, 100, requires_grad=True)
    with PeakTensorMemory() as tracker:
        (torch.randn(1000, 100) @ weight).sum().backward()
    assert tracker.live >= weight.grad.nbytes, "the gradient, made in backward, is counted"


def test_choice_rules():
    assert scaled_lr(1e-3, 512, 2048, "none") == 1e-3
    assert scaled_lr(1e-3, 512, 2048, "linear") == pytest.approx(2.5e-4)
    assert scaled_lr(1e-3, 512, 2048, "sqrt") == pytest.approx(5e-4)

    def fits_below_300(size: int) -> str:
        if size >= 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "ok"

    choice = choose_batch_size(fits_below_300, 2048, 1e-3, "sqrt")
    assert choice.size == 256 and [s for s, _ in choice.tried] == [2048, 1024, 512, 256]
    with pytest.raises(ValueError, match="unrelated"):  # only out-of-memory errors halve; others propagate
        choose_batch_size(lambda size: (_ for _ in ()).throw(ValueError("unrelated")), 8, 1e-3, "none")
    for bad in ("train.batch_size=0", "train.batch_size=12.5", "train.batch_size=big", "train.lr_scaling=cubic"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])
    assert load_config(None, ["train.batch_size=auto"]).train.batch_size == "auto"
