"""Readers of raw dataset sources: SASRec `user item` text files and MovieLens releases (zip or folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from movierec.data.split import Interactions
from movierec.errors import DataError


def read_sasrec_text(path: str | Path) -> Interactions:
    """SASRec/SSE-PT text format: `user item` per line, each user's lines in time order.

    The line number serves as the timestamp, so the published split (train = all but the last two
    items, valid = second-to-last, test = last) is reproduced exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist; pass the SASRec-format text file with --input")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["user", "item"]),
            parse_options=pacsv.ParseOptions(delimiter=" "),
            convert_options=pacsv.ConvertOptions(column_types={"user": pa.int64(), "item": pa.int64()}),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not in SASRec's `user item` text format: {exc}") from exc
    users = table["user"].to_numpy()
    items = table["item"].to_numpy()
    if len(users) and (users.min() < 1 or items.min() < 1):
        raise DataError(f"{path}: SASRec ids start at 1, found an id below 1")
    return Interactions(users=users, items=items, timestamps=np.arange(len(users), dtype=np.int64))


class ReleaseFiles:
    """The files of a MovieLens release, read from its zip archive or from an extracted folder.

    Members are found at their place in the official archive (`ml-1m/ratings.dat`); a re-packed archive or
    a folder that holds the files directly (`DIR/ratings.dat`) or one level down (`DIR/ml-1m/ratings.dat`)
    works too. Zip members are decompressed while they are parsed, never extracted to disk.
    """

    def __init__(self, release, archive: str | Path | None = None, folder: str | Path | None = None):
        import zipfile

        self.release = release
        self.archive = Path(archive) if archive is not None else None
        self.folder = Path(folder) if folder is not None else None
        self._zip = None
        if self.archive is not None:
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(
                    f"{self.archive} is not a readable zip archive ({exc}); it may be truncated: download it "
                    "again (a cached download is re-verified) or check --archive"
                ) from exc
            self._names = [n for n in self._zip.namelist() if not n.endswith("/")]
        elif self.folder is None or not self.folder.is_dir():
            raise DataError(f"--input {self.folder} is not a folder; pass the extracted {release.name} folder")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def where(self) -> str:
        return str(self.archive if self.archive is not None else self.folder)

    def locate(self, filename: str) -> str | Path | None:
        """The zip member name or file path of `filename`, or None when the release lacks it."""
        root = self.release.root
        if self._zip is not None:
            exact = f"{root}/{filename}"
            if exact in self._names:
                return exact
            matches = sorted((n for n in self._names if n == filename or n.endswith(f"/{filename}")), key=len)
            return matches[0] if matches else None
        for candidate in (self.folder / filename, self.folder / root / filename):
            if candidate.is_file():
                return candidate
        return None

    def require(self, filename: str) -> str | Path:
        found = self.locate(filename)
        if found is None:
            if self._zip is not None:
                raise DataError(
                    f"{self.archive} has no {self.release.root}/{filename}: is it the {self.release.name} archive "
                    f"({self.release.filename})?"
                )
            raise DataError(
                f"{self.folder} holds neither {filename} nor {self.release.root}/{filename}: pass the extracted "
                f"{self.release.name} folder with --input"
            )
        return found

    def open(self, member: str | Path):
        """A binary file object for a located member, and its display name."""
        if self._zip is not None:
            return self._zip.open(str(member)), f"{self.archive}:{member}"
        return open(member, "rb"), str(member)

    def read(self, member: str | Path, parse, **options):
        """`parse(handle, name, **options)` over a member; a damaged zip member (bad CRC, truncated deflate
        stream) is a one-line DataError even when the archive's MD5 check was skipped."""
        import zipfile
        import zlib

        handle, name = self.open(member)
        try:
            with handle:
                return parse(handle, name, **options)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            again = "; download the archive again" if self._zip is not None else ""
            raise DataError(f"{name} is corrupt ({exc}){again}") from exc


def read_release(files: ReleaseFiles) -> tuple[Interactions, pa.Table | None]:
    """Ratings as Interactions (rows in file order) and the titles table, for any zip/csv/dat release."""
    from movierec.data import parsers
    from movierec.data.registry import FORMAT_CSV, FORMAT_DAT, FORMAT_ML100K

    release = files.release
    readers = {
        FORMAT_ML100K: (parsers.read_u_data, parsers.read_u_item),
        FORMAT_DAT: (parsers.read_ratings_dat, parsers.read_movies_dat),
        FORMAT_CSV: (parsers.read_ratings_csv, parsers.read_movies_csv),
    }
    if release.format not in readers:
        raise DataError(f"{release.name} is not a ratings-file release")
    read_ratings, read_titles = readers[release.format]
    interactions = files.read(files.require(release.ratings), read_ratings)
    titles = None
    member = files.locate(release.titles) if release.titles else None
    if member is not None:
        extra = {}
        genre_member = files.locate("u.genre") if release.format == FORMAT_ML100K else None
        if genre_member is not None:
            extra["genre_names"] = files.read(genre_member, lambda handle, _name: parsers.read_u_genre(handle))
        titles = files.read(member, read_titles, **extra)
    return interactions, titles
