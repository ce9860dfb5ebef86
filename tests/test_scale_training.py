"""Training at ml-20mx16x32's shape, made tiny: the real 855,776-item catalog, a few hundred users."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from movierec.cli import main
from movierec.data.layout import load_sequences
from movierec.data.mlperf import prepare_mlperf
from movierec.data.mlperf_synthetic import MlperfShape, generate_mlperf_files
from movierec.models.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_two_steps_on_an_ml_20mx16x32_shaped_file_with_a_large_catalog(tmp_path, capsys):
    shape = MlperfShape(users=16 * 40, items=120_000, train_pairs=16 * 40 * 60)  # file 0: 40 users, ~2,400 pairs
    generate_mlperf_files(tmp_path / "raw", shape, files=[0, 1])
    data = prepare_mlperf(tmp_path / "raw", tmp_path / "prepared", shard_pairs=800)
    sequences = load_sequences(data)
    assert sequences.num_items >= 100_000 and len(sequences.shard_indices) > 1
    assert all(isinstance(part, np.memmap) for part in sequences.train_items.parts), "shards are read in place"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train", "--config", str(REPO / "configs" / "ml-20mx16x32-sse-pt.yaml"), "--data", str(data),
        "--run-dir", str(tmp_path / "run"), "--tracking-uri", uri, "--max-steps", "2",
        "model.max_len=20", "model.d_item=16", "model.d_user=8", "train.batch_size=16", "eval.max_users=25",
        "tracking.log_model=false", "tracking.system_metrics=false",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "first optimizer step after" in out and "optimizer sparse-adam" in out
    state = load_checkpoint(tmp_path / "run")
    assert state.train_state.step == 2 and state.finished
    assert state.model["item_emb.weight"].shape[0] == sequences.num_items + 1
    run = MlflowClient(uri).get_run(state.mlflow_run_id)
    assert run.data.params["train.optimizer_resolved"] == "sparse-adam"
    assert run.data.params["eval.validated_users"] == "25"
    assert 0 <= run.data.metrics["test_full/ndcg_at_10"] <= 1
    # evaluate and recommend work on the large catalog (chunked scoring) from the same run
    metrics = tmp_path / "metrics.json"
    evaluate = ["evaluate", str(tmp_path / "run"), "--max-users", "10", "--protocol", "full", "--json", str(metrics)]
    assert main(evaluate) == 0
    assert json.loads(metrics.read_text())["users"] == 10
    user = int(sequences.users[0]) - 1  # MLPerf user ids start at 0, ours at 1
    assert main(["recommend", str(tmp_path / "run"), "--user", str(user), "--k", "5"]) == 0
