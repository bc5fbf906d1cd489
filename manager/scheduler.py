"""Memory-token scheduler: first-come-first-served with backfilling (paper, Algorithm 2).

Pure: no sockets, no torch, no clock. Event-driven: ``request`` and ``release``
return the grants they make possible. Schedule: if the head of the waiting list
fits, grant it, then every later request that fits (backfill); if the head does not
fit, grant nothing, so a large backward is never starved by a stream of small ones.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

Key = tuple[str, int]  # (owner, request id)


class TooLarge(ValueError):
    """A request that cannot fit even an empty server."""


@dataclass(frozen=True)
class Grant:
    owner: str
    request_id: int
    nbytes: int


class Scheduler:
    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.granted: dict[Key, int] = {}
        self.waiting: OrderedDict[Key, int] = OrderedDict()

    @property
    def used(self) -> int:
        return sum(self.granted.values())

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def check(self, nbytes: int) -> None:
        """Raise TooLarge for a size that could never be granted."""
        if nbytes > self.capacity:
            raise TooLarge(f"needs {nbytes} bytes, the server's capacity is {self.capacity}")
        if nbytes < 0:
            raise ValueError("negative request")

    def request(self, owner: str, request_id: int, nbytes: int) -> list[Grant]:
        self.check(nbytes)
        key = (owner, request_id)
        if key in self.granted or key in self.waiting:
            raise ValueError(f"duplicate request {key}")
        self.waiting[key] = nbytes
        return self._schedule()

    def release(self, owner: str, request_id: int) -> list[Grant]:
        if self.granted.pop((owner, request_id), None) is None:
            raise KeyError(f"release of a request not granted: {(owner, request_id)}")
        return self._schedule()

    def drop_owner(self, owner: str) -> list[Grant]:
        """Reclaim everything ``owner`` holds or waits for (it died or left)."""
        for table in (self.granted, self.waiting):
            for key in [k for k in table if k[0] == owner]:
                del table[key]
        return self._schedule()

    def _schedule(self) -> list[Grant]:
        grants = []
        free = self.free
        for i, (key, nbytes) in enumerate(list(self.waiting.items())):
            if nbytes <= free:
                del self.waiting[key]
                self.granted[key] = nbytes
                free -= nbytes
                grants.append(Grant(key[0], key[1], nbytes))
            elif i == 0:
                break  # the head does not fit: hold everyone behind it
        return grants
