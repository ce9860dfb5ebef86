"""Tiny trainings on synthetic data: MLflow tracking, determinism, exact resume, fine-tuning, losses."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from data_builders import TINY_RUN
from mlflow.tracking import MlflowClient

from movierec.cli import main
from movierec.data.split import write_dataset
from movierec.data.synthetic import generate_synthetic
from movierec.errors import CheckpointError, ConfigError
from movierec.models.checkpoint import load_checkpoint
from movierec.training.config import load_config
from movierec.training.run import train

TINY = [*TINY_RUN, "train.batch_size=64", "eval.every_steps=1", "eval.ks=[5,10]"]


def make_dataset(
    root: Path, seed: int, num_users: int, num_items: int = 120, name: str = "synthetic", movie_id_offset: int = 0
) -> Path:
    interactions, titles = generate_synthetic(seed=seed, num_users=num_users, num_items=num_items, num_clusters=4)
    interactions.items = interactions.items + movie_id_offset
    titles = titles.set_column(0, "movie_id", pa.array(titles["movie_id"].to_numpy() + movie_id_offset))
    return write_dataset(
        interactions, root, name, source={"kind": "synthetic", "seed": seed}, titles=titles, num_shards=4
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("training")
    return {
        "root": root,
        "data": make_dataset(root / "data", seed=1, num_users=200),
        "other": make_dataset(root / "other", seed=2, num_users=150, num_items=140, name="other", movie_id_offset=50),
        "uri": f"sqlite:///{root / 'mlflow.db'}",
    }


def tiny_config(ws: dict, run: str, *extra: str, epochs: int = 2):
    other_kind = any(e.startswith("model.kind=") and e != "model.kind=sse-pt" for e in extra)
    base = [o for o in TINY if not (other_kind and o.startswith("model.d_user"))]  # only sse-pt has users
    config = load_config(None, [*base, *extra])
    config.data.path = str(ws["data"])
    config.run_dir = str(ws["root"] / "runs" / run)
    config.tracking.uri = ws["uri"]
    config.train.epochs = epochs
    return config


def cli_args(ws: dict, run: str, *extra: str, epochs: int = 2) -> list[str]:
    return [
        "train", "--data", str(ws["data"]), "--run-dir", str(ws["root"] / "runs" / run),
        "--tracking-uri", ws["uri"], "--epochs", str(epochs), *TINY, *extra,
    ]  # fmt: skip


def test_training_is_tracked_in_mlflow(workspace):
    config = tiny_config(
        workspace, "tracked", "tracking.log_model=true", "tracking.system_metrics=true",
        "tracking.system_metrics_interval=0.5", "tracking.run_name=tiny",
    )  # fmt: skip
    result = train(config)
    client = MlflowClient(workspace["uri"])
    run = client.get_run(result.run_id)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.d_item"] == "16" and params["train.lr"] == "0.001" and params["model.kind"] == "sse-pt"
    assert params["model.keep_user"] == "0.08" and params["train.loss"] == "bce"
    assert params["train.precision"] == "auto" and params["train.seed"] == "42"
    assert len(params["dataset.meta_sha256"]) == 64 and params["git_commit"]
    for key in (
        "train_loss",
        "val_loss",
        "val_sampled-uniform-100/ndcg_at_10",
        "val_full/hr_at_10",
        "tokens_per_s",
        "lr",
    ):
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert "test_sampled-uniform-100/ndcg_at_10" in run.data.metrics
    assert any(key.startswith("system/cpu") for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoints", "config.yaml", "curves.png", "history.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    # the logged pyfunc model loads back by run id and recommends like the checkpoint
    logged = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    state = load_checkpoint(Path(config.run_dir) / "best.ckpt")
    seqs, users = torch.tensor([[0, 3, 4, 5]]), torch.tensor([2])
    from movierec.models.checkpoint import model_from_checkpoint
    from movierec.serving.loader import load_model

    expected = model_from_checkpoint(state).queries(seqs, users, last_only=True)
    network = logged.unwrap_python_model().recommender.model
    torch.testing.assert_close(network.queries(seqs, users, last_only=True), expected)
    rec = load_model(Path(config.run_dir))
    history = rec.item_movie_ids[[2, 3, 4]].tolist()
    top = logged.predict(pd.DataFrame({"history": [history], "k": [5]}))
    assert top["movieIds"][0] == [r.movie_id for r in rec.recommend_history(history, 5).recommendations]
    assert state.finished and state.train_state.epoch == 2 and state.mlflow_run_id == result.run_id


def test_same_seed_gives_the_same_metrics(workspace):
    first = train(tiny_config(workspace, "seed-a"))
    second = train(tiny_config(workspace, "seed-b"))
    assert first.test_metrics == second.test_metrics
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in second.history]
    third = train(tiny_config(workspace, "seed-c", "train.seed=7"))
    assert third.test_metrics != first.test_metrics


def test_resume_after_sigkill_matches_the_uninterrupted_run(workspace, capsys):
    epochs = 4
    schedule = (  # resumed exactly too: the warm-up, the cosine, and a switch of loss in epoch 3
        "train.warmup_steps=4", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1",
        "train.start_loss=bce", "train.start_loss_steps=8", "train.loss=gbce", "train.num_negatives=16",
    )  # fmt: skip
    reference = train(tiny_config(workspace, "uninterrupted", *schedule, epochs=epochs))
    run_dir = workspace["root"] / "runs" / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "movierec.cli", *cli_args(workspace, "killed", *schedule, epochs=epochs)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    history = run_dir / "history.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if history.is_file() and len(json.loads(history.read_text() or "[]")) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run_dir).train_state.epoch
    assert 2 <= killed_at < epochs, "the run should be killed mid-way"
    assert main(["train", "--resume", str(run_dir)]) == 0
    resumed = load_checkpoint(run_dir / "last.ckpt")
    assert resumed.train_state.epoch == epochs and resumed.mlflow_run_id
    reference_state = load_checkpoint(Path(reference.run_dir) / "last.ckpt")
    assert [h["train_loss"] for h in resumed.train_state.history] == [
        h["train_loss"] for h in reference_state.train_state.history
    ]
    for name in ("last.ckpt", "best.ckpt"):  # the last weights and the best ones, bit for bit
        ours, theirs = load_checkpoint(run_dir / name), load_checkpoint(Path(reference.run_dir) / name)
        assert ours.train_state.epoch == theirs.train_state.epoch
        for key, tensor in theirs.model.items():
            torch.testing.assert_close(ours.model[key], tensor, rtol=0, atol=0)
    out = capsys.readouterr().out
    assert "mlflow run id: " + resumed.mlflow_run_id in out
    # the resumed run continues the same MLflow run: one train_loss value per epoch
    steps = [m.step for m in MlflowClient(workspace["uri"]).get_metric_history(resumed.mlflow_run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, epochs + 1))


def test_learning_rate_warm_up_and_cosine_schedule(workspace):
    from movierec.training.run import Run

    config = tiny_config(workspace, "schedule", "train.lr=0.01", "train.warmup_steps=4", "train.lr_schedule=cosine",
                         "train.min_lr_ratio=0.1", "train.max_steps=24")  # fmt: skip
    engine = Run(config).engine
    rates = [engine.learning_rate(step) for step in range(24)]
    assert rates[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert rates[4] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert rates[14] == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 10 / 19)))
    assert all(a >= b for a, b in pairwise(rates[4:]))
    engine.train_epoch(max_steps=2)
    assert engine.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.005)
    config.train.lr_schedule = "constant"
    assert [engine.learning_rate(step) for step in (0, 3, 4, 23)] == pytest.approx([0.0025, 0.01, 0.01, 0.01])


def test_early_stopping_counts_optimizer_steps(workspace):
    """Patience in steps: with a gain threshold no later validation reaches, the run stops patience_steps
    after its first validation, whatever the epoch size; min_steps holds it back; best.ckpt still follows
    every (smaller) improvement."""
    no_gain = ("eval.min_delta=1.0", "eval.patience_steps=6")
    result = train(tiny_config(workspace, "patience", *no_gain, epochs=50))
    steps = [h["step"] for h in result.history]
    assert steps[-1] - steps[0] >= 6 and steps[-2] - steps[0] < 6 and result.epochs_run < 50
    held = train(tiny_config(workspace, "patience-min", *no_gain, "eval.min_steps=30", epochs=50))
    held_steps = [h["step"] for h in held.history]
    assert held_steps[-1] >= 30 and held_steps[-2] < 30
    assert all("val_loss" in h for h in held.history)  # every_steps=1: every epoch is validated
    assert held.best_epoch >= 1
    # validation every N steps: at the first epoch end at least N steps after the previous one
    sparse = train(tiny_config(workspace, "every", "eval.every_steps=7", epochs=6))
    validated = [h["step"] for h in sparse.history if "val_loss" in h]
    assert all(b - a >= 7 for a, b in pairwise(validated[:-1])) and validated[-1] == sparse.history[-1]["step"]


def test_validation_runs_on_its_own_user_sample_and_the_test_on_every_user(workspace):
    from movierec.training.run import Run

    run = Run(tiny_config(workspace, "validation-sample", "eval.validation_users=40"))
    assert run.validator.num_users == 40
    assert run.evaluator("evaluation", ("full",)).num_users == 200
    capped = Run(tiny_config(workspace, "both-capped", "eval.max_users=50"))
    assert capped.validator.num_users == 50 and capped.evaluator("evaluation", ("full",)).num_users == 50


def test_a_time_budget_stops_after_the_epoch_that_spends_it(workspace):
    result = train(tiny_config(workspace, "budget", "eval.every_steps=1000", "train.max_minutes=0.0001", epochs=50))
    assert result.epochs_run == 1 and "val_loss" in result.history[0]  # the last epoch is validated
    assert result.test_metrics and result.history[0]["elapsed_s"] >= 0.006


def test_resume_of_a_finished_run_is_refused(workspace):
    result = train(tiny_config(workspace, "finished", epochs=1))
    for resume in (Path(result.run_dir) / "best.ckpt", result.run_dir):
        with pytest.raises(CheckpointError, match="finished run"):
            train(tiny_config(workspace, "finished", epochs=1), resume=resume)


def test_resume_on_other_shards_is_refused(workspace):
    from movierec.models.checkpoint import save_checkpoint

    result = train(tiny_config(workspace, "shards", epochs=1))
    state = load_checkpoint(Path(result.run_dir) / "last.ckpt")
    state.finished = False  # as if it had been killed
    save_checkpoint(Path(result.run_dir) / "last.ckpt", state)
    config = tiny_config(workspace, "shards", epochs=2)
    config.data.fraction = 0.5
    with pytest.raises(CheckpointError, match="trained on shards"):
        train(config, resume=result.run_dir)


def test_init_from_loads_the_encoder_and_maps_items_across_datasets(workspace):
    source = train(tiny_config(workspace, "pretrained", epochs=1))
    source_state = load_checkpoint(Path(source.run_dir) / "best.ckpt")
    config = tiny_config(workspace, "finetuned", epochs=1)
    config.data.path = str(workspace["other"])
    config.init.from_checkpoint = str(source.run_dir)
    from movierec.training.run import Run

    run = Run(config)
    report = {row.target: (row.action, row.detail) for row in run.init_report}
    assert report["user_emb.weight"][0] == "mapped"  # userIds 1..150 are in both
    assert report["item_emb.weight"][0] == "mapped"
    assert report["item_emb.weight"][1].startswith("70 of 140 rows by movieId")
    assert report["blocks.0.query.weight"][0] == "loaded" and report["pos_emb.weight"][0] == "loaded"
    model = run.engine.model.state_dict()
    torch.testing.assert_close(model["blocks.1.ffn_in.weight"], source_state.model["blocks.1.ffn_in.weight"])
    # movieIds 51..120 are items 51..120 in the source and items 1..70 here: copied by movieId, not position
    torch.testing.assert_close(model["item_emb.weight"][1:71], source_state.model["item_emb.weight"][51:121])
    result = run.fit()
    artifacts = {a.path for a in MlflowClient(workspace["uri"]).list_artifacts(result.run_id)}
    assert "init_from.tsv" in artifacts


def test_init_from_maps_by_id_even_when_shapes_match():
    from movierec.models.base import ModelConfig
    from movierec.models.checkpoint import Checkpoint, DatasetIdentity
    from movierec.models.sse_pt import SSEPT
    from movierec.training.init_from import init_from_checkpoint

    torch.manual_seed(0)
    config = ModelConfig(num_users=2, num_items=3, max_len=4, d_item=4, d_user=2)
    old, new = SSEPT(config), SSEPT(config)
    dataset = DatasetIdentity(item_movie_ids=torch.tensor([10, 20, 30]), user_ids=torch.tensor([7, 8]))
    state = Checkpoint(old.state_dict(), config.to_dict(), {}, dataset)
    report = init_from_checkpoint(new, state, np.array([30, 10, 20]), np.array([8, 7]))
    assert {row.target: row.action for row in report}["item_emb.weight"] == "mapped"
    torch.testing.assert_close(new.item_emb.weight[1:], old.item_emb.weight[[3, 1, 2]])
    torch.testing.assert_close(new.user_emb.weight[1:], old.user_emb.weight[[2, 1]])
    positional = SSEPT(config)
    init_from_checkpoint(positional, state, np.array([30, 10, 20]), np.array([8, 7]), map_by_id=False)
    torch.testing.assert_close(positional.item_emb.weight, old.item_emb.weight)


def test_init_from_a_checkpoint_of_another_model_kind_is_an_error(workspace):
    sasrec = train(tiny_config(workspace, "sasrec", "model.kind=sasrec", epochs=1))
    config = tiny_config(workspace, "into-ssept", epochs=1)
    config.init.from_checkpoint = str(sasrec.run_dir)
    with pytest.raises(CheckpointError, match="holds a sasrec model"):
        train(config)


@pytest.mark.parametrize(
    "extra",
    [
        ["train.loss=ce"],
        ["train.loss=sampled-softmax", "train.negative_sampling=popularity", "train.num_negatives=32"],
        ["train.loss=sampled-softmax", "model.kind=sasrec"],
        ["train.loss=gbce", "train.num_negatives=16"],
        ["train.loss=gbce", "train.num_negatives=16", "train.optimizer=sparse-adam"],
        ["train.precision=bf16"],
        ["train.token_weighting=false"],
    ],
)
def test_other_losses_and_precisions_train(workspace, extra):
    result = train(tiny_config(workspace, "-".join(extra).replace("=", "_"), *extra, epochs=1))
    assert np.isfinite(result.history[0]["train_loss"]) and np.isfinite(result.history[0]["val_loss"])
    assert 0 <= result.test_metrics["test_full/ndcg@10"] <= 1


def test_fraction_trains_and_evaluates_the_same_users(workspace):
    config = tiny_config(workspace, "fraction-half", epochs=1)
    config.data.fraction = 0.5
    from movierec.training.run import Run

    run = Run(config)
    shards = json.loads((workspace["data"] / "meta.json").read_text())["shards"][:2]
    lo, hi = shards[0]["users"][0], shards[1]["users"][1]
    assert run.engine.batches.users.min() >= lo and run.engine.batches.users.max() < hi
    assert set(run.validator.users) <= set(range(lo, hi))
    assert run.validator.num_users == hi - lo


def test_bad_configuration_is_a_clear_error(workspace, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.d_items'"):
        load_config(None, ["model.d_items=3"])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train(tiny_config(workspace, "fp16", "train.precision=fp16", epochs=1))
    assert main(["train", "--data", str(workspace["root"] / "missing"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["train", "--config", "nope.yaml"]) == 2


def test_evaluate_command(workspace, tmp_path, capsys):
    result = train(tiny_config(workspace, "evaluated", epochs=1))
    out_json = tmp_path / "metrics.json"
    args = ["evaluate", str(result.run_dir), "--protocol", "full,sampled-uniform-100", "--k", "5,10"]
    assert main([*args, "--json", str(out_json)]) == 0
    metrics = json.loads(out_json.read_text())
    assert metrics["users"] == 200
    assert metrics["sampled-uniform-100/ndcg@10"] == pytest.approx(
        result.test_metrics["test_sampled-uniform-100/ndcg@10"]
    )
    assert "full" in capsys.readouterr().out
    assert main(["evaluate", str(result.run_dir), "--split", "validation", "--protocol", "full"]) == 0
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["evaluate", str(bad)]) == 2
    assert "is not a movierec checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(result.run_dir), "--data", str(workspace["other"])]) == 2
    assert "is not the dataset this model was trained on" in capsys.readouterr().err
    assert main(["evaluate", str(result.run_dir), "--protocol", "sampled-1000"]) == 2


def test_schedules_follow_the_run_and_warn_when_a_setting_cannot_take_effect(workspace, capsys):
    from movierec.training.config import resolve_schedule, run_length

    config = load_config(None, ["train.epochs=null", "train.steps=400", "train.warmup_steps=5%",
                                "eval.every_steps=10%", "eval.patience_steps=50%", "train.start_loss=bce",
                                "train.start_loss_steps=25%", "train.loss=gbce"])  # fmt: skip
    assert resolve_schedule(config, steps_per_epoch=4) == []
    assert (config.train.warmup_steps, config.train.start_loss_steps) == (20, 100)
    assert (config.eval.every_steps, config.eval.patience_steps) == (40, 200)
    short = load_config(None, ["train.epochs=3", "train.warmup_steps=20", "train.start_loss=bce",
                               "train.start_loss_steps=1200", "train.loss=gbce", "eval.every_steps=192"])  # fmt: skip
    assert run_length(short, 16) == 48
    warnings = resolve_schedule(short, steps_per_epoch=16)
    assert len(warnings) == 4, warnings
    assert "train.start_loss_steps 1200 is past the run's 48 steps, so train.loss gbce never starts" in warnings[0]
    assert "the warm-up takes 20 of the run's 48 steps" in warnings[1]
    assert "validates only 1 time(s) in 48 steps" in warnings[2]
    assert "eval.patience_steps 5000 is not shorter than the run" in warnings[3]
    for bad, message in [("train.warmup_steps=150%", "a share of the run like 6%"),
                         ("train.warmup_steps=x%", "a share of the run like 6%"),
                         ("train.steps=100", "one of them null")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
    # the run prints one warning line before training, and the length flags replace each other
    args = [*cli_args(workspace, "warned", "train.warmup_steps=40%", epochs=1)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert [line.startswith("warning: the warm-up takes") for line in out.splitlines()].count(True) == 1
    assert main([*cli_args(workspace, "by-steps", epochs=1), "--steps", "3"]) == 2  # --epochs and --steps
    assert "give --epochs or --steps, not both" in capsys.readouterr().err


def test_a_step_budget_trains_that_many_steps_whatever_the_epoch_size(workspace):
    result = train(tiny_config(workspace, "steps", "train.epochs=null", "train.steps=10", epochs=None))
    state = load_checkpoint(Path(result.run_dir) / "last.ckpt")
    assert state.train_state.step == 10 and state.train_state.epoch == 3  # 4 steps per epoch: 4 + 4 + 2


def test_last_ckpt_holds_the_last_weights_and_best_ckpt_the_best(workspace):
    # lr 0.05 overshoots: validation peaks at epoch 3 of 4 (seeded, so every time)
    result = train(tiny_config(workspace, "last-and-best", "eval.every_steps=4", "train.lr=0.05", epochs=4))
    best = load_checkpoint(Path(result.run_dir) / "best.ckpt")
    last = load_checkpoint(Path(result.run_dir) / "last.ckpt")
    assert best.finished and last.finished and best.test_metrics == last.test_metrics
    assert (result.best_epoch, best.train_state.epoch, last.train_state.epoch, last.train_state.step) == (3, 3, 4, 16)
    assert all(not torch.equal(best.model[k], last.model[k]) for k in ("item_emb.weight", "pos_emb.weight"))
    # the last weights are the ones the last epoch wrote: a resume of an unfinished copy would continue them
    with pytest.raises(CheckpointError, match="from a finished run"):
        train(tiny_config(workspace, "last-and-best", epochs=5), resume=result.run_dir)


def test_the_gpu_metrics_notice_is_dropped_on_cpu_runs(workspace, caplog):
    import logging

    name = "mlflow.system_metrics.system_metrics_monitor"
    with caplog.at_level(logging.INFO, logger=name):
        train(tiny_config(workspace, "quiet", "tracking.system_metrics=true", "tracking.system_metrics_interval=0.5",
                          epochs=1))  # fmt: skip
    messages = [r.getMessage() for r in caplog.records if r.name == name]
    assert "Started monitoring system metrics." in messages
    assert not [m for m in messages if "GPU" in m], messages
