"""The audit's bad inputs and faults, as one table: each is exit status 2 and one line on stderr, never a
traceback, and nothing is left half-written. Then the behaviours behind them: the run-folder lock, a full
disk during a checkpoint, left-over temporary files, SASRec text files with titles."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from data_builders import make_zip, ratings, release_members

from movierec.cli import main
from movierec.data.split import Interactions, write_dataset
from movierec.errors import CheckpointError
from movierec.files import FolderLock, atomic_path
from movierec.models.checkpoint import Checkpoint, DatasetIdentity, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def can_mount() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def mounted(tmp_path_factory):
    """`mounted(options)`: a fresh tmpfs (e.g. "size=64k" for a disk that fills, "ro" for a read-only one)."""
    mounts: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path_factory.mktemp("mnt")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def damaged(trained_run, tmp_path_factory) -> dict[str, Path]:
    """Broken inputs built once: checkpoints, datasets, archives."""
    root = tmp_path_factory.mktemp("damaged")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    state = load_checkpoint(trained_run.run_dir / "best.ckpt")
    table = state.model["item_emb.weight"]
    state.model["item_emb.weight"] = torch.cat([table, table[:5]])
    save_checkpoint(root / "wrong-size.ckpt", state)

    edited = root / "edited"
    shutil.copytree(trained_run.data_dir, edited)
    meta = json.loads((edited / "meta.json").read_text())
    (edited / "meta.json").write_text(json.dumps({**meta, "num_users": meta["num_users"] - 40}))

    rows = ratings(num_users=20, per_user=6, num_items=10)
    one_shard = write_dataset(
        Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3]), root, "one-shard", source={},
        num_shards=1, min_user_interactions=0, min_item_interactions=0,
    )  # fmt: skip

    archive = bytearray(make_zip(release_members("ml-1m", ratings(num_users=30, per_user=10, num_items=20), 20)))
    with zipfile.ZipFile(io.BytesIO(bytes(archive))) as zf:
        info = zf.getinfo("ml-1m/ratings.dat")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    archive[start + info.compress_size // 2] ^= 0xFF
    (root / "bad-crc.zip").write_bytes(bytes(archive))

    sasrec = root / "sasrec"
    sasrec.mkdir()
    (sasrec / "data.txt").write_text("".join(f"{u} {i}\n" for u in range(1, 6) for i in range(1, 5)))
    (sasrec / "movies").mkdir()
    (sasrec / "movies" / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    return {
        "root": root, "run": trained_run.run_dir, "data": trained_run.data_dir, "edited": edited,
        "one_shard": one_shard, "sasrec": sasrec,
    }  # fmt: skip


TRAIN = ["train", "--config", str(REPO / "configs" / "synthetic.yaml"), "tracking.system_metrics=false"]

# (id, argv with {placeholders}, expected fragment of the one error line)
CASES: list[tuple[str, list[str], str]] = [
    ("empty-ckpt-recommend", ["recommend", "{root}/empty.ckpt", "--user", "1007"], "not a movierec checkpoint"),
    ("empty-ckpt-evaluate", ["evaluate", "{root}/empty.ckpt"], "not a movierec checkpoint"),
    ("random-ckpt-export", ["export", "{root}/random.ckpt", "--out", "{tmp}/m.onnx"], "not a movierec checkpoint"),
    ("random-ckpt-train-resume", ["train", "--resume", "{root}/random.ckpt"], "not a movierec checkpoint"),
    ("random-ckpt-init-from", [*TRAIN, "--data", "{data}", "--run-dir", "{tmp}/r", "--init-from",
                               "{root}/random.ckpt", "--tracking-uri", "sqlite:///{tmp}/m.db"],
     "is not a readable movierec checkpoint or PyTorch state dict"),
    ("wrong-rows-recommend", ["recommend", "{root}/wrong-size.ckpt", "--user", "1007"],
     "its weights do not fit its model config (item_emb.weight: (156, 16), the config builds (151, 16))"),
    ("wrong-rows-evaluate", ["evaluate", "{root}/wrong-size.ckpt"],
     "item_emb.weight: (156, 16), the config builds (151, 16)"),
    ("wrong-rows-export", ["export", "{root}/wrong-size.ckpt", "--out", "{tmp}/m.onnx"],
     "item_emb.weight: (156, 16), the config builds (151, 16)"),
    ("edited-meta-info", ["info", "{edited}"], "meta.json is inconsistent: shard 1 covers users"),
    ("edited-meta-train", [*TRAIN, "--data", "{edited}", "--run-dir", "{tmp}/r", "--tracking-uri",
                           "sqlite:///{tmp}/m.db"], "meta.json is inconsistent"),
    ("edited-meta-recommend", ["recommend", "{run}", "--user", "1007", "--data", "{edited}"],
     "is not the dataset this model was trained on (its meta.json differs: "),
    ("edited-meta-evaluate", ["evaluate", "{run}", "--data", "{edited}"], "meta.json is inconsistent"),
    ("other-dataset-evaluate", ["evaluate", "{run}", "--data", "{one_shard}"],
     "is not the dataset this model was trained on (its meta.json differs: 20 users x 10 items, 1 shard(s))"),
    ("epochs-0", [*TRAIN, "--data", "{data}", "--epochs", "0", "--run-dir", "{tmp}/r"],
     "train.epochs (--epochs) must be in [1, 1e+06] (or null: the run's length is train.steps), got 0"),
    ("bad-crc-no-verify", ["prepare", "--dataset", "ml-1m", "--archive", "{root}/bad-crc.zip", "--no-verify",
                           "--out", "{tmp}"], "ratings.dat is corrupt (Bad CRC-32"),
    ("sasrec-text-no-name", ["prepare", "--dataset", "sasrec-text", "--input", "{sasrec}/data.txt", "--out",
                             "{tmp}"], "sasrec-text needs --name NAME"),
    ("sasrec-titles-without-map", ["prepare", "--dataset", "sasrec-text", "--name", "x", "--input",
                                   "{sasrec}/data.txt", "--titles", "{sasrec}/movies", "--out", "{tmp}"],
     "--titles needs"),
    ("sasrec-titles-missing", ["prepare", "--dataset", "ml-1m-sasrec", "--input", "{sasrec}/data.txt",
                               "--titles", "{tmp}/nowhere", "--out", "{tmp}"], "--titles {tmp}/nowhere does not exist"),
    ("name-for-a-release", ["prepare", "--dataset", "synthetic", "--name", "x", "--out", "{tmp}"],
     "--name does not apply to"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(damaged, tmp_path, capsys, argv, message):
    values = {**{k: str(v) for k, v in damaged.items()}, "tmp": str(tmp_path)}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main([arg.format(**values) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"movierec {argv[0]}: error: "), err
    assert message.format(**values) in err
    # nothing half-written: no new file in the output folder, except an empty run folder's lock
    after = [p for p in sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) if p not in before]
    assert all(p.name in ("r", ".lock") or p.suffix == ".db" for p in after), after


def test_the_table_runs_in_a_real_process_without_traceback(damaged):
    """One case through the console script: the exit status reaches the shell and stderr has no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "movierec", "recommend", str(damaged["root"] / "wrong-size.ckpt"), "--user", "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


# --------------------------------------------------------------------------- disks that are full or read-only


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a small tmpfs")
@pytest.mark.parametrize("options", ["size=64k", "ro,size=64k"], ids=["full", "read-only"])
def test_full_or_read_only_outputs(damaged, mounted, capsys, options):
    out = mounted(options)
    if "ro" not in options.split(","):
        filler = os.open(out / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to the last block
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(filler, b"x" * 4096)
        os.close(filler)
    commands = [
        ["prepare", "--dataset", "synthetic", "--out", f"{out}/data"],
        [*TRAIN, "--data", str(damaged["data"]), "--run-dir", f"{out}/run", "--epochs", "1",
         "--tracking-uri", f"sqlite:///{damaged['root']}/m.db", "tracking.log_model=false", "model.max_len=20"],
        ["export", str(damaged["run"]), "--out", f"{out}/model.onnx"],
        ["export", str(damaged["run"]), "--out", f"{out}/model.pt", "--format", "torchscript"],
        ["export-recs", str(damaged["run"]), "--out", f"{out}/recs.parquet"],
        ["evaluate", str(damaged["run"]), "--protocol", "full", "--json", f"{out}/metrics.json"],
    ]  # fmt: skip
    for argv in commands:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith(f"movierec {argv[0]}: error: "), err
        assert "No space left on device" in err or "Read-only file system" in err, err
        # never a half-written file under any name (a run folder keeps its lock and its complete config)
        leftovers = [p for p in out.rglob("*") if p.is_file() and p.name not in (".lock", "config.yaml", "filler")]
        assert not [p for p in leftovers if p.stat().st_size], (argv, leftovers)
        for config in out.rglob("config.yaml"):
            assert yaml.safe_load(config.read_text())["train"]["epochs"] == 1


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from movierec.files import GuardedWriter

    class FillingFile:
        """A file on a disk that fills up after 1,000 bytes."""

        def __init__(self, real):
            self.real, self.written = real, 0

        def write(self, data):
            if self.written > 1000:
                raise OSError(28, "No space left on device")
            self.written += len(memoryview(data))
            return self.real.write(data)

        def flush(self):
            self.real.flush()

        def close(self):
            self.real.close()

    real_init = GuardedWriter.__init__

    def on_a_full_disk(self, path):
        real_init(self, path)
        self._file = FillingFile(self._file)

    path = tmp_path / "last.ckpt"
    save_checkpoint(path, Checkpoint({"w": torch.ones(3)}, {"kind": "sse-pt"}, {}, DatasetIdentity()))
    monkeypatch.setattr(GuardedWriter, "__init__", on_a_full_disk)
    big = Checkpoint({"w": torch.zeros(100_000)}, {"kind": "sse-pt"}, {}, DatasetIdentity())
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*No space left on device .*intact"):
        save_checkpoint(path, big)
    assert torch.equal(load_checkpoint(path).model["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# --------------------------------------------------------------------------- run folders and temporary files


def test_a_run_folder_in_use_is_refused_at_once(damaged, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*TRAIN, "--data", str(damaged["data"]), "--run-dir", str(run_dir), "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db"]  # fmt: skip
    with FolderLock(run_dir, "train"):
        started = time.perf_counter()
        assert main(argv) == 2
        assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert f"{run_dir} is in use by a running `movierec train` (pid {os.getpid()} on " in err
    assert not (run_dir / "config.yaml").exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from movierec.files import FolderLock; "
         f"lock = FolderLock({str(tmp_path)!r}, 'train').__enter__(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match="is in use"), FolderLock(tmp_path, "train"):
        pass
    holder.kill()
    holder.wait()
    with FolderLock(tmp_path, "train"):
        assert f"pid {os.getpid()} on" in (tmp_path / ".lock").read_text()


def test_left_over_temporary_files_are_removed_by_the_next_write(tmp_path):
    import socket

    host = socket.gethostname().split(".")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".recs.parquet.{host}-{dead.stdout.strip()}.abcd.tmp"
    live = tmp_path / f".recs.parquet.{host}-{os.getpid()}.efgh.tmp"
    legacy = tmp_path / ".recs.parquet.x1y2z3.tmp"  # the naming before the owner was recorded
    for path in (killed, live, legacy):
        path.write_bytes(b"partial")
    os.utime(legacy, (time.time() - 3 * 86400,) * 2)
    with atomic_path(tmp_path / "recs.parquet") as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "recs.parquet"])


# --------------------------------------------------------------------------- SASRec text files


def test_sasrec_text_with_a_name_and_movies_csv_titles(damaged, tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(damaged["sasrec"], folder)
    (folder / "sas_to_original_items.txt").write_text("1 1\n2 2\n3 3\n4 4\n")
    (folder / "movies" / "movies.csv").write_text(
        "movieId,title,genres\n1,Toy Story (1995),Animation\n2,Jumanji (1995),Adventure\n3,Heat (1995),Action\n"
    )
    argv = ["prepare", "--dataset", "sasrec-text", "--name", "my-data", "--input", str(folder / "data.txt"),
            "--titles", str(folder / "movies"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "no title for 25.0% of the movies" in err
    items = pq.read_table(tmp_path / "out" / "my-data" / "items.parquet").to_pydict()
    assert items["title"][:3] == ["Toy Story (1995)", "Jumanji (1995)", "Heat (1995)"]

    (folder / "movies" / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    assert main([*argv, "--overwrite"]) == 2
    assert "has titles for only 25% of the dataset's movies" in capsys.readouterr().err


def test_recommend_history_counts_the_movies_it_used(trained_run, capsys):
    from movierec.serving.loader import load_model

    known = [int(m) for m in load_model(trained_run.run_dir).item_movie_ids[:9]]
    history = ",".join(map(str, [*known, 999_999, 888_888]))
    assert main(["recommend", str(trained_run.run_dir), "--history", history]) == 0
    captured = capsys.readouterr()
    assert "for a history of 9 movies, 2 unknown id(s) ignored" in " ".join(captured.out.split())
