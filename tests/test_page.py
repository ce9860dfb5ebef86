"""The page at `/` of `movierec serve`, driven in a real browser: Playwright for Python with Debian's Chromium,
headless, against the server started as a subprocess on 127.0.0.1 (nothing is downloaded at run time).

Screenshots go to a temporary folder; `MOVIEREC_SCREENSHOTS=docs pytest tests/test_page.py` writes the two of
docs/serving.md (docs/page.png, docs/page-390.png).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_api import served_run

from movierec.serving.http import PAGE_FILES, create_app
from movierec.serving.loader import load_model

try:
    from playwright.sync_api import expect
except ImportError:  # the browser tests skip: see the `browser` fixture
    expect = None

CHROMIUM = Path("/usr/bin/chromium")
needs_browser = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="no /usr/bin/chromium: `apt-get install chromium` to run the page's browser test"
)
HISTORY = [13, 263, 1193]  # movieIds of the tiny trained run (Synthetic movie 1, 26 and 119)


@pytest.fixture(scope="module")
def rec(trained_run):
    return load_model(trained_run.run_dir)


@pytest.fixture(scope="module")
def base_url(trained_run, tmp_path_factory) -> Iterator[str]:
    """`movierec serve` of the tiny trained run, as a user starts it, on a free port of 127.0.0.1."""
    with served_run(trained_run.run_dir, tmp_path_factory.mktemp("page-server")) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    return Path(os.environ.get("MOVIEREC_SCREENSHOTS") or tmp_path)


@dataclass
class Visit:
    """A browser page at `/`, with every URL it requested and every script error it raised."""

    page: object
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def open_page(browser, base_url: str, width: int, height: int) -> Visit:
    visit = Visit(browser.new_page(viewport={"width": width, "height": height}))
    visit.page.on("request", lambda request: visit.requests.append(request.url))
    visit.page.on("pageerror", lambda error: visit.errors.append(str(error)))
    visit.page.goto(f"{base_url}/")
    visit.page.wait_for_function(
        "() => document.querySelectorAll('#genre option').length > 1"
    )  # health, genres answered
    return visit


def expected_ids(base_url: str, history: list[int], k: int = 10) -> list[int]:
    response = httpx.post(f"{base_url}/v1/recommendations", json={"history": history, "k": k}, timeout=30)
    return [r["movieId"] for r in response.json()["recommendations"]]


def wait_for_results(page, ids: list[int]) -> None:
    """Until the page shows exactly these movieIds as recommendations, in this order."""
    page.wait_for_function(
        "ids => JSON.stringify([...document.querySelectorAll('#results li')].map(li => +li.dataset.movieId)) "
        "=== JSON.stringify(ids)",
        arg=ids,
        timeout=30_000,
    )


def history_ids(page) -> list[int]:
    return [int(i) for i in page.locator("#history li").evaluate_all("rows => rows.map(r => r.dataset.movieId)")]


def pick_by_search(page, query: str, title: str, keyboard: bool = False) -> None:
    search = page.get_by_label("Find a movie by title or year")
    search.fill(query)
    match = page.get_by_role("button", name=re.compile("^Add " + re.escape(title)))
    match.wait_for()
    if keyboard:  # arrow down to the matches, Enter on the one wanted
        search.press("ArrowDown")
        while not match.evaluate("button => button === document.activeElement"):
            page.keyboard.press("ArrowDown")
        page.keyboard.press("Enter")
    else:
        match.click()


@needs_browser
def test_search_pick_recommend_explain_reorder_remove_and_filter(browser, base_url, rec, screenshots):
    visit = open_page(browser, base_url, 1280, 900)
    page = visit.page
    titles = [rec.item(m).title for m in HISTORY]
    pick_by_search(page, "SYNTHETIC movie 1 " + str(rec.item(13).year), titles[0])
    pick_by_search(page, titles[1].lower(), titles[1])
    pick_by_search(page, f"{rec.item(1193).year} movie 119", titles[2], keyboard=True)
    assert history_ids(page) == HISTORY
    assert page.locator("#history li .title").all_inner_texts() == titles

    expected = expected_ids(base_url, HISTORY)
    wait_for_results(page, expected)
    posted = httpx.post(f"{base_url}/v1/recommendations", json={"history": HISTORY, "k": 10}, timeout=30).json()
    cards = page.locator("#results li")
    for card, recommendation in zip(cards.all(), posted["recommendations"], strict=True):
        item, text = rec.item(recommendation["movieId"]), card.inner_text()
        assert item.title in text and str(item.year) in text and item.genres.split("|")[0] in text
        assert f"score {recommendation['score']:.3f}" in text
        assert any(title in card.locator(".why").inner_text() for title in titles)  # why: a movie of the history
    assert not set(expected) & set(HISTORY)
    assert page.locator("#results-region").get_attribute("aria-live") == "polite"
    page.screenshot(path=str(screenshots / "page.png"), full_page=True)

    # reorder with the keyboard: the third movie one place earlier
    page.get_by_role("button", name=f"Move {titles[2]} earlier").focus()
    page.keyboard.press("Enter")
    reordered = [HISTORY[0], HISTORY[2], HISTORY[1]]
    assert history_ids(page) == reordered
    wait_for_results(page, expected_ids(base_url, reordered))

    page.get_by_role("button", name=f"Remove {titles[0]}").click()
    assert history_ids(page) == reordered[1:]
    wait_for_results(page, expected_ids(base_url, reordered[1:]))

    page.get_by_label("Genre").select_option("Comedy")
    ranked = expected_ids(base_url, reordered[1:], rec.num_items)
    comedies = [m for m in ranked if "Comedy" in rec.item(m).genres.split("|")][:10]
    wait_for_results(page, comedies)
    assert all("Comedy" in meta for meta in page.locator("#results .meta").all_inner_texts())
    expect(page.locator("#results-status")).to_contain_text("in Comedy")
    assert visit.errors == [] and all(url.startswith(base_url) for url in visit.requests)  # nothing from elsewhere


@needs_browser
def test_bad_input_is_a_clear_message(browser, base_url):
    visit = open_page(browser, base_url, 1280, 900)
    page = visit.page
    alert = page.get_by_role("alert")
    page.get_by_label("Start from user").fill("1")
    page.get_by_label("Start from user").press("Enter")
    expect(alert).to_have_text("unknown user 1: not a user of the data this model was trained on")
    page.get_by_label("Add by movieId").fill("24")
    page.get_by_role("button", name="Add", exact=True).click()
    expect(alert).to_have_text("unknown movieId 24: not an item of this model")
    page.get_by_label("Add by movieId").fill("twelve")
    page.get_by_role("button", name="Add", exact=True).click()
    expect(alert).to_have_text("Enter a movieId: a whole number, like 1193.")

    page.get_by_label("Add by movieId").fill("13")
    page.get_by_role("button", name="Add", exact=True).click()
    wait_for_results(page, expected_ids(base_url, [13]))
    expect(alert).to_be_hidden()
    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#results li")).to_have_count(0)
    expect(page.locator("#results-status")).to_contain_text("Your history is empty: pick at least one movie")
    assert visit.errors == []


@needs_browser
def test_the_page_fits_a_390_px_window(browser, base_url, rec, screenshots):
    visit = open_page(browser, base_url, 390, 844)
    page = visit.page
    user = int(rec.known_user_ids[0])
    page.get_by_label("Start from user").fill(str(user))
    page.get_by_role("button", name="Load").click()
    wait_for_results(page, expected_ids(base_url, rec.history_of(user)))
    assert history_ids(page) == rec.history_of(user)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    for control in ("Find a movie by title or year", "Start from user", "Genre"):
        assert page.get_by_label(control).bounding_box()["width"] <= 390
    page.screenshot(path=str(screenshots / "page-390.png"), full_page=True)
    assert visit.errors == []


def test_the_page_is_bundled_and_asks_for_nothing_elsewhere(trained_run):
    """Every file of the page comes from the package; none names another origin (works offline, no CDN)."""
    with TestClient(create_app(load_model(trained_run.run_dir))) as client:
        front = client.get("/")
        assert front.status_code == 200 and front.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'self'" in front.headers["content-security-policy"]
        for name, media_type in PAGE_FILES.items():
            response = client.get("/" if name == "index.html" else f"/page/{name}")
            assert response.headers["content-type"] == media_type
            assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", response.text, flags=re.IGNORECASE), name
        missing = client.get("/page/http.py")
        assert missing.status_code == 404 and missing.json() == {"detail": "no page file 'http.py'"}
        assert client.get("/page/../serving/http.py").status_code == 404
        assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not part of the API
