"""The parts every message is built from: the tagged base, a tensor frame's description,
and the shared block's handle (``menos.sharing``). Defined apart from the messages so that
the launcher's messages (``menos.launcher_messages``) can use them too."""

from __future__ import annotations

from typing import Optional

import msgspec


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    """Base of every message; ``type`` is the tag on the wire."""


# --------------------------------------------------------------------------- shared parts


class TensorMeta(msgspec.Struct, frozen=True, array_like=True):
    """Describes one raw tensor frame: dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]


class SharedEntry(msgspec.Struct, frozen=True, array_like=True):
    """One base tensor inside the shared block: name(s), dtype, shape, byte offset."""

    names: tuple[str, ...]  # tied weights share one entry
    dtype: str
    shape: tuple[int, ...]
    offset: int


class SharedHandle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a worker needs to map the manager's base weights without copying."""

    kind: str  # "cpu-shm" or "cuda-ipc"; "file": the vanilla baseline's private copies
    size: int  # bytes of the one shared block (or file)
    entries: tuple[SharedEntry, ...]
    segment: str = ""  # cpu-shm: the POSIX shared-memory name; file: its path
    cuda: Optional[dict] = None  # cuda-ipc: plain-data rebuild arguments (menos.sharing)
