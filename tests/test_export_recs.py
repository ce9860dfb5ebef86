"""export-recs at scale: passes of bounded size kept as parts, a killed export resumes with the passes left
and ends with the rows of an uninterrupted one, subsets of users, and progress lines without a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from movierec.progress import Progress
from movierec.serving.loader import load_model


@pytest.fixture(scope="module")
def rec(trained_run):
    return load_model(trained_run.run_dir)


def test_a_killed_export_resumes_with_the_passes_left(rec, tmp_path, monkeypatch):
    whole = tmp_path / "whole.parquet"
    rows = rec.export_all(whole, k=5, pass_users=40)
    assert rows == pq.read_table(whole).num_rows and rows <= 5 * len(rec.known_users)
    real, calls = rec._top_k, []

    def killed_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process is stopped in its fourth pass
        return real(*args, **kwargs)

    resumed = tmp_path / "resumed.parquet"
    monkeypatch.setattr(rec, "_top_k", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        rec.export_all(resumed, k=5, pass_users=40)
    assert not resumed.exists() and len(list((tmp_path / "resumed.parquet.parts").glob("part-*.parquet"))) == 3
    calls.clear()
    monkeypatch.setattr(rec, "_top_k", real)
    counted = []
    monkeypatch.setattr(rec, "_top_k", lambda *a, **k: counted.append(1) or real(*a, **k))
    assert rec.export_all(resumed, k=5, pass_users=40) == rows
    passes = -(-len(rec.known_users) // 40)
    assert len(counted) == passes - 3, "only the passes left are computed"
    assert pq.read_table(resumed).equals(pq.read_table(whole))
    assert not (tmp_path / "resumed.parquet.parts").exists()
    assert pq.ParquetFile(resumed).num_row_groups == passes


def test_a_different_request_does_not_reuse_parts(rec, tmp_path):
    out = tmp_path / "recs.parquet"
    parts = tmp_path / "recs.parquet.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"k": 99}')
    (parts / "part-00000.parquet").write_text("stale")
    assert rec.export_all(out, k=3, pass_users=1000) == pq.read_table(out).num_rows


def test_subsets_of_users(rec, trained_run, tmp_path, capsys):
    from movierec.cli import main

    some = [str(u) for u in rec.known_user_ids[:3]]
    out = tmp_path / "some.parquet"
    assert (
        main(["export-recs", str(trained_run.run_dir), "--out", str(out), "--k", "2", "--users", ",".join(some)]) == 0
    )
    assert sorted(set(pq.read_table(out)["user_id"].to_pylist())) == sorted(int(u) for u in some)
    shard0 = tmp_path / "shard0.parquet"
    assert main(["export-recs", str(trained_run.run_dir), "--out", str(shard0), "--k", "2", "--shards", "0"]) == 0
    lo, hi = rec.shard_ranges[0]
    users = set(pq.read_table(shard0)["user_id"].to_pylist())
    assert users and users == {int(rec.user_ids[u - 1]) for u in rec.known_users if lo <= u < hi}
    assert main(["export-recs", str(trained_run.run_dir), "--out", str(shard0), "--users", "1"]) == 2
    assert "unknown users 1" in capsys.readouterr().err


def test_progress_lines_without_a_terminal(trained_run, tmp_path):
    stream = io.StringIO()
    with Progress("export-recs", 100, "users", stream=stream, every_s=0) as progress:
        for _ in range(4):
            progress.advance(25)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("export-recs: 25/100 users (25.0 %), ") and "users/s, about" in lines[0]
    assert lines[-1].startswith("export-recs: 100 users in ")
    done = subprocess.run(
        [sys.executable, "-m", "movierec", "export-recs", str(trained_run.run_dir), "--out",
         str(tmp_path / "r.parquet"), "--k", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MOVIEREC_PROGRESS_SECONDS": "0"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "export-recs: " in done.stderr and " users in " in done.stderr and "\x1b" not in done.stderr
