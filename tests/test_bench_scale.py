"""bench/scale.py runs end to end in --tiny mode and prints its table (no times are asserted).

To cover another measurement once it is fast and stable enough for the suite, add its `--only` name and
the table rows it prints to `PARTS` below: each entry runs in its own parametrized test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "scale.py"
DATASETS = {  # --datasets name -> the label of its rows
    "file": "ml-20mx16x32 file 0",
    "quarter": "0.25 of ml-20mx16x32 file 0",
    "ml-20m": "ML-20M-sized ratings.csv",
}
PARTS = {  # --only name -> measurements (table column) each dataset gets
    "prepare": ["prepare"],
    # "first-step": ["first step (train --max-steps 2)"],
    # "throughput": ["training tokens/s"],
    # "eval": ["eval sampled-uniform-100 ms/user", "eval full ms/user"],
}


def table_rows(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| dataset | users | items | pairs in | measurement | result | peak RSS MiB |"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.parametrize("part", list(PARTS))
def test_tiny_run_prints_the_table(tmp_path, part):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--only", part, "--datasets", ",".join(DATASETS),
               "--cache", str(tmp_path / "cache"), "--json", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    head = result.stdout.lstrip().splitlines()
    assert head[0].startswith("machine: ") and "cores" in head[0], "machine and date on top"
    rows = table_rows(result.stdout)
    expected = [(label, m) for label in DATASETS.values() for m in PARTS[part]]
    assert [(r[0], r[4]) for r in rows] == expected
    for row in rows:
        assert row[1].replace(",", "").isdigit() and row[3].replace(",", "").isdigit(), row
        assert float(row[6].replace(",", "")) > 0, "peak RSS of the measured subprocess"
        assert "failed" not in row[5]
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(rows) and saved["machine"] in head[0]
