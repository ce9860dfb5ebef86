"""A synthetic catalogue the size of ML-20M's (27,278 movies) with titles shaped like MovieLens's, for timing
the title search of `movierec serve` where the real ML-20M is not at hand (it is never downloaded here).

What search costs depends on the titles' shape, not on their meaning: how many words a title has, how often
a word recurs across titles (a few common words, a long tail of names), accents, years. So the titles are
drawn from a Zipf-weighted vocabulary of common title words, generated proper names (the long tail),
accented words (about one title in twenty), MovieLens's trailing article ("Game, The (1997)"), sequels and
subtitles, and a year from 1900 to 2015 skewed to recent ones, with 1-3 of MovieLens's genres each.

The prepared dataset around them is as small as a model can be trained on: every movie watched at least five
times (so the prepare's 5-core filter keeps all 27,278) plus Zipf-popular extra views, which search uses to
rank its matches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

ML20M_MOVIES = 27_278
NUM_USERS = 6_000
GENRES = """Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy Film-Noir Horror IMAX Musical
    Mystery Romance Sci-Fi Thriller War Western""".split()  # noqa: SIM905 (MovieLens's genres)
# common title words, most frequent first (drawn with Zipf weights)
WORDS = """Love Man Night Day Life Story Last Dead Girl Time King House World Black Blood Big Little Dark Death
    City Christmas American Lost Secret War Woman Return Home Red Killer Dream Movie Family Game Hell Boy Lady
    Street Heart Summer Wild Devil Angel Kiss Ghost Moon Sun Star Road Island Sea Fire Evil Mr Queen Blue
    White Great New Young Good Bad Live Die Run Gold Money Power Shadow Wedding Murder Brothers Sisters Father
    Mother Daughter Son Children Monster Zombie Vampire Legend Hunter Escape Dance Music Song Band
    School Campus Hotel Train Ship Mountain Valley River Desert Storm Thunder Rain Snow Winter Spring Paradise
    Heaven Earth Planet Space Alien Robot Machine Dragon Sword Warrior Soldier Hero Spy Agent Detective
    Cop Doctor Professor Prince Princess Captain General Wolf Tiger Bear Horse Bird Dog Cat Stranger Friends
    Lovers Secrets Lies Truth Justice Revenge Rising Fall Kingdom Empire Journey Adventure Mystery Nightmare
    Terror Fear Silence Echo Mirror Window Door Garden Forest Ocean Beach Paris London Tokyo Berlin Rome""".split()  # noqa: SIM905 (word lists read better as text)
ACCENTED = """Amélie Café Señor Noël Mädchen Über Québec Niño Garçon Résumé São Zoë Crème Fiancée Déjà Naïve
    Château Élite Müller Português Señorita Mañana Tráfico Español Brésil Hôtel Prénom Été Fête Éternel
    Björk Åsa Østen Cœur Łódź Kraków Göteborg Ménage Rêve""".split()  # noqa: SIM905
WORD_WEIGHTS = 1.0 / np.arange(1, len(WORDS) + 1) ** 0.8
WORD_WEIGHTS /= WORD_WEIGHTS.sum()
SMALL = ("of", "and", "in", "the", "to", "a", "for", "on")
SYLLABLES = "ka ro len mi sa to ver an del ia mor gan tes bi lo ne har ry jo el son wick ber stein ov ski li na".split()  # noqa: SIM905


def title_words(rng: np.random.Generator, count: int) -> list[str]:
    """`count` capitalised words: a common word (Zipf), a generated name (the long tail) or an accented one."""
    out = []
    for draw in rng.random(count):
        if draw < 0.04:
            out.append(str(rng.choice(ACCENTED)))
        elif draw < 0.32:
            name = "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))
            out.append(name.capitalize())
        else:
            out.append(str(rng.choice(WORDS, p=WORD_WEIGHTS)))
    return out


def synthetic_titles(count: int = ML20M_MOVIES, seed: int = 0) -> pa.Table:
    """items.parquet's columns for movies 1..count: movie_id, title ("Words, The (1995)"), year, genres."""
    rng = np.random.default_rng(seed)
    titles, years, genres = [], [], []
    for _ in range(count):
        words = title_words(rng, int(rng.choice([1, 2, 3, 4, 5], p=[0.2, 0.35, 0.25, 0.12, 0.08])))
        if len(words) >= 3 and rng.random() < 0.4:  # "Return of the Dragon"
            words.insert(int(rng.integers(1, len(words))), str(rng.choice(SMALL)))
        text = " ".join(words)
        if rng.random() < 0.1:  # "Star Dragon: Ghost Island"
            text += ": " + " ".join(title_words(rng, int(rng.integers(1, 4))))
        if rng.random() < 0.06:
            text += " " + str(rng.choice(["2", "3", "II", "III", "Part II"]))
        if rng.random() < 0.25:  # MovieLens moves a leading article to the end
            text += ", " + str(rng.choice(["The", "The", "A", "An", "La", "Le"]))
        year = 1900 + int(115 * rng.beta(4.0, 1.4))
        titles.append(f"{text} ({year})")
        years.append(year)
        genres.append("|".join(rng.choice(GENRES, size=int(rng.integers(1, 4)), replace=False)))
    return pa.table({"movie_id": pa.array(np.arange(1, count + 1), pa.int64()), "title": titles,
                     "year": pa.array(years, pa.int32()), "genres": genres})  # fmt: skip


def write_titles_dataset(out: Path, count: int = ML20M_MOVIES, seed: int = 0) -> Path:
    """A prepared dataset (`out/titles`) of `count` titled movies and NUM_USERS users: each movie watched five
    times (all survive the 5-core filter) plus 60,000 Zipf-popular views. Returns its folder."""
    from movierec.data.split import Interactions, write_dataset

    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, count + 1) ** 0.9
    extra = rng.choice(count, size=60_000, p=popularity / popularity.sum())
    items = np.concatenate([*(rng.permutation(count) for _ in range(5)), extra]) + 1
    interactions = Interactions(
        users=rng.integers(1, NUM_USERS + 1, len(items)), items=items.astype(np.int64),
        timestamps=rng.integers(946_684_800, 1_400_000_000, len(items)), ratings=None,
    )  # fmt: skip
    return write_dataset(interactions, out, "titles", source={"kind": "synthetic-titles", "seed": seed},
                         titles=synthetic_titles(count, seed), overwrite=True)  # fmt: skip
