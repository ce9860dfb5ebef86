"""The seed pipeline's "organised" ml-20mx16x32 folder (training/, validation/test_K.npz, evaluation/test_K.npz),
read as it lies: the same result as MLPerf's own folder, --fraction over the whole set, and the by-file holdout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_builders import MLPERF_FILES as FILES
from data_builders import write_mlperf_files as write_files

from movierec.cli import main
from movierec.data.layout import load_sequences, read_meta
from movierec.data.mlperf import prepare_mlperf
from movierec.data.mlperf_synthetic import MlperfShape, generate_mlperf_files, organise
from movierec.errors import ConfigError, DataError
from movierec.models.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def shard_checksums(path: Path) -> list[str]:
    return [f["sha256"] for shard in read_meta(path)["shards"] for f in shard["files"].values()]


def test_organised_folder_gives_what_the_raw_folder_gives(tmp_path):
    raw = write_files(tmp_path / "raw")
    organised = organise(raw, tmp_path / "organised", train_files=range(3), files=3)
    assert sorted(p.name for p in (organised / "validation").iterdir()) == ["test_0.npz"]
    assert sorted(p.name for p in (organised / "evaluation").iterdir()) == ["test_1.npz", "test_2.npz"]
    from_raw = prepare_mlperf(raw, tmp_path / "a")
    from_organised = prepare_mlperf(organised, tmp_path / "b")
    assert shard_checksums(from_raw) == shard_checksums(from_organised), "leave-one-out: byte-identical shards"
    meta = read_meta(from_organised)
    assert meta["options"]["layout"] == "organised" and meta["options"]["holdout"] == "leave-one-out"


def test_only_some_training_files_and_fraction_over_the_whole_set(tmp_path, capsys):
    shape = MlperfShape(users=16 * 6, items=400, train_pairs=16 * 6 * 12)
    generate_mlperf_files(tmp_path / "raw", shape)
    organised = organise(tmp_path / "raw", tmp_path / "organised", train_files=[0, 1])  # 1/10 of 16 files
    everything = prepare_mlperf(organised, tmp_path / "all")
    assert read_meta(everything)["options"]["input_shards"] == [0, 1], "the training files present"
    assert "14 test files of unchosen files are not used" in capsys.readouterr().err
    tenth_raw = prepare_mlperf(tmp_path / "raw", tmp_path / "r", fraction=0.1)
    tenth_organised = prepare_mlperf(organised, tmp_path / "o", fraction=0.1)
    assert read_meta(tenth_organised)["options"]["input_shards"] == [0, 1] == read_meta(tenth_raw)["options"][
        "input_shards"], "--fraction counts the whole set's 16 files, not the ones present"  # fmt: skip
    assert shard_checksums(tenth_raw) == shard_checksums(tenth_organised)
    with pytest.raises(DataError, match=r"lacks trainx16x32_2\.npz .*test_2\.npz is there without it"):
        prepare_mlperf(organised, tmp_path / "x", fraction=0.15)
    assert not (tmp_path / "x" / "ml-20mx16x32").exists()


def test_by_file_holdout(tmp_path):
    organised = organise(write_files(tmp_path / "raw"), tmp_path / "organised", train_files=range(3), files=3)
    path = prepare_mlperf(organised, tmp_path / "out", holdout="by-file")
    data = load_sequences(path)
    meta = read_meta(path)
    assert meta["options"]["holdout"] == "by-file"
    assert meta["split_counts"] == {"training": 23, "validation": 4, "evaluation": 5}
    for k, block in enumerate(FILES):
        for mlperf_user, (items, test) in block.items():
            user = mlperf_user + 1
            assert data.train_sequence(user).tolist() == [i + 1 for i in items], "every training pair trains"
            held_out = (data.valid_item[user], data.test_item[user])
            assert held_out == ((test + 1, 0) if k == 0 else (0, test + 1)), f"file {k}: its folder's split"
    with pytest.raises(DataError, match="give no evaluation users"):
        prepare_mlperf(organised, tmp_path / "only-validation", holdout="by-file", shards="0")
    with pytest.raises(ConfigError, match="is not an organised folder"):
        prepare_mlperf(tmp_path / "raw", tmp_path / "raw-by-file", holdout="by-file")


def test_bad_folders_are_one_line_and_leave_nothing(tmp_path, capsys):
    raw = write_files(tmp_path / "raw")
    organised = organise(raw, tmp_path / "organised", train_files=[], files=3)
    (organised / "training").mkdir(exist_ok=True)
    tests_only = tmp_path / "tests-only"
    tests_only.mkdir()
    (tests_only / "testx16x32_0.npz").write_bytes((raw / "testx16x32_0.npz").read_bytes())
    partial = organise(raw, tmp_path / "partial", train_files=[0], files=3)
    out = tmp_path / "out"
    cases = [
        (["--input", str(organised)], "training holds no trainx16x32_K.npz files (3 test files alone"),
        (["--input", str(tests_only)], "holds test files only"),
        (["--input", str(partial), "--shards", "1"], "lacks trainx16x32_1.npz"),
        (["--input", str(raw), "--holdout", "by-file"], "is not an organised folder"),
    ]
    for extra, message in cases:
        assert main(["prepare", "--dataset", "ml-20mx16x32", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir()), "nothing half-written"
    with pytest.raises(ConfigError, match="--holdout does not apply to synthetic"):
        from movierec.data.prepare import prepare

        prepare("synthetic", tmp_path / "s", holdout="by-file")


def test_organised_tenth_prepares_and_trains(tmp_path, capsys):
    """The seed pipeline's folder as it is: 1/10 of the training files, every test file; prepare with --fraction
    0.1 and train a few steps with the shipped ml-20mx16x32 config."""
    shape = MlperfShape(users=16 * 30, items=50_000, train_pairs=16 * 30 * 40)
    generate_mlperf_files(tmp_path / "raw", shape)
    organised = organise(tmp_path / "raw", tmp_path / "organised", train_files=[0, 1])
    args = ["prepare", "--dataset", "ml-20mx16x32", "--input", str(organised), "--out", str(tmp_path / "data")]
    assert main([*args, "--fraction", "0.1"]) == 0
    data = tmp_path / "data" / "ml-20mx16x32"
    assert read_meta(data)["num_users"] == 60
    train = [
        "train", "--config", str(REPO / "configs" / "ml-20mx16x32-sse-pt.yaml"), "--data", str(data),
        "--run-dir", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--max-steps", "3", "model.max_len=16", "model.d_item=8", "model.d_user=8", "train.batch_size=16",
        "eval.max_users=20", "tracking.log_model=false", "tracking.system_metrics=false",
    ]  # fmt: skip
    assert main(train) == 0
    state = load_checkpoint(tmp_path / "run")
    assert state.train_state.step == 3 and state.finished
    assert np.isfinite(state.test_metrics["test_full/ndcg@10"])
