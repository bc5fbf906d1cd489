"""Weights in a file, laid out as the shared block is (``layout``): the vanilla baseline's
base (each worker reads private copies of its blocks, again on every swap-in), and what
only clients run (the ends), read a chunk of rows at a time when a client asks."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch

from menos.message_base import SharedEntry, SharedHandle
from menos.wire import dtype_from_name, dtype_name

log = logging.getLogger(__name__)

_ALIGN = 64  # bytes; keeps every view aligned for vectorised kernels


def layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[tuple[tuple[str, ...], torch.Tensor, int]], int]:
    """Group tied tensors (same storage and view) and give each group an offset."""
    groups: dict[tuple, list[str]] = {}
    first: dict[tuple, torch.Tensor] = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else ("empty", name)
        groups.setdefault(key, []).append(name)
        first.setdefault(key, t)
    placed, offset = [], 0
    for key, names in groups.items():
        t = first[key]
        placed.append((tuple(names), t, offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return placed, offset


class FileWeights:
    """The vanilla baseline's owner side: the block laid out as ``SharedWeights`` does,
    but in a file; nothing stays in memory. Same attributes as ``SharedWeights``."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], path: str):
        groups, size = layout(state_dict)
        self.entries = tuple(SharedEntry(names, dtype_name(t.dtype), tuple(t.shape), off) for names, t, off in groups)
        self.size = size
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            for _, t, off in groups:
                view, done = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()), 0
                while done < len(view):  # one pwrite moves at most about 2 GiB
                    done += os.pwrite(fd, view[done:], off + done)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.tensors = FileTensors(path, self.entries)
        self.handle = SharedHandle(kind="file", size=size, entries=self.entries, segment=path)
        log.info("wrote %d tensors, %.1f MiB, to %s", len(self.entries), size / 2**20, path)

    @classmethod
    def open(cls, handle: SharedHandle) -> "FileWeights":
        """A file another of our processes wrote for this one (the base's loader): now ours to remove."""
        if handle.kind != "file":
            raise ValueError(f"not a weights file's handle: {handle.kind!r}")
        self = cls.__new__(cls)
        self.entries, self.size, self.path, self.handle = handle.entries, handle.size, handle.segment, handle
        self.tensors = FileTensors(self.path, self.entries)
        return self

    def handle_for_worker(self) -> SharedHandle:
        return self.handle

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class FileTensors(Mapping):
    """name -> a fresh private tensor read from a weights file; ``evict`` drops the
    file's pages from the page cache, so the next read comes from the disk."""

    def __init__(self, path: str, entries, device: str | torch.device = "cpu"):
        self.path = path
        self.device = torch.device(device)
        self._entries = {name: e for e in entries for name in e.names}

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        return self._read(name, e.offset, self.nbytes(name)).view(dtype_from_name(e.dtype)).view(e.shape).to(self.device)

    def rows_of(self, name: str) -> "FileRows":
        e = self._entries[name]
        return FileRows(self, name, dtype_from_name(e.dtype), tuple(e.shape))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start``..``stop`` of ``name`` as (rows, row length); rows are the last
        dimension (a 1-D tensor is one row)."""
        e = self._entries[name]
        dtype, shape = dtype_from_name(e.dtype), tuple(e.shape)
        n_rows, row = row_shape(shape)
        stop = min(stop, n_rows)
        raw = self._read(name, e.offset + start * row * dtype.itemsize, max(0, stop - start) * row * dtype.itemsize)
        return raw.view(dtype).view(-1, row)

    def _read(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        raw = torch.empty(nbytes, dtype=torch.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view, done = memoryview(raw.numpy()), 0
            while done < len(view):  # preadv may return short
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"{self.path}: short read for {name}")
                done += n
        finally:
            os.close(fd)
        return raw

    def nbytes(self, name: str) -> int:
        e = self._entries[name]
        n = dtype_from_name(e.dtype).itemsize
        for d in e.shape:
            n *= d
        return n

    def evict(self, names) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for name in names:
                os.posix_fadvise(fd, self._entries[name].offset, self.nbytes(name), os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def row_shape(shape) -> tuple[int, int]:
    """(rows, row length) of a tensor sent in rows: the last dimension is a row (a 1-D or
    0-d tensor is one row)."""
    shape = tuple(shape)
    row = shape[-1] if len(shape) >= 2 else math.prod(shape)
    return math.prod(shape) // max(row, 1), row


class FileRows:
    """One tensor of a weights file, for ``menos.sections``: its dtype and shape, and its
    rows read a chunk at a time when asked (nothing kept in memory)."""

    def __init__(self, tensors: FileTensors, name: str, dtype: torch.dtype, shape: tuple[int, ...]):
        self.tensors, self.name, self.dtype, self.shape = tensors, name, dtype, shape

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensors.read_rows(self.name, start, stop)
