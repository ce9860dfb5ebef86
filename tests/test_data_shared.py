"""Real MovieLens files from ../shared/data (skipped cleanly when that folder is absent)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from data_builders import SHARED_DATA

from movierec.cli import main
from movierec.data.layout import load_sequences, read_items, read_meta
from movierec.data.prepare import prepare
from movierec.errors import DataError

SASREC = SHARED_DATA / "ml-1m-sasrec" / "ml-1m.txt"
ML100K = SHARED_DATA / "ml-100k"

# ML-100K after the default 5-core filter (users and items with >= 5 ratings), as documented in docs/data.md
ML100K_5CORE = {"num_users": 943, "num_items": 1349, "num_interactions": 99287}


@pytest.mark.skipif(not SASREC.is_file(), reason="../shared/data/ml-1m-sasrec is absent")
def test_ml1m_sasrec_matches_the_published_split(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", "ml-1m-sasrec", "--input", str(SASREC), "--out", str(out)]) == 0
    assert "999,611" in capsys.readouterr().out
    path = out / "ml-1m-sasrec"
    meta = read_meta(path)
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (6040, 3416, 999611)
    assert meta["split_counts"]["validation"] == meta["split_counts"]["evaluation"] == 6040
    # SASRec's data_partition: per user, train = all but the last two items, valid = second-to-last, test = last
    table = np.loadtxt(SASREC, dtype=np.int64)
    users, items = table[:, 0], table[:, 1]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    data = load_sequences(path)
    assert len(starts) == 6040
    for begin, end in zip(starts, np.r_[starts[1:], len(users)], strict=True):
        user, seq = int(users[begin]), items[begin:end]
        assert data.train_sequence(user).tolist() == seq[:-2].tolist()
        assert data.valid_item[user] == seq[-2] and data.test_item[user] == seq[-1]
    titles = read_items(path)
    assert titles.num_rows == 3416 and titles["title"].null_count == 0


def grouplens_style_zip(target):
    """A zip of ../shared/data/ml-100k laid out as GroupLens ships it (folder ml-100k/ inside)."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("ml-100k/"), "")
        for file in sorted(ML100K.iterdir()):
            if file.name != "SOURCE.txt":
                archive.write(file, f"ml-100k/{file.name}")
    return target


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="../shared/data/ml-100k is absent")
def test_ml100k_from_a_grouplens_style_zip(tmp_path, capsys):
    archive = grouplens_style_zip(tmp_path / "ml-100k.zip")
    # our zip holds the same files but is not GroupLens's byte-for-byte archive: its MD5 differs
    with pytest.raises(DataError, match=r"0e33842e24a9c977be4e0107933c0723.*--no-verify"):
        prepare("ml-100k", tmp_path / "out", archive=archive)
    args = ["prepare", "--dataset", "ml-100k", "--archive", str(archive), "--no-verify", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    meta = read_meta(tmp_path / "o" / "ml-100k")
    assert {k: meta[k] for k in ML100K_5CORE} == ML100K_5CORE
    assert meta["num_evaluated_users"] == 943 and meta["source"]["md5_verified"] is False
    items = read_items(tmp_path / "o" / "ml-100k").to_pylist()
    assert items[0] == {"item": 1, "movie_id": 1, "title": "Toy Story (1995)", "year": 1995,
                        "genres": "Animation|Children's|Comedy"}  # fmt: skip
    everything = prepare("ml-100k", tmp_path / "all", archive=archive, verify=False,
                         min_user_interactions=0, min_item_interactions=0)  # fmt: skip
    meta = read_meta(everything)
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (943, 1682, 100000)
