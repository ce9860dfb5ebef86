"""Title search, users' histories, genres and explained recommendations: the API the page at `/` uses."""

from __future__ import annotations

import random

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_api import assert_documented, assert_error

from movierec.serving.http import create_app
from movierec.serving.loader import load_model
from movierec.serving.search import TitleIndex, normalise

ML_20M_TITLES = 27_278
KNOWN_TITLES = [
    ("Toy Story (1995)", 1995),
    ("Toy Story 2 (1999)", 1999),
    ("Babes in Toyland (1961)", 1961),
    ("Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", 2001),
    ("WALL·E (2008)", 2008),
    ("Æon Flux (2005)", 2005),
    ("Influx", 1995),  # no year in the title: the year column is searched
    ("Story of Us, The (1999)", 1999),
]


def generated_catalogue(size: int = ML_20M_TITLES, seed: int = 0) -> list[tuple[str, int]]:
    """ML-20M-shaped titles (1-6 words, some accented, a year in parentheses), the known titles among them."""
    rng = random.Random(seed)
    words = ["the", "night", "love", "dead", "man", "city", "king", "return", "lost", "dark", "story", "café",
             "señor", "über", "noël", "star", "war", "of", "in", "a", "house", "blue", "zoo", "ghost"]  # fmt: skip
    titles = []
    for _ in range(size - len(KNOWN_TITLES)):
        year = rng.randint(1900, 2015)
        name = " ".join(rng.choice(words).capitalize() for _ in range(rng.randint(1, 6)))
        titles.append((f"{name} ({year})", year))
    for offset, known in enumerate(KNOWN_TITLES):
        titles.insert(offset * 3000, known)
    return titles


def brute_force(titles: list[tuple[str, int]], query: str) -> set[int]:
    """Item ids (1-based) whose normalised title and year hold every word of the query."""
    words = normalise(query).split()
    return {i for i, (title, year) in enumerate(titles, 1) if all(w in normalise(f"{title} {year}") for w in words)}


@pytest.fixture(scope="module")
def catalogue() -> tuple[list[tuple[str, int]], TitleIndex]:
    titles = generated_catalogue()
    popularity = np.random.default_rng(0).integers(0, 1000, size=len(titles) + 1)
    popularity[[i for i, (t, _) in enumerate(titles, 1) if t.startswith("Toy Story (")]] = 10_000
    popularity[[i for i, (t, _) in enumerate(titles, 1) if t == "Influx"]] = 20_000
    return titles, TitleIndex([t for t, _ in titles], [y for _, y in titles], popularity)


def found(catalogue, query: str, limit: int = 10) -> list[str]:
    titles, index = catalogue
    return [titles[i - 1][0] for i in index.search(query, limit)]


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", "amelie fabuleux destin d amelie poulain le 2001"),
        ("WALL·E", "wall e"),
        ("Æon Flux", "aeon flux"),
        ("  TOY   story, 1995!! ", "toy story 1995"),
        ("Straße", "strasse"),
        ("¿?", ""),
    ],
)
def test_normalise_casefolds_strips_accents_and_punctuation(text, normalised):
    assert normalise(text) == normalised


def test_search_finds_titles_whatever_the_case_accents_and_word_order(catalogue):
    assert found(catalogue, "toy 1995")[0] == "Toy Story (1995)"
    assert found(catalogue, "1995 TOY")[0] == "Toy Story (1995)"
    assert found(catalogue, "amelie")[0].startswith("Amélie")
    assert found(catalogue, "AMÉLIE 2001")[0].startswith("Amélie")
    assert found(catalogue, "wall-e") == ["WALL·E (2008)"]
    assert found(catalogue, "aeon") == ["Æon Flux (2005)"]
    assert found(catalogue, "influx 1995") == ["Influx"]  # the year column, not the title
    assert found(catalogue, "?!") == [] and found(catalogue, "zzzzqx") == []


def test_search_ranks_word_starts_then_popularity(catalogue):
    toy = found(catalogue, "toy", 3)
    assert toy[0] == "Toy Story (1995)"  # the most popular of the titles with a word starting "toy"
    assert set(toy) == {"Toy Story (1995)", "Toy Story 2 (1999)", "Babes in Toyland (1961)"}
    assert found(catalogue, "flux") == ["Æon Flux (2005)", "Influx"]  # a word start first, however popular


@pytest.mark.parametrize("query", ["night", "dead man", "cafe", "SENOR 19", "noel king", "a", "ue", "of the 2001"])
def test_search_returns_exactly_the_titles_holding_every_word(catalogue, query):
    titles, index = catalogue
    got = index.search(query, len(titles))
    assert len(got) == len(set(got.tolist()))
    assert set(got.tolist()) == brute_force(titles, query)
    assert len(index.search(query, 7)) == min(7, len(got))


# --------------------------------------------------------------------------- the API the page uses


@pytest.fixture(scope="module")
def rec(trained_run):
    return load_model(trained_run.run_dir)


@pytest.fixture(scope="module")
def client(rec):
    with TestClient(create_app(rec)) as c:
        yield c


@pytest.fixture(scope="module")
def openapi(client) -> dict:
    return client.get("/openapi.json").json()


def test_item_search_endpoint(client, rec, openapi):
    movie = rec.item(23)  # "Synthetic movie 2 (<year>)"
    response = client.get("/v1/items", params={"query": f"SYNTHETIC movie 2 {movie.year}", "limit": 5})
    assert_documented(openapi, "GET", "/v1/items", response)
    items = response.json()["items"]
    assert items[0] == {"movieId": 23, "title": movie.title, "year": movie.year, "genres": movie.genres}
    assert 1 <= len(items) <= 5 and all(str(movie.year) in item["title"] for item in items)
    many = client.get("/v1/items", params={"query": "movie 14", "limit": 100}).json()["items"]
    assert 1 < len(many) == sum("14" in title for title in rec.titles)  # every title holds "movie"
    assert client.get("/v1/items", params={"query": "no such film"}).json() == {"items": []}
    for params, fragment in [
        ({}, "query: Field required"),
        ({"query": ""}, "query: String should have at least 1 character"),
        ({"query": "x" * 201}, "query: String should have at most 200 characters"),
        ({"query": "movie", "limit": 0}, "limit: Input should be greater than or equal to 1"),
        ({"query": "movie", "limit": 101}, "limit: Input should be less than or equal to 100"),
    ]:
        response = client.get("/v1/items", params=params)
        assert_error(response, 422, fragment)
        assert_documented(openapi, "GET", "/v1/items", response)


def test_user_history_endpoint(client, rec, openapi):
    user = int(rec.known_user_ids[3])
    response = client.get(f"/v1/users/{user}/history")
    assert_documented(openapi, "GET", "/v1/users/{user_id}/history", response)
    body = response.json()
    assert body["userId"] == user and [i["movieId"] for i in body["items"]] == rec.history_of(user)
    assert body["items"][0]["title"] == rec.item(body["items"][0]["movieId"]).title
    last = client.get(f"/v1/users/{user}/history", params={"limit": 2}).json()["items"]
    assert [i["movieId"] for i in last] == rec.history_of(user)[-2:]
    assert_error(client.get("/v1/users/1/history"), 404, "unknown user 1")
    assert_error(client.get(f"/v1/users/{user}/history", params={"limit": 0}), 422, "limit")
    assert_documented(openapi, "GET", "/v1/users/{user_id}/history", client.get("/v1/users/1/history"))


def test_genres_endpoint(client, rec, openapi):
    response = client.get("/v1/genres")
    assert_documented(openapi, "GET", "/v1/genres", response)
    expected = sorted({g for listed in rec.genres for g in listed.split("|")})
    assert response.json() == {"genres": expected} == {"genres": ["Action", "Comedy", "Drama", "Horror"]}


def post_explained(client, body: dict, openapi: dict, status: int = 200) -> dict:
    response = client.post("/v1/recommendations/explained", json=body)
    assert response.status_code == status, response.text
    assert_documented(openapi, "POST", "/v1/recommendations/explained", response)
    return response.json()


def test_explained_recommendations_are_the_plain_ones_with_their_details(client, rec, openapi):
    history = [13, 263, 1193, 24]  # 24 is not a movie of the model
    body = post_explained(client, {"history": history, "k": 7}, openapi)
    plain = client.post("/v1/recommendations", json={"history": history, "k": 7}).json()
    assert [r["movieId"] for r in body["recommendations"]] == [r["movieId"] for r in plain["recommendations"]]
    assert [r["score"] for r in body["recommendations"]] == pytest.approx(
        [r["score"] for r in plain["recommendations"]]
    )
    assert body["unknownMovieIds"] == plain["unknownMovieIds"] == [24]
    for r in body["recommendations"]:
        item = rec.item(r["movieId"])
        assert (r["title"], r["year"], r["genres"]) == (item.title, item.year, item.genres)
        assert r["because"]["movieId"] in history and r["because"]["title"] == rec.item(r["because"]["movieId"]).title


def test_a_genre_gives_the_best_unseen_movies_of_that_genre(client, rec, openapi):
    history = [13, 263, 1193]
    ranked = rec.recommend_history(history, rec.num_items).recommendations
    for genre in ["Comedy", "Horror"]:
        body = post_explained(client, {"history": history, "k": 5, "genre": genre}, openapi)
        expected = [r for r in ranked if genre in rec.item(r.movie_id).genres.split("|")][:5]
        assert [r["movieId"] for r in body["recommendations"]] == [r.movie_id for r in expected]
        assert [r["score"] for r in body["recommendations"]] == pytest.approx([r.score for r in expected], abs=1e-5)
        assert [r["rank"] for r in body["recommendations"]] == [1, 2, 3, 4, 5]
    everything = post_explained(client, {"history": history, "k": 150, "genre": "Drama"}, openapi)["recommendations"]
    drama = [i for i in rec.item_movie_ids.tolist() if "Drama" in rec.item(i).genres and i not in history]
    assert sorted(r["movieId"] for r in everything) == sorted(drama)  # fewer than k: every unseen one


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"history": []}, "history: List should have at least 1 item"),
        ({"history": [1, 2]}, "none of the history's movieIds is known"),
        (
            {"history": [13], "genre": "Western"},
            "unknown genre 'Western'; the genres are Action, Comedy, Drama, Horror",
        ),
        ({"history": [13], "genre": ""}, "genre: String should have at least 1 character"),
        ({"history": [13], "genre": 3}, "genre: Input should be a valid string"),
        ({"history": [13], "k": 151}, "k must be an integer from 1 to 150"),
        ({"history": [13], "because": True}, "because: Extra inputs are not permitted"),
    ],
)
def test_explained_errors(client, openapi, body, fragment):
    response = client.post("/v1/recommendations/explained", json=body)
    assert_error(response, 422, fragment)
    assert_documented(openapi, "POST", "/v1/recommendations/explained", response)


def leave_one_out_drops(rec, history: list[int], movie_id: int) -> list[float]:
    """The score drop of `movie_id` when each history movie is left out, one request per left-out movie."""

    def score(movies: list[int]) -> float:
        ranked = rec.recommend_history(movies, rec.num_items, include_seen=True).recommendations
        return next(r.score for r in ranked if r.movie_id == movie_id)

    full = score(history)
    return [full - score(history[:i] + history[i + 1 :]) for i in range(len(history))]


@pytest.mark.parametrize("length", [2, 5, 25])  # 25: longer than the model's window of 20
def test_because_is_the_largest_leave_one_out_drop(rec, length):
    history = rec.item_movie_ids[np.random.default_rng(length).permutation(rec.num_items)[:length]].tolist()
    result = rec.recommend_explained(history, k=4)
    assert len(result.recommendations) == 4
    for explained in result.recommendations:
        drops = leave_one_out_drops(rec, history, explained.recommendation.movie_id)
        assert explained.because.score_drop == pytest.approx(max(drops), abs=1e-4)
        assert drops[history.index(explained.because.movie_id)] == pytest.approx(max(drops), abs=1e-4)
        older = length - rec.config.max_len
        if older > 0:  # older than the window: leaving one out changes nothing the model reads
            assert drops[:older] == pytest.approx([0.0] * older, abs=1e-5)


def test_a_single_movie_history_is_its_own_reason(rec):
    (only,) = rec.recommend_explained([13], k=1).recommendations
    assert (only.because.movie_id, only.because.score_drop) == (13, None)
