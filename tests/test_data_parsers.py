"""Every MovieLens reader, on tiny files built here, and every release layout read from a zip or a folder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from data_builders import make_zip, movies_csv, ratings, release_members

from movierec.data import parsers
from movierec.data.registry import RELEASES
from movierec.data.sources import ReleaseFiles, read_release
from movierec.errors import DataError


def test_u_data():
    data = parsers.read_u_data(io.BytesIO(b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n"), "u.data")
    assert data.users.tolist() == [196, 186] and data.items.tolist() == [242, 302]
    assert data.ratings.tolist() == [3.0, 3.0] and data.timestamps.tolist() == [881250949, 891717742]


def test_u_item_latin1_genre_flags_and_years():
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"
    none = ["0"] * 19
    raw = (
        f"1|Caf\xe9 Society (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n"
        f"267|unknown||||{'|'.join(none)}\n"
        f"3|No year here|05-Oct-1996||http://y|{'|'.join([*none[:-1], '1'])}\n"
    ).encode("latin-1")
    table = parsers.read_u_item(io.BytesIO(raw), "u.item").to_pylist()
    assert table[0] == {"movie_id": 1, "title": "Café Society (1995)", "year": 1995, "genres": "Action|Comedy"}
    assert table[1] == {"movie_id": 267, "title": "unknown", "year": None, "genres": ""}
    assert table[2]["year"] == 1996 and table[2]["genres"] == "Western"


def test_u_genre():
    assert parsers.read_u_genre(io.BytesIO(b"unknown|0\nAction|1\n\n"))[:2] == ("unknown", "Action")


@pytest.mark.parametrize("rating", ["5", "4.5"])
def test_ratings_dat(rating):
    raw = f"1::122::{rating}::838985046\n2::185::3::838983525\n".encode()
    data = parsers.read_ratings_dat(io.BytesIO(raw), "ratings.dat")
    assert data.users.tolist() == [1, 2] and data.items.tolist() == [122, 185]
    assert data.ratings[0] == float(rating) and data.timestamps.tolist() == [838985046, 838983525]


def test_movies_dat_titles_with_colons_and_latin1():
    raw = "1::Star Wars: Episode IV (1977)::Action|Sci-Fi\n2::Caf\xe9 (1999)::Drama\n".encode("latin-1")
    table = parsers.read_movies_dat(io.BytesIO(raw), "movies.dat").to_pylist()
    assert table[0]["title"] == "Star Wars: Episode IV (1977)" and table[1]["title"] == "Café (1999)"


def test_ratings_csv_and_quoted_movies_csv():
    raw = b"userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n"
    data = parsers.read_ratings_csv(io.BytesIO(raw), "ratings.csv")
    assert data.users.tolist() == [1, 1] and data.items.tolist() == [2, 29] and data.ratings.tolist() == [3.5, 3.5]
    table = parsers.read_movies_csv(io.BytesIO(movies_csv(2)), "movies.csv").to_pylist()
    assert table[0] == {"movie_id": 1, "title": "American President, The 1 (1991)", "genres": "Comedy|Drama|Romance"}


@pytest.mark.parametrize(
    ("reader", "raw", "expected"),
    [
        (parsers.read_u_data, b"1\t2\t3\n", "tab-separated"),
        (parsers.read_ratings_dat, b"1:2:3:4\n", "UserID::MovieID"),
        (parsers.read_ratings_dat, b"1::2::5::838985046\n1::2", "Expected 7 columns"),
        (parsers.read_ratings_csv, b"user,item,rating,timestamp\n1,2,3,4\n", "userId,movieId"),
        (parsers.read_ratings_csv, b"userId,movieId,rating,timestamp\n1,x,3,4\n", "userId,movieId"),
        (parsers.read_ratings_csv, b"userId,movieId,rating,timestamp\n", "no ratings"),
        (parsers.read_movies_dat, b"1::Toy Story\n", "MovieID::Title::Genres"),
    ],
)
def test_malformed_files_are_clear_errors(reader, raw, expected):
    with pytest.raises(DataError, match=r"broken\.name") as err:
        reader(io.BytesIO(raw), "broken.name")
    assert expected in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        parsers.read_ratings_csv(tmp_path / "ratings.csv")


@pytest.mark.parametrize("name", ["ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest-small"])
def test_every_release_from_its_zip_layout(tmp_path, name):
    rows = ratings(num_users=5, per_user=4, num_items=6)
    archive = tmp_path / RELEASES[name].filename
    archive.write_bytes(make_zip(release_members(name, rows, 6)))
    with ReleaseFiles(RELEASES[name], archive=archive) as files:
        interactions, titles = read_release(files)
    np.testing.assert_array_equal(interactions.users, rows[:, 0])
    np.testing.assert_array_equal(interactions.items, rows[:, 1])
    np.testing.assert_array_equal(interactions.timestamps, rows[:, 3])
    assert len(titles) == 6 and titles["movie_id"].to_pylist() == list(range(1, 7))
    if name == "ml-100k":
        assert titles["genres"][0].as_py() != ""


@pytest.mark.parametrize("nested", [True, False])
def test_release_from_an_extracted_folder(tmp_path, nested):
    rows = ratings(num_users=5, per_user=4, num_items=6)
    for member, data in release_members("ml-1m", rows, 6).items():
        target = tmp_path / (member if nested else member.split("/", 1)[1])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    with ReleaseFiles(RELEASES["ml-1m"], folder=tmp_path) as files:
        interactions, titles = read_release(files)
    assert len(interactions.users) == len(rows) and len(titles) == 6


def test_wrong_archive_and_folder_are_clear_errors(tmp_path):
    other = tmp_path / "other.zip"
    other.write_bytes(make_zip({"something/else.txt": b"x"}))
    with pytest.raises(DataError, match=r"has no ml-1m/ratings.dat: is it the ml-1m archive"):
        read_release(ReleaseFiles(RELEASES["ml-1m"], archive=other))
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(make_zip(release_members("ml-1m", ratings(), 10))[:100])
    with pytest.raises(DataError, match="not a readable zip archive"):
        ReleaseFiles(RELEASES["ml-1m"], archive=truncated)
    with pytest.raises(DataError, match=r"holds neither ratings\.dat nor ml-1m/ratings\.dat"):
        read_release(ReleaseFiles(RELEASES["ml-1m"], folder=tmp_path))
    with pytest.raises(DataError, match="is not a folder"):
        ReleaseFiles(RELEASES["ml-1m"], folder=tmp_path / "absent")
