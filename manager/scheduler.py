"""Memory-token scheduler: first-come-first-served with backfilling (paper, Algorithm 2).

Pure: no sockets, no torch, no clock (callers pass ``now``). Event-driven: ``request``,
``release`` and ``device_free`` return the decisions they make possible. Schedule: if
the head of the waiting list fits, grant it, then every later request that fits
(backfill); if the head does not fit, grant nothing, so a large backward is never
starved by a stream of small ones. Waiting requests are grouped by size (clients ask
a few distinct sizes: M_f, M_b, a vanilla task), so a backfill pass costs
O(distinct sizes) per grant, not O(waiting).

Memory the scheduler does not own. ``device_free(nbytes)`` feeds a reading of the
device's free memory (NVML on CUDA, the machine's available memory on CPU): other
programs, the workers' CUDA contexts and allocator caches all count. A reading is a
snapshot: grants made after it, and grants made since the reading before it (they
may not be allocated yet), are charged against it; releases are credited back (their
holders returned the memory). So what is granted on one reading, net of releases,
never exceeds it: at any time ``used <= reading + held at that reading`` and ``used
<= capacity``. The caller samples on a timer while anyone waits, so a head blocked by
outside use is granted as soon as that use drops.

``exclusive`` requests (a retry after running out of memory) are granted only as the
head, only when no other grant is outstanding, and get all the memory free then. A
head that cannot fit while nothing at all is granted (outside use holds the memory)
is refused after ``give_up_s``: a clear error, not an endless wait.

``backfill="easy"`` (EASY backfilling) also lets a request pass a blocked head, but
only if it cannot delay it: it ends, by its expected compute time, before the head's
reserved start (the "shadow" time when enough running grants will have ended), or it
fits in what will be left over at that time. Outside use has no known end: while it
is what blocks the head, nothing passes.

The adaptive policy's choice lives here too, where the free memory is known: a request
may name a larger ``preserve_nbytes`` (enough to keep its activations until the
backward); it is asked for instead when memory is plentiful (nobody waits and a
quarter of the capacity stays free), and its grant says so.

Grants can be marked *reclaimable* (adaptive policy: a finished forward that keeps its
activations while its client computes; vanilla: a resident task). When the head is
blocked, ``to_reclaim`` names the reclaimable grants whose release would let it in;
their holders drop what they keep and release.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

Key = tuple[str, int]  # (owner, request id)

PLENTIFUL_RESERVE = 0.25  # adaptive: keep activations only while this share of the capacity stays free
GIVE_UP_S = 30.0  # a head that outside use alone keeps out this long is refused


class TooLarge(ValueError):
    """A request that cannot fit even an empty server."""


@dataclass(frozen=True)
class Grant:
    owner: str
    request_id: int
    nbytes: int
    preserve: bool = False  # adaptive: granted the larger size, to keep the activations


@dataclass(frozen=True)
class Refusal:
    """A waiting request given up on: the memory it needs is held outside the scheduler."""

    owner: str
    request_id: int
    reason: str


Decision = Grant | Refusal


@dataclass
class _Entry:
    nbytes: int
    expected_s: float
    preserve: bool = False
    exclusive: bool = False
    seq: int = 0  # arrival order
    start: float = 0.0  # when granted
    reading: int = 0  # the device reading it was granted under
    reclaimable: bool = False
    reclaiming: bool = False  # its holder was asked to release
    busy: bool = False  # reclaimable, but its holder frees it only when it finishes computing
    stuck_since: float | None = None  # head, nothing granted, still does not fit


class Scheduler:
    def __init__(self, capacity: int, backfill: str = "fcfs", give_up_s: float = GIVE_UP_S):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if backfill not in ("fcfs", "easy"):
            raise ValueError(f"unknown backfill {backfill!r}: fcfs or easy")
        self.capacity = capacity
        self.backfill = backfill
        self.give_up_s = give_up_s
        self.granted: dict[Key, _Entry] = {}
        self.waiting: OrderedDict[Key, _Entry] = OrderedDict()  # arrival order
        self._buckets: dict[int, OrderedDict[Key, _Entry]] = {}  # size -> its waiting requests, in order
        self._seq = itertools.count()
        self.used = 0
        # The last device reading (None: none yet, no cap) and the bytes charged against it.
        self.reading: int | None = None
        self.charged = 0
        self._readings = 0  # how many readings so far (a grant remembers the one it came under)
        self._exclusive_held = 0
        # Each session's standing memory (held for its life outside any token) and its largest token.
        self.standing: dict[str, tuple[int, int]] = {}
        self.standing_total = 0

    @property
    def device_room(self) -> int | None:
        """What the last device reading still allows, net of what was granted since."""
        return None if self.reading is None else self.reading - self.charged

    @property
    def free(self) -> int:
        free = self.capacity - self.standing_total - self.used
        room = self.device_room
        return free if room is None else max(0, min(free, room))

    def check(self, nbytes: int) -> None:
        """Raise TooLarge for a size that could never be granted."""
        if nbytes < 0:
            raise ValueError("negative request")
        if nbytes > self.capacity - self.standing_total:
            raise TooLarge(f"needs {nbytes} bytes, the server's capacity is {self.capacity}"
                           + (f", {self.standing_total} of it held by the sessions' standing memory"
                              if self.standing_total else ""))  # fmt: skip

    def room_for(self, standing: int, token: int) -> bool:
        """Whether one more session holding ``standing`` bytes for its life still leaves
        every session's largest token (``token`` for this one) room to be granted."""
        largest = max([token, *(t for _, t in self.standing.values())])
        return self.standing_total + standing + largest <= self.capacity

    def reserve(self, owner: str, standing: int, token: int) -> None:
        """Hold ``owner``'s standing memory until ``drop_owner``; TooLarge if there is no room."""
        if owner in self.standing:
            raise ValueError(f"{owner} already holds standing memory")
        if not self.room_for(standing, token):
            raise TooLarge(f"with its standing memory ({standing} bytes) does not fit beside the other sessions' "
                           f"({self.standing_total} of {self.capacity} bytes)")  # fmt: skip
        self.standing[owner] = (standing, token)
        self.standing_total += standing

    # ---------------------------------------------------------------- events

    def request(
        self, owner: str, request_id: int, nbytes: int, now: float = 0.0, expected_s: float = 0.0,
        preserve_nbytes: int = 0, exclusive: bool = False,
    ) -> list[Decision]:  # fmt: skip
        """Queue a request of ``nbytes``, or of ``preserve_nbytes`` if memory is plentiful now;
        ``exclusive``: at least ``nbytes``, alone on the device (see the module's docstring)."""
        self.check(nbytes)
        key = (owner, request_id)
        if key in self.granted or key in self.waiting:
            raise ValueError(f"duplicate request {key}")
        preserve = bool(preserve_nbytes) and not exclusive and self.plentiful(preserve_nbytes)
        entry = _Entry(preserve_nbytes if preserve else nbytes, expected_s, preserve, exclusive, next(self._seq))
        self.waiting[key] = entry
        if not exclusive:  # exclusive requests are never backfilled
            self._buckets.setdefault(entry.nbytes, OrderedDict())[key] = entry
        return self._schedule(now)

    def release(self, owner: str, request_id: int, now: float = 0.0) -> list[Decision]:
        entry = self.granted.pop((owner, request_id), None)
        if entry is None:
            raise KeyError(f"release of a request not granted: {(owner, request_id)}")
        self._free(entry)
        return self._schedule(now)

    def drop_owner(self, owner: str, now: float = 0.0) -> list[Decision]:
        """Reclaim everything ``owner`` holds or waits for (it died or left)."""
        for key in [k for k in self.granted if k[0] == owner]:
            self._free(self.granted.pop(key))
        for key in [k for k in self.waiting if k[0] == owner]:
            self._unqueue(key)
        standing, _ = self.standing.pop(owner, (0, 0))
        self.standing_total -= standing
        return self._schedule(now)

    def device_free(self, nbytes: int, now: float = 0.0) -> list[Decision]:
        """A new reading of the device's free memory. Grants made since the previous
        reading may not be allocated yet, so they stay charged against this one."""
        self._readings += 1
        self.reading = max(0, nbytes)
        self.charged = sum(e.nbytes for e in self.granted.values() if e.reading == self._readings - 1)
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
        first; an exclusive head needs all of them); [] if none helps."""
        if not self.waiting:
            return []
        head = next(iter(self.waiting.values()))
        reclaimable = sorted((kv for kv in self.granted.items() if kv[1].reclaimable and not kv[1].reclaiming),
                             key=lambda kv: (kv[1].busy, kv[1].start))  # fmt: skip
        if head.exclusive:
            picked = [key for key, _ in reclaimable]
        else:
            short = head.nbytes - self.free - sum(e.nbytes for e in self.granted.values() if e.reclaiming)
            if short <= 0:
                return []
            picked = []
            for key, e in reclaimable:
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

    def _free(self, entry: _Entry) -> None:
        self._exclusive_held -= entry.exclusive
        self.used -= entry.nbytes
        self.charged -= entry.nbytes  # its holder returned the memory: credit the reading

    def _unqueue(self, key: Key) -> _Entry:
        entry = self.waiting.pop(key)
        bucket = self._buckets.get(entry.nbytes)
        if bucket is not None and bucket.pop(key, None) is not None and not bucket:
            del self._buckets[entry.nbytes]
        return entry

    def _grant(self, key: Key, entry: _Entry, now: float, out: list[Decision]) -> None:
        self._unqueue(key)
        if entry.exclusive:
            entry.nbytes = max(entry.nbytes, self.free)  # all there is: nobody else allocates meanwhile
        entry.start, entry.reading = now, self._readings
        self.granted[key] = entry
        self.used += entry.nbytes
        self.charged += entry.nbytes
        self._exclusive_held += entry.exclusive
        out.append(Grant(key[0], key[1], entry.nbytes, entry.preserve))

    def _fits(self, entry: _Entry) -> bool:
        if self._exclusive_held:
            return False  # an exclusive grant computes alone
        return entry.nbytes <= self.free and (not entry.exclusive or not self.granted)

    def _schedule(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        if not self.waiting:
            return out
        head_key, head = next(iter(self.waiting.items()))
        if self._fits(head):
            self._grant(head_key, head, now, out)
            self._backfill_in_order(now, out)
            return out
        if self.granted:
            head.stuck_since = None  # grants will end and return memory
        elif head.stuck_since is None:
            head.stuck_since = now
        elif now - head.stuck_since >= self.give_up_s:
            self._unqueue(head_key)
            out.append(Refusal(head_key[0], head_key[1],
                               f"needs {head.nbytes} bytes; for {self.give_up_s:.0f} s with nothing granted the "
                               f"device had at most {self.free} free (other programs hold the rest)"))  # fmt: skip
            return out + self._schedule(now)
        if self.backfill == "easy" and not self._outside_use_blocks(head):
            self._easy_backfill(head, now, out)
        return out

    def _backfill_in_order(self, now: float, out: list[Decision]) -> None:
        """Grant, in arrival order, every waiting request that fits: at each step the
        earliest front among the size buckets that fit (free only shrinks, so a request
        skipped once never fits later in the pass)."""
        while self._buckets and not self._exclusive_held:
            free = self.free
            fronts = [next(iter(b.items())) for size, b in self._buckets.items() if size <= free]
            if not fronts:
                return
            key, entry = min(fronts, key=lambda kv: kv[1].seq)
            self._grant(key, entry, now, out)

    def _outside_use_blocks(self, head: _Entry) -> bool:
        """The head would fit the capacity but not the device: others' memory, of unknown duration."""
        return head.nbytes <= self.capacity - self.standing_total - self.used and head.nbytes > self.free

    def _easy_backfill(self, head: _Entry, now: float, out: list[Decision]) -> None:
        # Shadow time: when running grants, ending in expected order, free enough for the head.
        shadow, extra = float("inf"), 0
        avail = self.free
        for e in sorted(self.granted.values(), key=lambda e: e.start + e.expected_s):
            avail += e.nbytes
            if avail >= head.nbytes:
                shadow, extra = e.start + e.expected_s, avail - head.nbytes
                break
        picked, free = [], self.free
        smallest = min(self._buckets, default=None)  # a pass stops once not even the smallest fits
        if self._exclusive_held or smallest is None or free < smallest:
            return
        for i, (key, entry) in enumerate(self.waiting.items()):
            if free < smallest:
                break
            if i == 0 or entry.exclusive or entry.nbytes > free:
                continue
            if now + entry.expected_s <= shadow:  # done before the head's start
                ok = True
            elif entry.nbytes <= extra:  # still running then, in memory the head won't need
                extra -= entry.nbytes
                ok = True
            else:
                ok = False
            if ok:
                picked.append((key, entry))
                free -= entry.nbytes
        for key, entry in picked:
            self._grant(key, entry, now, out)
