"""`movierec recommend` / `export-recs` and the Recommender behind them, on the tiny `trained_run` model."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from serving_docs import documented_commands, quickstart_layout

from movierec.cli import main
from movierec.data.layout import load_sequences
from movierec.data.sequences import UserHistories
from movierec.models.base import ModelConfig
from movierec.models.checkpoint import load_checkpoint, save_checkpoint
from movierec.models.sse_pt import SSEPT
from movierec.serving.loader import load_model
from movierec.serving.recommender import Recommender, RecommendError, UnknownUserError


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def rec(trained_run) -> Recommender:
    return load_model(trained_run.run_dir)


@pytest.fixture(scope="module")
def some_users(rec) -> list[int]:
    return rec.known_user_ids[[0, 7, -1]].tolist()


def reference_scores(rec: Recommender, items: list[int], user: int | None) -> np.ndarray:
    """Scores over our item ids 1..n (index 0 = item 1) for one history, straight from the model."""
    model = rec.model
    seq = torch.tensor([items[-model.config.max_len :]])
    with torch.inference_mode():
        if model.user_emb is None:
            user_vecs = None
        elif user is None:
            known = torch.from_numpy(rec.known_users)
            user_vecs = model.user_emb.weight[known].mean(0, keepdim=True) * math.sqrt(model.config.d_user)
        else:
            user_vecs = model.user_vectors(torch.tensor([user]))
        hidden = model(seq, user_vecs)[:, -1]
        scores = hidden[:, : model.config.d_item] @ model.item_emb.weight[1:].t()
        if user_vecs is not None:
            scores = scores + (hidden[:, model.config.d_item :] * user_vecs).sum(-1, keepdim=True)
        return scores[0].numpy()


def our_items(rec: Recommender, movie_ids: list[int]) -> list[int]:
    lookup = {int(m): i + 1 for i, m in enumerate(rec.item_movie_ids)}
    return [lookup[m] for m in movie_ids]


def expected_top(rec: Recommender, scores: np.ndarray, exclude: list[int], k: int) -> list[int]:
    scores = scores.copy()
    scores[np.asarray(exclude, dtype=np.int64) - 1] = -np.inf
    return [int(rec.item_movie_ids[i]) for i in np.argsort(-scores, kind="stable")[:k]]


# --------------------------------------------------------------------------- known users


def test_recommend_user_excludes_seen_and_matches_the_model(trained_run, rec, some_users, capsys):
    user = some_users[1]
    code, out, err = run(capsys, "recommend", trained_run.run_dir, "--user", user, "--k", 7, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["userId"] == user
    recs = result["recommendations"]
    assert [r["rank"] for r in recs] == list(range(1, 8))
    history = rec.history_of(user)
    assert len(history) >= 3 and not {r["movieId"] for r in recs} & set(history)
    assert all(r["movieId"] % 10 == 3 for r in recs)  # original movieIds, not our indices
    assert all(re.fullmatch(rf"Synthetic movie {(r['movieId'] - 3) // 10} \(\d{{4}}\)", r["title"]) for r in recs)
    scores = [r["score"] for r in recs]
    assert scores == sorted(scores, reverse=True)

    u = rec.user_index(user)
    items = our_items(rec, history)
    reference = reference_scores(rec, items, u)
    assert [r["movieId"] for r in recs] == expected_top(rec, reference, items, 7)
    unseen = np.delete(reference, np.asarray(items) - 1)
    np.testing.assert_allclose(scores, np.sort(unseen)[::-1][:7], rtol=1e-5, atol=1e-5)

    code, out, _ = run(capsys, "recommend", trained_run.run_dir, "--user", user, "--k", 7, "--json", "--include-seen")
    assert code == 0
    assert [r["movieId"] for r in json.loads(out)["recommendations"]] == expected_top(rec, reference, [], 7)


def test_recommend_user_prints_a_table(trained_run, rec, some_users, capsys):
    code, out, _ = run(capsys, "recommend", trained_run.run_dir, "--user", some_users[0], "--k", 3)
    assert code == 0
    for header in ("rank", "movieId", "title", "score"):
        assert header in out
    for r in rec.recommend_user(some_users[0], 3):
        assert str(r.movie_id) in out and r.title in out and f"{r.score:.4f}" in out


def test_recommend_users_batched_equals_one_by_one(rec, some_users):
    together = rec.recommend_users(some_users, k=5)
    for user in some_users:
        alone = rec.recommend_user(user, 5)
        assert [r.movie_id for r in together[user]] == [r.movie_id for r in alone]
        np.testing.assert_allclose([r.score for r in together[user]], [r.score for r in alone], rtol=1e-5, atol=1e-6)
    with pytest.raises(UnknownUserError, match="unknown users 1, 2"):
        rec.recommend_users([some_users[0], 1, 2], k=5)


# --------------------------------------------------------------------------- a new person's history


def test_recommend_history_uses_the_mean_user_vector(trained_run, rec, capsys):
    watched = [int(m) for m in rec.item_movie_ids[[4, 10, 2, 30]]]
    argv = ["recommend", trained_run.run_dir, "--history", ",".join(map(str, [watched[0], 999, *watched[1:], 8]))]
    code, out, err = run(capsys, *argv, "--k", 5, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["unknownMovieIds"] == [999, 8]
    recs = [r["movieId"] for r in result["recommendations"]]
    reference = reference_scores(rec, our_items(rec, watched), None)
    assert recs == expected_top(rec, reference, our_items(rec, watched), 5)
    assert not set(recs) & set(watched)

    code, out, err = run(capsys, *argv, "--k", 5)  # the table, with the unknown ids reported on stderr
    assert code == 0 and "ignored 2 unknown movieId(s): 999, 8" in err
    assert str(recs[0]) in out


def test_sasrec_needs_no_user_vector(rec):
    config = ModelConfig(num_users=3, num_items=rec.num_items, kind="sasrec", max_len=8, d_item=16)
    torch.manual_seed(0)
    model = SSEPT(config).eval()
    offsets, items = np.array([0, 0, 2, 2, 5]), np.array([1, 2, 3, 4, 5])
    sasrec = Recommender(model, rec.item_movie_ids, [11, 22, 33], rec.titles, UserHistories(offsets, items))
    assert model.new_user_vector() is None and sasrec.has_user(11) and not sasrec.has_user(22)
    # without a user embedding, a known user's recommendations are those of the same history
    by_user = sasrec.recommend_user(11, 4)
    by_history = sasrec.recommend_history(rec.item_movie_ids[[0, 1]].tolist(), 4).recommendations
    assert by_user == by_history
    watched = rec.item_movie_ids[[2, 3, 4]].tolist()
    top = sasrec.recommend_history(watched, 3).recommendations
    assert len(top) == 3 and not {r.movie_id for r in top} & set(watched)
    # the catalog scored a few items at a time gives the same top-k as in one piece
    chunked = Recommender(model, rec.item_movie_ids, [11, 22, 33], rec.titles, UserHistories(offsets, items),
                          item_chunk=7)  # fmt: skip
    pairs = [
        (chunked.recommend_user(11, 20), sasrec.recommend_user(11, 20)),
        (chunked.recommend_history(watched, 30).recommendations, sasrec.recommend_history(watched, 30).recommendations),
    ]
    for got, expected in pairs:
        assert [r.movie_id for r in got] == [r.movie_id for r in expected]
        assert [r.score for r in got] == pytest.approx([r.score for r in expected], rel=1e-5)


# --------------------------------------------------------------------------- bad input: one line, exit 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--user", "1"], "unknown user 1: not a user of the data this model was trained on"),
        (["--user", "{user}", "--k", "0"], "k must be an integer from 1 to 150"),
        (["--user", "{user}", "--k", "-3"], "k must be an integer from 1 to 150"),
        (["--user", "{user}", "--k", "151"], "k must be an integer from 1 to 150"),
        (["--history", ""], "the history is empty"),
        (["--history", ",,"], "the history is empty"),
        (["--history", "1,2,999999"], "none of the history's movieIds is known to this model (1, 2, 999999)"),
        (["--history", "13,abc"], "--history '13,abc': expected movieIds separated by commas"),
        (["--history", "13", "--k", "0"], "k must be an integer from 1 to 150"),
        (["--user", "{user}", "--threads", "0"], "--threads must be positive"),
    ],
)
def test_bad_recommend_input_is_one_line(trained_run, some_users, capsys, extra, message):
    argv = [a.format(user=some_users[0]) for a in extra]
    code, out, err = run(capsys, "recommend", trained_run.run_dir, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_user_and_history_are_exclusive(trained_run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["recommend", str(trained_run.run_dir), "--user", "1007", "--history", "13"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_missing_dataset_files_are_one_line(trained_run, some_users, tmp_path, capsys):
    state = load_checkpoint(trained_run.run_dir, prefer="best.ckpt")
    moved = tmp_path / "moved.ckpt"
    save_checkpoint(moved, replace(state, dataset=replace(state.dataset, path=str(tmp_path / "gone" / "synthetic"))))
    code, _, err = run(capsys, "recommend", moved, "--user", some_users[0])
    assert code == 2 and err.count("\n") == 1
    assert f"the model's dataset {tmp_path / 'gone' / 'synthetic'} is missing" in err and "pass --data" in err

    # --data fixes it
    code, out, _ = run(capsys, "recommend", moved, "--user", some_users[0], "--data", trained_run.data_dir, "--json")
    assert code == 0 and len(json.loads(out)["recommendations"]) == 10

    # a dataset folder with a shard missing
    broken = tmp_path / "broken"
    shutil.copytree(trained_run.data_dir, broken)
    next((broken / "training").glob("part-*.npz")).unlink()
    code, _, err = run(capsys, "recommend", moved, "--user", some_users[0], "--data", broken)
    assert code == 2 and err.count("\n") == 1 and "is missing" in err and "pass --data" in err

    # another dataset than the one the model was trained on
    other = tmp_path / "other"
    shutil.copytree(trained_run.data_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "name": "other"}))
    code, _, err = run(capsys, "recommend", moved, "--user", some_users[0], "--data", other)
    assert code == 2 and "is not the dataset this model was trained on" in err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{tmp}/nothing.ckpt", "checkpoint {tmp}/nothing.ckpt does not exist"),
        ("{tmp}", "is a folder without last.ckpt or best.ckpt"),
        ("runs:/0123456789abcdef", "cannot load runs:/0123456789abcdef from MLflow"),
        ("models:/no-such-model/1", "cannot load models:/no-such-model/1 from MLflow"),
        ("models:/no-version", "expected models:/<name>/<version>"),
        ("s3://bucket/x.ckpt", "MODEL is a checkpoint file, a run folder"),
    ],
)
def test_bad_model_references_are_one_line(trained_run, tmp_path, capsys, model, message):
    argv = ["recommend", model.format(tmp=tmp_path), "--user", "1007", "--tracking-uri", trained_run.tracking_uri]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and message.format(tmp=tmp_path) in err


def test_an_mlflow_store_that_does_not_exist_is_not_created(tmp_path, capsys):
    code, _, err = run(capsys, "recommend", "runs:/abc", "--user", "1", "--tracking-uri", f"sqlite:///{tmp_path}/x.db")
    assert code == 2 and "no MLflow store at" in err and not (tmp_path / "x.db").exists()


# --------------------------------------------------------------------------- MLflow references


def test_load_by_runs_uri_and_models_uri(trained_run, rec, some_users, capsys, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    expected = [r.movie_id for r in rec.recommend_user(some_users[2], 5)]
    uri = trained_run.tracking_uri
    for ref in (f"runs:/{trained_run.run_id}", f"runs:/{trained_run.run_id}/checkpoints/best.ckpt"):
        loaded = load_model(ref, tracking_uri=uri)
        assert loaded.source == ref
        assert [r.movie_id for r in loaded.recommend_user(some_users[2], 5)] == expected

    client = MlflowClient(uri)
    name = "movierec-recommend-test"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{trained_run.run_id}/checkpoints", run_id=trained_run.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    monkeypatch.chdir(tmp_path)  # the store is found through --tracking-uri / $MLFLOW_TRACKING_URI only
    for ref in (f"models:/{name}/{version.version}", f"models:/{name}@champion", f"models:/{name}/latest"):
        argv = ["recommend", ref, "--tracking-uri", uri, "--user", some_users[2], "--k", 5, "--json"]
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        assert [r["movieId"] for r in json.loads(out)["recommendations"]] == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, out, _ = run(capsys, "recommend", f"runs:/{trained_run.run_id}", "--user", some_users[2], "--k", 5, "--json")
    assert code == 0 and [r["movieId"] for r in json.loads(out)["recommendations"]] == expected


# --------------------------------------------------------------------------- export-recs


def test_export_recs_writes_every_user(trained_run, rec, tmp_path, capsys):
    out = tmp_path / "recs" / "all.parquet"
    code, printed, err = run(capsys, "export-recs", trained_run.run_dir, "--out", out, "--k", 12, "--batch-size", 50)
    assert code == 0, err
    users = load_sequences(trained_run.data_dir).users
    assert f"{len(users) * 12:,} rows for {len(users):,} users (k=12)" in printed
    table = pq.read_table(out)
    assert table.column_names == ["user_id", "rank", "movie_id", "title", "score"]
    df = table.to_pydict()
    user_ids = np.asarray(df["user_id"])
    assert sorted(set(user_ids.tolist())) == sorted(rec.user_ids[users - 1].tolist())
    assert np.all(np.bincount(np.unique(user_ids, return_inverse=True)[1]) == 12)
    ranks = np.asarray(df["rank"]).reshape(-1, 12)
    assert np.all(ranks == np.arange(1, 13))
    scores = np.asarray(df["score"]).reshape(-1, 12)
    assert np.all(np.diff(scores, axis=1) <= 0)
    movie_ids = np.asarray(df["movie_id"]).reshape(-1, 12)
    for row in range(0, len(ranks), 37):
        user = int(user_ids[row * 12])
        assert not set(movie_ids[row].tolist()) & set(rec.history_of(user))
        assert movie_ids[row].tolist() == [r.movie_id for r in rec.recommend_user(user, 12)]
        assert df["title"][row * 12] == rec.item(int(movie_ids[row, 0])).title
    assert sorted(p.name for p in out.parent.iterdir()) == ["all.parquet"]  # no temporary file left


def test_export_recs_is_atomic(trained_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "recs.parquet"
    out.write_bytes(b"previous export")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", fail)
    assert main(["export-recs", str(trained_run.run_dir), "--out", str(out), "--k", "3"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert out.read_bytes() == b"previous export", "the previous export is intact"
    assert not list((tmp_path / "recs.parquet.parts").glob("part-*")), "no pass was finished"
    monkeypatch.undo()
    assert main(["export-recs", str(trained_run.run_dir), "--out", str(out), "--k", "3"]) == 0
    assert pq.read_table(out).num_rows == 3 * len(load_sequences(trained_run.data_dir).users)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "0"], "k must be an integer from 1 to 150"),
        (["--k", "151"], "k must be an integer from 1 to 150"),
        (["--batch-size", "0"], "--batch-size must be positive"),
    ],
)
def test_bad_export_input_is_one_line(trained_run, tmp_path, capsys, extra, message):
    out = tmp_path / "x.parquet"
    code, _, err = run(capsys, "export-recs", trained_run.run_dir, "--out", out, *extra)
    assert code == 2 and err.count("\n") == 1 and message in err and not out.exists()
    code, _, err = run(capsys, "export-recs", trained_run.run_dir, "--out", tmp_path / "x.csv")
    assert code == 2 and "give a .parquet file" in err


def test_fewer_unseen_items_than_k_gives_fewer_rows(rec, some_users):
    user = some_users[0]
    seen = len(set(rec.history_of(user)))
    recs = rec.recommend_user(user, rec.num_items)
    assert len(recs) == rec.num_items - seen and len(rec.recommend_user(user, rec.num_items, True)) == rec.num_items
    with pytest.raises(RecommendError):
        rec.check_k(True)
    with pytest.raises(UnknownUserError):
        rec.history_of(123456789)


def test_item_lookup(rec):
    item = rec.item(13)
    assert item.movie_id == 13 and item.title.startswith("Synthetic movie 1 (") and item.genres
    assert item.year == int(item.title[-5:-1])
    with pytest.raises(RecommendError, match="unknown movieId 12"):
        rec.item(12)


# --------------------------------------------------------------------------- docs/serving.md


def test_documented_commands(trained_run, rec, tmp_path, capsys, monkeypatch):
    commands = documented_commands("movierec ")
    assert {c.split()[1] for c in commands} == {"recommend", "export-recs", "serve"}
    for user in (1042, 1049):
        assert rec.has_user(user), f"docs/serving.md uses user {user}, unknown to the test model"
    for movie in (13, 263, 1193):
        rec.item(movie)
    monkeypatch.chdir(quickstart_layout(trained_run, tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected_user = [r.movie_id for r in rec.recommend_user(1042, 10)]
    for command in commands:
        if command.startswith("movierec serve"):
            continue  # run by tests/test_api.py::test_documented_server_and_requests
        argv = shlex.split(command.replace("<RUN_ID>", trained_run.run_id))[1:]
        code, out, err = run(capsys, *argv)
        assert code == 0, f"{command}: {err}"
        if "--json" in argv:
            recs = json.loads(out)["recommendations"]
            assert len(recs) == 20 and {r["movieId"] for r in recs} & set(rec.history_of(1042))  # --include-seen
        elif "--user" in argv:
            assert all(str(m) in out for m in expected_user)
        elif "--history" in argv:
            top = rec.recommend_history([13, 263, 1193], 5).recommendations
            assert all(r.title in out for r in top)
    assert pq.read_table(tmp_path / "recs.parquet").num_rows == 100 * len(rec.known_users)
