"""The training benches run end to end on tiny data and print their tables (no speed or quality asserted):
bench/time_to_quality.py (two shipped ML-1M configs, shrunk by overrides, on synthetic data) and
bench/train_throughput.py (GFLOP/s beside the measured matmul peak and the products-only ceiling) and
bench/by_history_length.py (its buckets add up to `movierec evaluate`'s figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.max_len=20", "model.d_item=16", "train.batch_size=64", "eval.every_steps=2", "eval.ks=[10]",
        "eval.protocols=[sampled-uniform-100]", "tracking.log_model=false", "tracking.system_metrics=false",
        "train.epochs=3", "train.steps=null"]  # fmt: skip


def bench(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_time_to_quality_trains_both_configs_and_draws_the_curve(trained_run, tmp_path):
    out = bench("time_to_quality.py", "--data", str(trained_run.data_dir), "--out", str(tmp_path),
                "--thresholds", "0.0,2.0", "--set", *TINY)  # fmt: skip
    lines = out.splitlines()
    for model in ("sse-pt", "sasrec"):
        history = json.loads((tmp_path / model / "history.json").read_text())
        curve = [h for h in history if "curve_test_sampled-uniform-100/ndcg@10" in h]
        assert len(curve) >= 2 and all(0 <= h["curve_test_sampled-uniform-100/ndcg@10"] <= 1 for h in curve)
        assert [h["elapsed_s"] for h in history] == sorted(h["elapsed_s"] for h in history)
        assert any(line.split()[:2] == [model, "0.00"] and line.split()[2].isdigit() for line in lines)
        assert any(line.split()[:3] == [model, "2.00", "not"] for line in lines)
        assert any(line.startswith(f"{model}: 3 epochs in ") and "test NDCG@10 0." in line for line in lines)
    assert (tmp_path / "time_to_quality.png").stat().st_size > 10_000
    again = bench("time_to_quality.py", "--runs", f"sse-pt={tmp_path / 'sse-pt'}", "--out", str(tmp_path / "re"))
    assert "sse-pt: 3 epochs in " in again and (tmp_path / "re" / "time_to_quality.png").is_file()


def test_train_throughput_prints_gflops_the_matmul_peak_and_the_products_ceiling(trained_run):
    out = bench("train_throughput.py", "--data", str(trained_run.data_dir), "--steps", "2", "--precisions", "fp32",
                "--recipes", "sasrec (d 50)", "--set", "model.max_len=20")  # fmt: skip
    assert "fp32 matmul peak of this machine" in out
    row = next(line for line in out.splitlines() if line.startswith("sasrec (d 50)"))
    gflops, share, products_share = row.split()[-4:-1]
    assert float(gflops) > 0 and share.endswith("%") and products_share.endswith("%")
    assert float(products_share.rstrip("%")) > 0


def test_by_history_length_buckets_add_up_to_the_evaluate_figures(trained_run):
    from movierec.evaluation.evaluate import evaluate_checkpoint

    run = trained_run.run_dir
    out = bench("by_history_length.py", str(run / "best.ckpt"), str(run / "last.ckpt"), "--edges", "10,30")
    rows = {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("│")
            for cells in [[c.strip() for c in line.strip("│").split("│")]]}  # fmt: skip
    assert list(rows) == ["0–9", "10–29", "≥ 30", "all"]
    users = [int(rows[label][0].replace(",", "")) for label in rows]
    assert sum(users[:-1]) == users[-1] == 300
    expected = evaluate_checkpoint(run / "best.ckpt", protocols=("sampled-uniform-100", "full"), ks=(10,))
    sampled, full, *_, sampled_delta, full_delta = rows["all"][1:]
    assert sampled.split()[0] == f"{expected['sampled-uniform-100/ndcg@10']:.4f}"
    assert sampled.split()[-1] == f"{expected['sampled-uniform-100/hr@10']:.4f}"
    assert full.split()[0] == f"{expected['full/ndcg@10']:.4f}"
    assert sampled_delta.split()[1] == "±" and full_delta.split()[1] == "±"
