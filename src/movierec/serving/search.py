"""Title search for the page's search box: matches as you type, whatever the case, accents or punctuation.

A title and a query are both normalised the same way (casefolded, accents stripped, every run of other
characters than letters and digits one space), and a title matches when every word of the query occurs in it,
in any order: "toy 1995" finds "Toy Story (1995)", "amelie" finds "Amélie", "wall e" finds "WALL·E". The year
is part of the searched text even where the title does not carry it. The normalised titles are built once,
when the model is loaded; a query is a scan of plain strings (a whole `GET /v1/items` request over 27,278
titles, the size of ML-20M: p50 3.5 ms, p99 7.0 ms at one client on a 2-core CPU;
`python bench/serve_latency.py --endpoints search`, docs/results.md).

Matches are ranked by the number of query words that start a word of the title (what someone typing the
beginning of a title means), then by popularity (how many users watched the movie), then by item order.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+")
# letters that Unicode does not decompose into a base letter and an accent
_LIGATURES = str.maketrans({"æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"})


def normalise(text: str) -> str:
    """Casefolded, accent-free words separated by single spaces: "L'Amélie (2001)" -> "l amelie 2001"."""
    decomposed = unicodedata.normalize("NFKD", text.casefold().translate(_LIGATURES))
    return " ".join(_WORD.findall("".join(c for c in decomposed if not unicodedata.combining(c))))


class TitleIndex:
    """The normalised titles of a catalogue (item ids 1..n), searched by :meth:`search`."""

    def __init__(self, titles: Sequence[str | None], years: Sequence[int | None], popularity: np.ndarray):
        items: list[int] = []
        self._texts: list[str] = []
        for item, (title, year) in enumerate(zip(titles, years, strict=True), start=1):
            if not title:  # a catalogue without titles (MLPerf's) has nothing to search
                continue
            text = normalise(title if year is None or str(year) in title else f"{title} {year}")
            items.append(item)
            self._texts.append(f" {text} ")  # spaces at both ends: " word" finds a word start anywhere
        self._items = np.asarray(items, dtype=np.int64)
        self._popularity = np.asarray(popularity, dtype=np.int64)[self._items]

    def __len__(self) -> int:
        return len(self._texts)

    def search(self, query: str, limit: int) -> np.ndarray:
        """Item ids of the best `limit` titles holding every word of `query`, best first (none for a query
        without a letter or digit)."""
        words = list(dict.fromkeys(normalise(query).split()))
        if not words or not self._texts:
            return np.zeros(0, dtype=np.int64)
        words.sort(key=len, reverse=True)  # the longest word is the most selective: the first scan narrows most
        texts, rows = self._texts, range(len(self._texts))
        for word in words:
            rows = [row for row in rows if word in texts[row]]
        word_starts = np.zeros(len(rows), dtype=np.int64)
        for word in words:
            start = f" {word}"
            word_starts += np.array([start in texts[row] for row in rows], dtype=bool)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.lexsort((rows, -self._popularity[rows], -word_starts))[:limit]
        return self._items[rows[order]]
