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


# --------------------------------------------------------------------------- tracebacks that became one line


@pytest.fixture(scope="module")
def bad(trained_run, tmp_path_factory) -> dict[str, Path]:
    """Inputs the second audit found crashing: files where folders belong, broken configs and meta.json."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("second-audit")
    (root / "a-file").write_text("x")
    (root / "a-folder.parquet").mkdir()
    (root / "loop").symlink_to(root / "loop")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01" * 50)
    (root / "deep.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000)
    (root / "invalid.yaml").write_text("train:\n  lr: [1, 2\n  epochs: 3\n")
    (root / "tagged.yaml").write_text("train: !!python/object/apply:os.system ['true']\n")
    for name, edit in [
        ("source-text", lambda m: m.update(source="x")),
        ("interactions-text", lambda m: m.update(num_interactions="abc")),
        ("interactions-null", lambda m: m.update(num_interactions=None)),
        ("split-counts-list", lambda m: m.update(split_counts=[1, 2, 3])),
        ("files-list", lambda m: m["shards"][0].update(files=[1])),
        ("no-sha256", lambda m: m["shards"][0]["files"]["training"].pop("sha256")),
        ("huge-users", lambda m: m.update(num_users=10**13)),
    ]:
        folder = root / name
        shutil.copytree(trained_run.data_dir, folder)
        meta = json.loads((folder / "meta.json").read_text())
        edit(meta)
        (folder / "meta.json").write_text(json.dumps(meta))
    strings = root / "string-ids"
    shutil.copytree(trained_run.data_dir, strings)
    items = pq.read_table(strings / "items.parquet")
    column = pa.array([str(v) for v in items["movie_id"].to_pylist()])
    pq.write_table(
        items.set_column(items.column_names.index("movie_id"), "movie_id", column), strings / "items.parquet"
    )
    meta = json.loads((strings / "meta.json").read_text())
    from movierec.data.layout import sha256_file

    meta["files_sha256"]["items.parquet"] = sha256_file(strings / "items.parquet")  # a consistent edit
    (strings / "meta.json").write_text(json.dumps(meta))
    return {"root": root, "run": trained_run.run_dir, "data": trained_run.data_dir}


TRAIN = ["train", "tracking.system_metrics=false", "--tracking-uri", "sqlite:///{root}/m.db"]
SASREC_TEXT = ["prepare", "--dataset", "sasrec-text", "--input", "{root}/a-file", "--out", "{root}/n", "--overwrite"]
SECOND_AUDIT = [
    # output paths: a file where a folder belongs, a folder where a file belongs, a symlink loop
    (
        "evaluate-json-dir",
        ["evaluate", "{run}", "--protocol", "full", "--json", "{root}/a-folder.parquet"],
        "is a folder",
    ),
    ("export-recs-dir", ["export-recs", "{run}", "--out", "{root}/a-folder.parquet"], "is a folder"),
    (
        "evaluate-json-under-file",
        ["evaluate", "{run}", "--protocol", "full", "--json", "{root}/a-file/m.json"],
        "is a file, not a folder",
    ),
    ("train-run-dir-file", [*TRAIN, "--data", "{data}", "--run-dir", "{root}/a-file"], "a-file"),
    ("prepare-out-file", ["prepare", "--dataset", "synthetic", "--out", "{root}/a-file"], "a-file"),
    ("prepare-out-loop", ["prepare", "--dataset", "synthetic", "--out", "{root}/loop"], "loop"),
    (
        "download-home-file",
        ["download", "ml-100k", "--data-home", "{root}/a-file", "--archive", "{root}/a-file"],
        "a-file",
    ),
    ("quickstart-out-file", ["quickstart", "--out", "{root}/a-file"], "a-file"),
    # values that pass a type check but are wrong
    ("device-tpu", [*TRAIN, "--data", "{data}", "--run-dir", "{root}/r1", "--device", "tpu"], "train.device must be"),
    ("device-meta", [*TRAIN, "--data", "{data}", "--run-dir", "{root}/r2", "--device", "meta"], "train.device must be"),
    ("device-empty", [*TRAIN, "--data", "{data}", "--run-dir", "{root}/r3", "--device", ""], "train.device must be"),
    ("evaluate-cuda", ["evaluate", "{run}", "--device", "cuda"], "CUDA is not available"),
    ("min-rating-nan", ["prepare", "--dataset", "synthetic", "--out", "{root}/p", "--min-rating", "nan"], "finite"),
    ("min-rating-inf", ["prepare", "--dataset", "synthetic", "--out", "{root}/p", "--min-rating", "inf"], "finite"),
    ("quickstart-epochs-0", ["quickstart", "--out", "{root}/q0", "--epochs", "0"], "train.epochs (--epochs) must be"),
    ("quickstart-epochs-neg", ["quickstart", "--out", "{root}/q1", "--epochs", "-2"], "train.epochs (--epochs) must"),
    # config files
    ("config-binary", [*TRAIN, "--config", "{root}/binary.yaml"], "is not a text file"),
    ("config-deep", [*TRAIN, "--config", "{root}/deep.yaml"], "nested too deeply"),
    ("config-invalid", [*TRAIN, "--config", "{root}/invalid.yaml"], "is not valid YAML"),
    ("config-python-tag", [*TRAIN, "--config", "{root}/tagged.yaml"], "is not valid YAML"),
    # paths and names
    ("path-newline", ["info", "{root}/no\nsuch"], "no\\nsuch"),
    *[
        (f"name-{label}", [*SASREC_TEXT, "--name", name], "must be a plain folder name")
        for label, name in (("dot", "."), ("dotdot", ".."), ("path", "../x"))
    ],
    # meta.json of the wrong types, and a side table of the wrong type
    *[
        (
            f"meta-{name}-{command}",
            [command, "{root}/" + name, *(["--verify"] if command == "info" else [])],
            "meta.json is damaged",
        )
        for name in (
            "source-text",
            "interactions-text",
            "interactions-null",
            "split-counts-list",
            "files-list",
            "no-sha256",
            "huge-users",
        )
        for command in ("info",)
    ],
    ("meta-train", [*TRAIN, "--data", "{root}/files-list", "--run-dir", "{root}/r4"], "meta.json is damaged"),
    ("items-string-ids", ["info", "{root}/string-ids", "--verify"], "1 of 8 files failed verification"),
    ("items-string-ids-train", [*TRAIN, "--data", "{root}/string-ids", "--run-dir", "{root}/r5"], "not integer ids"),
    (
        "model-over-memory",  # 1.2 T parameters: refused from the meta device, before any allocation
        [*TRAIN, "--data", "{data}", "--run-dir", "{root}/r6", "model.d_item=60000", "model.num_blocks=64"],
        "GiB for its weights, gradients and optimizer state",
    ),
]


@pytest.mark.parametrize(("name", "argv", "message"), SECOND_AUDIT, ids=[c[0] for c in SECOND_AUDIT])
def test_second_audit_inputs_are_one_line_and_exit_2(bad, capsys, name, argv, message):
    args = [a.format(**bad) for a in argv]
    assert main(args) == 2, name
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert "Traceback" not in err


def test_shard_ranges_are_checked_before_they_are_built(bad, capsys):
    args = ["evaluate", str(bad["run"]), "--protocol", "full", "--max-users", "5"]
    from movierec.data.layout import select_shards
    from movierec.errors import DataError

    with pytest.raises(DataError, match="this dataset has shards 0-1"):
        select_shards(2, shards="0-10000000000")
    assert main(args) == 0
    capsys.readouterr()


def test_a_non_utf8_path_is_one_line(tmp_path, capsys):
    target = os.fsdecode(bytes(tmp_path) + b"/out-\xff")
    assert main(["prepare", "--dataset", "synthetic", "--out", target, "--num-shards", "1"]) in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2  # one line (or a note and nothing else)


def test_serve_that_cannot_bind_is_one_line(trained_run, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(trained_run.run_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", str(trained_run.run_dir), "--host", "no-such-host.invalid", "--port", "0"]) == 2
    assert "cannot listen on no-such-host.invalid" in capsys.readouterr().err


def test_a_utf16_json_body_is_422_as_documented(trained_run):
    from fastapi.testclient import TestClient

    from movierec.serving.http import create_app

    with TestClient(create_app(load_model_for_http(trained_run))) as client:
        body = '{"history": [13, 23], "k": 3}'
        for encoding in ("utf-16", "utf-32"):
            answer = client.post("/v1/recommendations", content=body.encode(encoding),
                                 headers={"content-type": "application/json"})  # fmt: skip
            assert answer.status_code == 422 and "not UTF-8" in answer.json()["detail"]
        ok = client.post(
            "/v1/recommendations", content=body.encode("utf-8"), headers={"content-type": "application/json"}
        )
        assert ok.status_code == 200


def load_model_for_http(trained_run):
    from movierec.serving.loader import load_model

    return load_model(trained_run.run_dir)
