"""The second audit's silent wrong results and lost work (issue 28, causes 1-6), each a regression test:
numeric options out of range, a resume writing elsewhere, damaged or non-finite checkpoints, concurrent
prepares of one dataset, a shard truncated under a running server (and /health under stalled uploads: test_api)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import typing
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from data_builders import TINY_RUN
from test_api import free_port, wait_for_health

from movierec.cli import main
from movierec.data.layout import LEASE, ShardWriter, read_meta
from movierec.errors import CheckpointError, ConfigError
from movierec.models.checkpoint import load_checkpoint, save_checkpoint
from movierec.training.config import LIMITS, RunConfig, load_config

EDGES = ["-1", "0", "0.5", "1e30", "-1e30", ".nan", ".inf", "-.inf"]


def numeric_fields() -> list[str]:
    """Every `section.key` of a run config whose type is a number, a number or null, or a list of numbers."""
    fields = []
    for section in ("data", "model", "train", "eval", "tracking"):
        hints = typing.get_type_hints(type(getattr(RunConfig(), section)))
        for key, kind in hints.items():
            text = str(kind)
            if key not in ("kind",) and ("int" in text or "float" in text) and "bool" not in text:
                fields.append(f"{section}.{key}")
    return fields


def test_every_numeric_option_has_a_documented_range():
    assert set(numeric_fields()) - {"model.num_users", "model.num_items"} <= set(LIMITS), "add the new option's range"


@pytest.mark.parametrize("key", numeric_fields())
def test_every_numeric_option_refuses_what_would_silently_change_the_run(key):
    """Negative, zero, fractional, huge, NaN and inf: a one-line ConfigError naming the option, or a value its
    documented range (LIMITS) allows."""
    limit = LIMITS[key]
    for edge in EDGES:
        value = f"[{edge}, {edge}]" if key in ("train.betas",) else f"[{edge}]" if key == "eval.ks" else edge
        try:
            config = load_config(None, [f"{key}={value}"])
        except ConfigError as exc:
            assert key in str(exc) and "\n" not in str(exc), (key, edge, str(exc))
            continue
        section, name = key.split(".")
        got = getattr(getattr(config, section), name)
        for element in got if isinstance(got, list | tuple) else [got]:
            assert math.isfinite(element) and limit.holds(element), (key, edge, got)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.grad_clip=-1", "train.grad_clip must be in [0, 1e+06]"),
        ("eval.batch_size=-5", "eval.batch_size must be in [1, 1.04858e+06]"),
        ("train.batch_size=100.5", "train.batch_size must be a whole number"),
        ("model.max_len=10.5", "model.max_len must be a whole number"),
        ("eval.ks=[x]", "eval.ks[0] must be an integer"),
        ("train.betas=[0.9]", "train.betas must be a list of 2 values"),
        ("train.betas=[2,3]", "train.betas must be in [0, 1)"),
        ("train.betas=[a,b]", "train.betas[0] must be a number"),
        ("train.weight_decay=-1", "train.weight_decay must be in [0, 10]"),
        ("train.num_threads=-1", "train.num_threads must be in [1, 4096]"),
        ("eval.batch_size=0", "eval.batch_size must be in [1,"),
        ("train.seed=-1", "train.seed (--seed) must be in [0,"),
        ("train.seed=100000000000000000000", "train.seed (--seed) must be in [0,"),
        ("model.d_item=100000000", "model.d_item must be in [1, 65536]"),
        ("train.num_negatives=100000000", "train.num_negatives must be in [1, 65536]"),
    ],
)
def test_cli_refuses_values_that_pass_type_checks_but_are_wrong(override, message, tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "run"), override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_seed_flag_is_checked_too(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--seed", "-1"]) == 2
    assert "train.seed (--seed) must be in [0," in capsys.readouterr().err


# --------------------------------------------------------------------------- a resume writes to its own run


@pytest.fixture
def unfinished_run(trained_run, tmp_path_factory) -> Path:
    """A copy of the trained run whose last.ckpt looks killed after its epoch (resumable). It forgets the
    session run's MLflow id: resuming the copy must never log into (and overwrite) the shared fixture's run."""
    run = tmp_path_factory.mktemp("resumable") / "run"
    shutil.copytree(trained_run.run_dir, run)
    state = load_checkpoint(run / "last.ckpt")
    save_checkpoint(run / "last.ckpt", replace(state, finished=False, mlflow_run_id=None))
    return run


def test_resume_with_a_config_file_writes_to_the_resumed_run(unfinished_run, trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/synthetic.yaml says run_dir: runs/synthetic, relative to here
    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"
    before = load_checkpoint(unfinished_run / "last.ckpt").train_state.epoch
    args = ["train", "--resume", str(unfinished_run), "--config", str(config), "--data", str(trained_run.data_dir),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--epochs", str(before + 1), *TINY_RUN,
            "train.batch_size=64", "eval.ks=[10]"]  # fmt: skip
    assert main(args) == 0
    assert not (tmp_path / "runs").exists(), "nothing written where the YAML's run_dir points"
    assert load_checkpoint(unfinished_run / "last.ckpt").train_state.epoch == before + 1


def test_resume_into_another_run_dir_is_refused(unfinished_run, tmp_path, capsys):
    assert main(["train", "--resume", str(unfinished_run), "--run-dir", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert "--resume continues" in err and "names another" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "elsewhere").exists()
    config = load_config(None, ["train.epochs=5"])
    config.run_dir = str(tmp_path / "other")
    from movierec.training.run import Run

    with pytest.raises(ConfigError, match="a resumed run writes to its own folder"):
        Run(config, resume=unfinished_run)


# --------------------------------------------------------------------------- damaged and non-finite checkpoints


def test_a_flipped_bit_in_the_weights_is_caught_by_the_crc(trained_run, tmp_path, capsys):
    good = trained_run.run_dir / "best.ckpt"
    data = bytearray(good.read_bytes())
    weights = load_checkpoint(good).model["item_emb.weight"]
    needle = weights[5].numpy().tobytes()  # a row of the item table, as stored in the archive
    at = bytes(data).find(needle)
    assert at > 0
    data[at + 3] ^= 0x04
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(data)
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        load_checkpoint(flipped)
    assert main(["recommend", str(flipped), "--user", "1007"]) == 2
    err = capsys.readouterr().err
    assert "fails its CRC check" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(trained_run, tmp_path, bad, capsys):
    state = load_checkpoint(trained_run.run_dir / "best.ckpt")
    model = {k: v.clone() for k, v in state.model.items()}
    model["blocks.0.query.weight"][0, 0] = bad
    path = save_checkpoint(tmp_path / "bad.ckpt", replace(state, model=model))
    assert main(["recommend", str(path), "--user", "1007"]) == 2
    err = capsys.readouterr().err
    assert "non-finite weights (NaN or Inf in blocks.0.query.weight)" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- two prepares of one dataset


def test_a_prepare_never_takes_a_live_writers_folder_but_clears_a_dead_ones(tmp_path):
    out = tmp_path / "data"
    live = ShardWriter(out, "synthetic", overwrite=True)  # a prepare in progress
    try:
        dead = out / ".synthetic.tmp-left-by-a-killed-writer"
        dead.mkdir()
        (dead / LEASE).touch()  # its lease: nobody holds it, as after a kill
        assert main(["prepare", "--dataset", "synthetic", "--out", str(out), "--overwrite"]) == 0
        assert live.tmp_dir.is_dir(), "the live writer's temporary folder is untouched"
        assert not dead.exists(), "a dead writer's folder is removed"
    finally:
        live.abort()
    assert sorted(p.name for p in out.iterdir()) == ["synthetic"]


def test_concurrent_prepares_both_finish(tmp_path):
    out = tmp_path / "data"
    command = [sys.executable, "-m", "movierec.cli", "prepare", "--dataset", "synthetic", "--out", str(out),
               "--overwrite"]  # fmt: skip
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert [code for code, _ in results] == [0, 0, 0], results
    assert read_meta(out / "synthetic")["name"] == "synthetic"
    assert sorted(p.name for p in out.iterdir()) == ["synthetic"], "no temporary folder left"


# --------------------------------------------------------------------------- a shard replaced under the server


def test_truncating_a_shard_while_serving_does_not_kill_the_server(trained_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained_run.data_dir, data)
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "movierec.cli", "serve", str(trained_run.run_dir), "--data", str(data),
            "--port", str(port), "--threads", "1"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_health(proc, port, log_path)
            base = f"http://127.0.0.1:{port}"
            users = [1007 + 7 * u for u in range(1, 40)]
            before = [httpx.get(f"{base}/v1/users/{u}/recommendations?k=3", timeout=10) for u in users]
            for shard in sorted((data / "training").glob("part-*.npz")):
                with open(shard, "r+b") as handle:  # what `cp` over the file does: truncate in place, then write
                    handle.truncate(0)
            after = [httpx.get(f"{base}/v1/users/{u}/recommendations?k=3", timeout=10) for u in users]
            assert proc.poll() is None, log_path.read_text()
            assert [r.status_code for r in after] == [r.status_code for r in before]
            assert [r.json() for r in after] == [r.json() for r in before], "served from its own copy"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
