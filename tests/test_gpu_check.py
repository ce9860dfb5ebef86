"""bench/gpu_check.sh runs end to end in its reduced CPU mode and prints one table with every kind of row.

The CPU mode is what the GPU check becomes without CUDA: the same workers, torchrun and training runs on
tiny data (about two minutes on a busy 2-core machine). No time or quality is asserted, only the plumbing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = {  # check -> rows it prints in CPU mode
    "train-throughput": 4,  # 2 recipes x fp32, bf16
    "mlperf-throughput": 2,  # fp32, bf16
    "batch-size-auto": 1,
    "torchrun-scaling": 2,  # 1 process, torchrun with 2
    "time-to-quality": 1,
}
HEADER = "| check | data | case | precision | tokens/s | s/pass | peak MiB | status | detail |"


def test_cpu_mode_prints_every_row_and_exits_0(tmp_path):
    out, rows_file = tmp_path / "work", tmp_path / "rows.json"
    command = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out), "--json", str(rows_file)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]

    head = done.stdout.lstrip().splitlines()
    assert head[0].startswith("machine: ") and "cores" in head[0], "machine on top"
    assert head[1].startswith("torch "), "torch version and date on top"
    assert any(line.startswith("mode: CPU") for line in head[:4])

    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == HEADER
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]
    kinds = [row[0] for row in table]
    assert {kind: kinds.count(kind) for kind in CHECKS} == CHECKS
    assert all(row[7] == "ok" for row in table), table
    for row in table:
        if row[0] not in ("time-to-quality", "batch-size-auto"):
            assert float(row[4].replace(",", "")) > 0, row  # tokens/s
    auto = next(row for row in table if row[0] == "batch-size-auto")
    assert auto[8].startswith("chose ") and "fits (peak" in auto[8], auto
    quality = next(row for row in table if row[0] == "time-to-quality")
    assert "test NDCG@10" in quality[8] and "2 epochs" in quality[8], quality
    scaling = [row for row in table if row[0] == "torchrun-scaling"]
    assert "scaling" in scaling[1][8], scaling

    saved = json.loads(rows_file.read_text())
    assert saved["mode"].startswith("mode: CPU") and len(saved["rows"]) == sum(CHECKS.values())
    assert (out / "logs").is_dir(), "child outputs are kept"
