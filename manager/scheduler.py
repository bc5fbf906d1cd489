"""Memory-token scheduler: first-come-first-served with backfilling (paper, Algorithm 2).

Pure: no sockets, no torch, no clock (callers pass ``now``). Event-driven: ``request``
and ``release`` return the grants they make possible. Schedule: if the head of the
waiting list fits, grant it, then every later request that fits (backfill); if the
head does not fit, grant nothing, so a large backward is never starved by a stream
of small ones.

``backfill="easy"`` (EASY backfilling) also lets a request pass a blocked head, but
only if it cannot delay it: it ends, by its expected compute time, before the head's
reserved start (the "shadow" time when enough running grants will have ended), or it
fits in what will be left over at that time.

The adaptive policy's choice lives here too, where the free memory is known: a request
may name a larger ``preserve_nbytes`` (enough to keep its activations until the
backward); it is asked for instead when memory is plentiful (nobody waits and a
quarter of the capacity stays free), and its grant says so.

Grants can be marked *reclaimable* (adaptive policy: a finished forward that keeps its
activations while its client computes). When the head is blocked, ``to_reclaim``
names the reclaimable grants whose release would let it in; their holders drop the
activations and release, and recompute later.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

Key = tuple[str, int]  # (owner, request id)


class TooLarge(ValueError):
    """A request that cannot fit even an empty server."""


PLENTIFUL_RESERVE = 0.25  # adaptive: keep activations only while this share of the capacity stays free


@dataclass(frozen=True)
class Grant:
    owner: str
    request_id: int
    nbytes: int
    preserve: bool = False  # adaptive: granted the larger size, to keep the activations


@dataclass
class _Entry:
    nbytes: int
    expected_s: float
    preserve: bool = False
    start: float = 0.0  # when granted
    reclaimable: bool = False
    reclaiming: bool = False  # its holder was asked to release
    busy: bool = False  # reclaimable, but its holder frees it only when it finishes computing


class Scheduler:
    def __init__(self, capacity: int, backfill: str = "fcfs"):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if backfill not in ("fcfs", "easy"):
            raise ValueError(f"unknown backfill {backfill!r}: fcfs or easy")
        self.capacity = capacity
        self.backfill = backfill
        self.granted: dict[Key, _Entry] = {}
        self.waiting: OrderedDict[Key, _Entry] = OrderedDict()
        self.used = 0
        # Sizes of waiting requests (few distinct: each client asks M_f or M_b), so a
        # pass can stop as soon as not even the smallest fits.
        self._sizes: Counter[int] = Counter()
        # Memory others took outside the scheduler (CUDA: from NVML); caps every grant.
        self.external_free: int | None = None

    @property
    def free(self) -> int:
        free = self.capacity - self.used
        return free if self.external_free is None else min(free, self.external_free)

    def check(self, nbytes: int) -> None:
        """Raise TooLarge for a size that could never be granted."""
        if nbytes < 0:
            raise ValueError("negative request")
        if nbytes > self.capacity:
            raise TooLarge(f"needs {nbytes} bytes, the server's capacity is {self.capacity}")

    # ---------------------------------------------------------------- events

    def request(
        self, owner: str, request_id: int, nbytes: int, now: float = 0.0, expected_s: float = 0.0,
        preserve_nbytes: int = 0,
    ) -> list[Grant]:  # fmt: skip
        """Queue a request of ``nbytes``, or of ``preserve_nbytes`` if memory is plentiful now."""
        self.check(nbytes)
        key = (owner, request_id)
        if key in self.granted or key in self.waiting:
            raise ValueError(f"duplicate request {key}")
        preserve = bool(preserve_nbytes) and self.plentiful(preserve_nbytes)
        entry = _Entry(preserve_nbytes if preserve else nbytes, expected_s, preserve)
        self.waiting[key] = entry
        self._sizes[entry.nbytes] += 1
        return self._schedule(now)

    def release(self, owner: str, request_id: int, now: float = 0.0) -> list[Grant]:
        entry = self.granted.pop((owner, request_id), None)
        if entry is None:
            raise KeyError(f"release of a request not granted: {(owner, request_id)}")
        self.used -= entry.nbytes
        return self._schedule(now)

    def drop_owner(self, owner: str, now: float = 0.0) -> list[Grant]:
        """Reclaim everything ``owner`` holds or waits for (it died or left)."""
        for key in [k for k in self.granted if k[0] == owner]:
            self.used -= self.granted.pop(key).nbytes
        for key in [k for k in self.waiting if k[0] == owner]:
            self._unqueue(key)
        return self._schedule(now)

    def set_reclaimable(self, owner: str, request_id: int, busy: bool = False) -> None:
        """Mark a grant reclaimable; ``busy`` ones are picked only after idle ones. A Reclaim
        already sent stays in force (its holder honours it when it can)."""
        entry = self.granted.get((owner, request_id))
        if entry is not None:
            entry.reclaimable = True
            entry.busy = busy

    def to_reclaim(self) -> list[Key]:
        """Reclaimable grants to release so the blocked head fits (idle before busy, oldest
        first); [] if none helps."""
        if not self.waiting:
            return []
        head = next(iter(self.waiting.values()))
        short = head.nbytes - self.free - sum(e.nbytes for e in self.granted.values() if e.reclaiming)
        if short <= 0:
            return []
        picked = []
        for key, e in sorted(self.granted.items(), key=lambda kv: (kv[1].busy, kv[1].start)):
            if e.reclaimable and not e.reclaiming:
                picked.append(key)
                short -= e.nbytes
                if short <= 0:
                    break
        if short > 0:
            return []  # even all of them would not let the head in: keep the activations
        for key in picked:
            self.granted[key].reclaiming = True
        return picked

    def plentiful(self, nbytes: int) -> bool:
        """Adaptive policy: nobody waits and ``nbytes`` leaves PLENTIFUL_RESERVE of the capacity free."""
        return not self.waiting and self.free - nbytes >= PLENTIFUL_RESERVE * self.capacity

    # ---------------------------------------------------------------- decision

    def _unqueue(self, key: Key) -> _Entry:
        entry = self.waiting.pop(key)
        self._sizes[entry.nbytes] -= 1
        if not self._sizes[entry.nbytes]:
            del self._sizes[entry.nbytes]
        return entry

    def _smallest_waiting(self) -> int:
        return min(self._sizes) if self._sizes else 0

    def _grant(self, key: Key, entry: _Entry, now: float, grants: list[Grant]) -> None:
        self._unqueue(key)
        entry.start = now
        self.granted[key] = entry
        self.used += entry.nbytes
        grants.append(Grant(key[0], key[1], entry.nbytes, entry.preserve))

    def _schedule(self, now: float) -> list[Grant]:
        grants: list[Grant] = []
        if not self.waiting:
            return grants
        head_key, head = next(iter(self.waiting.items()))
        if head.nbytes <= self.free:
            self._grant(head_key, head, now, grants)
        elif self.backfill == "fcfs":
            return grants  # the head does not fit: hold everyone behind it
        else:
            return self._easy_backfill(head, now)
        return grants + self._backfill(lambda entry: True, now)

    def _backfill(self, allowed, now: float, skip_head: bool = False) -> list[Grant]:
        """Grant, in arrival order, every waiting request that fits and ``allowed`` accepts."""
        free = self.free
        picked = []
        if self.waiting and free >= self._smallest_waiting():
            for i, (key, entry) in enumerate(self.waiting.items()):
                if (i or not skip_head) and entry.nbytes <= free and allowed(entry):
                    picked.append((key, entry))
                    free -= entry.nbytes
                    if free < self._smallest_waiting():
                        break
        grants: list[Grant] = []
        for key, entry in picked:
            self._grant(key, entry, now, grants)
        return grants

    def _easy_backfill(self, head: _Entry, now: float) -> list[Grant]:
        # Shadow time: when running grants, ending in expected order, free enough for the head.
        shadow, extra = float("inf"), 0
        avail = self.free
        for e in sorted(self.granted.values(), key=lambda e: e.start + e.expected_s):
            avail += e.nbytes
            if avail >= head.nbytes:
                shadow, extra = e.start + e.expected_s, avail - head.nbytes
                break
        extra = [extra]

        def cannot_delay_head(entry: _Entry) -> bool:
            if now + entry.expected_s <= shadow:
                return True  # done before the head's start
            if entry.nbytes <= extra[0]:
                extra[0] -= entry.nbytes  # still running then, in memory the head won't need
                return True
            return False

        return self._backfill(cannot_delay_head, now, skip_head=True)
