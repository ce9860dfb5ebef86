"""Prepared shards read in place: memory-mapped `.npz` members and one array view over many shards.

`np.savez` stores each member uncompressed, so the array's bytes sit at a fixed offset inside the zip file
and can be mapped without reading them. Every process that maps the same shard shares the operating
system's page cache instead of holding a private copy, which is what lets a 70 M-pair file train in a few
GB and several training processes on one host share one copy of the pairs. (The negative-sampling index
of time-ordered data is the one per-process copy: 4 bytes per pair, see `data.negatives`.)
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


def map_npz_member(path: str | Path, name: str) -> np.ndarray:
    """The array `name` of an uncompressed `.npz` file as a read-only memory map (a copy if compressed).

    Raises ValueError / KeyError / zipfile.BadZipFile on a file that is not such an archive.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:  # savez_compressed: there are no raw bytes to map
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_MAGIC:
            raise ValueError(f"bad zip local header for {name}.npy")
        name_length, extra_length = struct.unpack("<2H", header[26:30])
        handle.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if dtype.hasobject:
            raise ValueError(f"{name}.npy holds Python objects")
        offset = handle.tell()
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


class ConcatenatedColumn:
    """A read-only 1-D array that is the concatenation of `parts` (memory maps), without copying them.

    Supports what training and evaluation ask of a sequence store: gathers with integer index arrays of any
    shape, slices, `len`, and a chunked pass for counting. `np.asarray(column)` makes the one full copy.
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = [p for p in parts if len(p)] or [np.zeros(0, dtype=np.int32)]
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])
        self.dtype = np.result_type(*(p.dtype for p in self.parts))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def in_memory(self) -> ConcatenatedColumn:
        """The same column with every part copied into this process's memory. A memory map of a file that
        another program truncates in place (what `cp` over it does) kills the reader with SIGBUS at its next
        access; a long-lived reader (the server) reads through private copies instead."""
        return ConcatenatedColumn([np.array(part) for part in self.parts])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("ConcatenatedColumn slices take step 1")
            return self.take(np.arange(start, stop))
        if isinstance(index, int | np.integer):
            return self.take(np.asarray([index]))[0]
        return self.take(np.asarray(index))

    def take(self, index: np.ndarray) -> np.ndarray:
        """`self[index]` for an integer array of any shape."""
        flat = np.asarray(index, dtype=np.int64).ravel()
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"index out of range for a column of {len(self)}")
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][flat]).reshape(np.shape(index))
        part = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(self.parts) + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[p] : bounds[p + 1]]
            out[rows] = self.parts[p][flat[rows] - self.starts[p]]
        return out.reshape(np.shape(index))

    def gatherer(self, anchors: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """A fast `take` for repeated gathers whose i-th position always lies in the part of `anchors[i]`.

        Binary searches inside one user's segment (which never spans two parts) find each entry's part once,
        not once per probe.
        """
        anchors = np.asarray(anchors, dtype=np.int64)
        if len(self.parts) == 1:
            part = self.parts[0]
            return lambda positions: np.asarray(part[positions])
        part_of = np.clip(np.searchsorted(self.starts, anchors, side="right") - 1, 0, len(self.parts) - 1)
        order = np.argsort(part_of, kind="stable")
        bounds = np.searchsorted(part_of[order], np.arange(len(self.parts) + 1))
        groups = [(self.parts[p], int(self.starts[p]), order[bounds[p] : bounds[p + 1]])
                  for p in np.flatnonzero(np.diff(bounds))]  # fmt: skip

        def gather(positions: np.ndarray) -> np.ndarray:
            out = np.empty(positions.shape, dtype=self.dtype)
            for part, start, rows in groups:
                out[rows] = part[positions[rows] - start]
            return out

        return gather

    def chunks(self) -> Iterator[np.ndarray]:
        """The parts in order (each a view: iterate to stream over the whole column)."""
        yield from self.parts

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate([np.asarray(p) for p in self.parts])
        return whole if dtype is None else whole.astype(dtype)
