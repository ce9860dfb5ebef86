"""bench/serve_latency.py and bench/export_recs.py run end to end on the tiny trained run and print their
tables with sane numbers (no times are asserted: the suite's machine is not a quiet one)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INDEXES = ["exact", "approximate"] if importlib.util.find_spec("faiss") else ["exact"]


def table_rows(stdout: str, header: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == header, stdout
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "bench" / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("machine: ")
    return result


def test_serve_latency_prints_a_row_per_index_and_client_count(trained_run, tmp_path):
    out = tmp_path / "serve.json"
    result = run_bench("serve_latency.py", str(trained_run.run_dir), "--index", ",".join(INDEXES),
                       "--clients", "1,4", "--seconds", "1", "--warmup", "2", "--recall-users", "20",
                       "--json", str(out))  # fmt: skip
    header = "| dataset | index | clients | requests | errors | requests/s | p50 ms | p99 ms | recall@10 |"
    rows = table_rows(result.stdout, header)
    assert [(r[1], r[2]) for r in rows] == [(index, clients) for index in INDEXES for clients in ("1", "4")]
    for row in rows:
        assert "(150 items)" in row[0]
        assert number(row[3]) > 0 and row[4] == "0" and number(row[5]) > 0
        assert 0 < number(row[6]) <= number(row[7])
        if row[1] == "approximate":
            assert 0 <= number(row[8]) <= 1
        else:
            assert row[8] == ""
    saved = json.loads(out.read_text())
    assert [s["index"] for s in saved["servers"]] == INDEXES and all(s["peak_rss_mib"] > 0 for s in saved["servers"])
    assert len(saved["rows"]) == len(rows)


def test_export_recs_is_timed_then_killed_and_resumed_to_the_same_rows(trained_run, tmp_path):
    out = tmp_path / "export.json"
    result = run_bench("export_recs.py", str(trained_run.run_dir), "--k", "5", "--json", str(out))
    header = "| model | users | k | rows | wall s | export s | users/s (wall) | users/s (export) | peak RSS MiB |"
    (row,) = table_rows(result.stdout, header)
    users, rows = number(row[1]), number(row[3])
    assert users > 0 and 0 < rows <= 5 * users and row[2] == "5"
    assert all(number(row[i]) > 0 for i in (4, 6, 8)) and number(row[5]) >= 0
    assert row[7] == "—" or number(row[7]) > 0  # a tiny export can finish under the 0.1 s export-recs prints
    assert "identical: yes" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["identical"] is True and saved["users"] == users and saved["parts_kept"] <= saved["passes"]
