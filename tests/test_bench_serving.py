"""bench/serve_latency.py (recommendations and title search) and bench/export_recs.py run end to end on the
tiny trained run and print their tables with sane numbers (no times are asserted: the suite's machine is not a
quiet one); the search queries it types are the page's kind and find their titles; bench/titles.py's
catalogue has ML-20M's size and MovieLens's title shape."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
INDEXES = ["exact", "approximate"] if importlib.util.find_spec("faiss") else ["exact"]
sys.path.insert(0, str(REPO / "bench"))

import serve_latency  # noqa: E402  (bench/serve_latency.py)
import titles  # noqa: E402  (bench/titles.py)


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


def test_serve_latency_times_search_and_health_alone_and_every_typed_query_finds_a_movie(trained_run, tmp_path):
    out = tmp_path / "search.json"
    result = run_bench("serve_latency.py", str(trained_run.run_dir), "--endpoints", "search,health", "--clients",
                       "1,2", "--seconds", "1", "--warmup", "2", "--json", str(out))  # fmt: skip
    header = "| dataset | index | clients | requests | errors | requests/s | p50 ms | p99 ms | recall@10 |"
    rows = table_rows(result.stdout, header)
    assert [(r[1], r[2]) for r in rows] == [("search", "1"), ("search", "2"), ("health", "1"), ("health", "2")]
    for row in rows:
        # every answer was a 200 holding a match: the bench counts a search without one as an error
        assert "(150 items)" in row[0] and number(row[3]) > 0 and row[4] == "0" and number(row[5]) > 0
        assert 0 < number(row[6]) <= number(row[7]) and row[8] == ""
    assert "search: GET /v1/items?query=Q&limit=8" in result.stdout
    assert [s["index"] for s in json.loads(out.read_text())["servers"]] == ["exact"]


def test_typed_queries_are_lower_case_without_accents_and_find_their_titles(trained_run):
    from movierec.serving.search import TitleIndex

    served = serve_latency.model_titles(str(trained_run.run_dir), trained_run.tracking_uri)
    catalogue = [*served, "Amélie (2001)", "WALL·E (2008)", "Game, The (1997)"]
    index = TitleIndex(catalogue, [None] * len(catalogue), np.zeros(len(catalogue) + 1, dtype=np.int64))
    queries = serve_latency.typed_queries(catalogue, 2000, seed=0)
    assert queries == serve_latency.typed_queries(catalogue, 2000, seed=0), "seeded"
    assert all(query and query == query.lower() and query.isascii() for query in queries)
    assert all(len(index.search(query, 8)) for query in queries)
    typed = serve_latency.typed_queries(["Amélie (2001)"], 50, seed=0)  # as typed: without the accent
    assert all(any(word.startswith(part) for word in ("amelie", "2001")) for q in typed for part in q.split())
    assert any(query.startswith("ame") for query in typed)


def test_the_titles_catalogue_has_ml_20m_s_size_and_movielens_s_shape():
    table = titles.synthetic_titles()
    names, years = table["title"].to_pylist(), table["year"].to_numpy()
    assert len(table) == titles.ML20M_MOVIES == 27_278 and table["movie_id"].to_pylist()[-1] == 27_278
    assert years.min() >= 1900 and years.max() <= 2015
    assert all(name.endswith(f" ({year})") for name, year in zip(names, years, strict=True))
    assert 0.02 < np.mean([not name.isascii() for name in names]) < 0.2, "some accented titles"
    assert any(", The (" in name for name in names) and all(table["genres"].to_pylist())


def test_export_recs_is_timed_then_killed_and_resumed_to_the_same_rows(trained_run, tmp_path):
    out = tmp_path / "export.json"
    result = run_bench("export_recs.py", str(trained_run.run_dir), "--k", "5", "--json", str(out))
    header = (
        "| model | users | k | rows | wall s | export s | users/s (wall) | users/s (export) | catalogue screened per "
        "user | peak RSS MiB |"
    )
    (row,) = table_rows(result.stdout, header)
    users, rows = number(row[1]), number(row[3])
    assert users > 0 and 0 < rows <= 5 * users and row[2] == "5"
    assert all(number(row[i]) > 0 for i in (4, 6, 9)) and number(row[5]) >= 0
    assert row[8] == "—" or 0 < number(row[8].removesuffix(" %")) <= 100  # "—": no screen (a tiny catalogue)
    assert row[7] == "—" or number(row[7]) > 0  # a tiny export can finish under the 0.1 s export-recs prints
    assert "identical: yes" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["identical"] is True and saved["users"] == users and saved["parts_kept"] <= saved["passes"]
