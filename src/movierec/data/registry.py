"""Every MovieLens release this system knows: where to download it, its checksum, and its layout.

The URLs are GroupLens's official ones (`<base>/<name>.zip`, base
`https://files.grouplens.org/datasets/movielens`); a mirror can replace the base (`--base-url` or the
environment variable MOVIEREC_BASE_URL) and keeps the file names. MD5s are the ones GroupLens publishes
next to each archive.
"""

from __future__ import annotations

from dataclasses import dataclass

from movierec.errors import DataError

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"

# Formats of the ratings file; `sources.read_release` dispatches on them.
FORMAT_ML100K = "ml-100k"  # u.data: `user<TAB>item<TAB>rating<TAB>timestamp`, titles in u.item (latin-1, `|`)
FORMAT_DAT = "dat"  # ratings.dat: `UserID::MovieID::Rating::Timestamp`, titles in movies.dat
FORMAT_CSV = "csv"  # ratings.csv with header `userId,movieId,rating,timestamp`, titles in movies.csv
FORMAT_MLPERF = "mlperf"  # trainx16x32_K.npz / testx16x32_K.npz, `arr_0` (N, 2) int64 [user, item]


@dataclass(frozen=True)
class Release:
    """One downloadable release. `root` is the folder inside the archive that holds its files."""

    name: str
    filename: str
    md5: str | None
    root: str
    ratings: str
    titles: str | None
    format: str
    description: str
    md5_note: str = ""
    size_bytes: int | None = None

    def url(self, base_url: str | None = None) -> str:
        return f"{(base_url or DEFAULT_BASE_URL).rstrip('/')}/{self.filename}"


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release(
            name="ml-100k",
            filename="ml-100k.zip",
            md5="0e33842e24a9c977be4e0107933c0723",
            root="ml-100k",
            ratings="u.data",
            titles="u.item",
            format=FORMAT_ML100K,
            description="943 users, 1,682 items, 100,000 ratings (1998)",
        ),
        Release(
            name="ml-1m",
            filename="ml-1m.zip",
            md5="c4d9eecfca2ab87c1945afe126590906",
            root="ml-1m",
            ratings="ratings.dat",
            titles="movies.dat",
            format=FORMAT_DAT,
            description="6,040 users, 3,706 items, 1,000,209 ratings (2003)",
        ),
        Release(
            name="ml-10m",
            filename="ml-10m.zip",
            md5="ce571fd55effeba0271552578f2648bd",
            root="ml-10M100K",
            ratings="ratings.dat",
            titles="movies.dat",
            format=FORMAT_DAT,
            description="69,878 users, 10,677 items, 10,000,054 ratings (2009)",
        ),
        Release(
            name="ml-20m",
            filename="ml-20m.zip",
            md5="cd245b17a1ae2cc31bb14903e1204af3",
            root="ml-20m",
            ratings="ratings.csv",
            titles="movies.csv",
            format=FORMAT_CSV,
            description="138,493 users, 26,744 items, 20,000,263 ratings (2015)",
            size_bytes=198_702_078,
        ),
        Release(
            name="ml-25m",
            filename="ml-25m.zip",
            md5="6b51fb2759a8657d3bfcbfc42b592ada",
            root="ml-25m",
            ratings="ratings.csv",
            titles="movies.csv",
            format=FORMAT_CSV,
            description="162,541 users, 59,047 items, 25,000,095 ratings (2019)",
        ),
        Release(
            name="ml-latest-small",
            filename="ml-latest-small.zip",
            md5=None,
            md5_note=(
                "GroupLens regenerates ml-latest-small from time to time, so its content and checksum change; "
                "no MD5 is pinned and the download is only checked for completeness (its length)"
            ),
            root="ml-latest-small",
            ratings="ratings.csv",
            titles="movies.csv",
            format=FORMAT_CSV,
            description="about 600 users, 9,000 items, 100,000 ratings; changes over time",
        ),
        Release(
            name="ml-20mx16x32",
            filename="ml-20mx16x32.tar",
            md5=None,
            md5_note=(
                "GroupLens publishes no MD5 for ml-20mx16x32.tar, so none is pinned; the download is only "
                "checked for completeness (its length) and every .npz is validated when it is converted"
            ),
            root="ml-20mx16x32",
            ratings="trainx16x32_{k}.npz",
            titles=None,
            format=FORMAT_MLPERF,
            description=(
                "MLPerf's fractal expansion of ML-20M: 2,197,225 users, 855,776 items, 1,223,962,043 training "
                "pairs in 16 train + 16 test .npz shards (~3.1 GB tar); no time order"
            ),
        ),
    )
}


def get_release(name: str) -> Release:
    try:
        return RELEASES[name]
    except KeyError:
        raise DataError(f"unknown MovieLens release {name!r}; known: {', '.join(RELEASES)}") from None
