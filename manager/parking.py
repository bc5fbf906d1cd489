"""Worker slots: which sessions have a worker process, which park, who waits for one.

Pure: no sockets, no processes, no clock (callers pass ``now``), so every choice is
tested without either. A session and its worker are decoupled: an idle session can
*park* (its worker saves the session's state and exits, ``worker.main``) and a request
for it *wakes* it (a fresh worker restores that state, without profiling again).

- ``--park-after S``: a live session whose client has sent no request for S seconds
  parks (``tick``).
- ``--max-workers N``: at most N worker processes at once, counting those starting and
  those parking until they exit. A session that needs a worker (a new one, or a parked
  one that got a request) takes a free slot, or waits for one in first-come order, as
  memory tokens do; while anyone waits, the least recently used idle session is parked
  for it, one per waiter.

Whether a session may park now is the caller's (``parkable``: idle, no grant held, no
open generation, ...); its worker has the last word and may decline (``declined``: a
forward kept for its backward, a clipped step waiting), after which it is not asked
again until its client sends another request.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from menos.vocabulary import SessionState


@dataclass(frozen=True)
class Start:
    """Start a worker for this session (a new one, or a parked one's wake)."""

    sid: str


@dataclass(frozen=True)
class Park:
    """Tell this session's worker to park."""

    sid: str


Decision = Start | Park
Parkable = Callable[[str], bool]


class WorkerSlots:
    def __init__(self, max_workers: int = 0, park_after: float = 0.0):
        if max_workers < 0 or park_after < 0:
            raise ValueError("max_workers and park_after must be >= 0 (0: no cap, never park when idle)")
        self.max_workers = max_workers  # 0: no cap
        self.park_after = park_after  # 0: never park for idleness
        self.live: OrderedDict[str, float] = OrderedDict()  # sid -> last request; least recent first
        self.parking: set[str] = set()  # told to park, process not yet gone (still holds its slot)
        self.declined: set[str] = set()  # declined to park since their last request
        self.waiting: OrderedDict[str, float] = OrderedDict()  # sid -> since when, first come first
        # Whether a waiter's memory fits now (a parked one's standing memory, which others may have
        # taken); one that does not waits (those behind it that fit go first), and idle sessions
        # park to make room.
        self.fits: Callable[[str], bool] = lambda sid: True

    @property
    def parks(self) -> bool:
        """Whether sessions ever park here."""
        return bool(self.max_workers or self.park_after)

    def _free(self) -> bool:
        return not self.max_workers or len(self.live) < self.max_workers

    def want(self, sid: str, now: float, parkable: Parkable) -> list[Decision]:
        """``sid`` needs a worker: a slot now, or a place in the queue."""
        if sid in self.live or sid in self.waiting:
            raise ValueError(f"session {sid} already has a worker or waits for one")
        self.waiting[sid] = now
        return self._assign(now, parkable)

    def touched(self, sid: str, now: float) -> None:
        """A request from ``sid``'s client: most recently used now, and asked again when idle."""
        if sid in self.live:
            self.live[sid] = now
            self.live.move_to_end(sid)
        self.declined.discard(sid)

    def declined_to_park(self, sid: str, now: float, parkable: Parkable) -> list[Decision]:
        self.parking.discard(sid)
        self.declined.add(sid)
        return self._assign(now, parkable)  # a waiter needs someone else

    def exited(self, sid: str, now: float, parkable: Parkable) -> list[Decision]:
        """``sid``'s worker process is gone (parked, ended, died): its slot is free."""
        self.live.pop(sid, None)
        self.parking.discard(sid)
        self.declined.discard(sid)
        return self._assign(now, parkable)

    def forget(self, sid: str, now: float, parkable: Parkable) -> list[Decision]:
        """The session ended: out of the queue, and its slot (if any) free."""
        self.waiting.pop(sid, None)
        return self.exited(sid, now, parkable)

    def tick(self, now: float, parkable: Parkable) -> list[Decision]:
        """Park the sessions idle for ``park_after``; serve waiters."""
        out: list[Decision] = []
        if self.park_after:
            for sid, last in self.live.items():
                if now - last < self.park_after:
                    break  # least recent first: the rest are more recent still
                if sid not in self.parking and sid not in self.declined and parkable(sid):
                    self.parking.add(sid)
                    out.append(Park(sid))
        return out + self._assign(now, parkable)

    def queued_s(self, sid: str, now: float) -> float:
        return now - self.waiting[sid] if sid in self.waiting else 0.0

    def _assign(self, now: float, parkable: Parkable) -> list[Decision]:
        out: list[Decision] = []
        for sid in list(self.waiting):  # in order; one whose memory does not fit yet is passed
            if not self._free():
                break
            if self.fits(sid):
                del self.waiting[sid]
                self.live[sid] = now  # a fresh worker counts as just used: it serves a request now
                out.append(Start(sid))
        short = len(self.waiting) - len(self.parking)  # slots (or memory) missing once the parking ones exit
        for sid in self.live:
            if short <= 0:
                break
            if sid not in self.parking and sid not in self.declined and parkable(sid):
                self.parking.add(sid)
                out.append(Park(sid))
                short -= 1
        return out


# --------------------------------------------------------------------------- a client's request meanwhile


class Route(str, enum.Enum):
    FORWARD = "forward"  # to the session's live worker
    HOLD = "hold"  # kept, in order, for the worker that will take it (the session parks or wakes)
    WAKE = "wake"  # kept, and the parked session woken for it
    END = "end"  # a goodbye to a parked session: it ends there, never woken
    DROP = "drop"  # nothing to do (a generation's end: no session parks with one open)


_WITHOUT_WORKER = (SessionState.PARKING, SessionState.PARKED, SessionState.WAKING)


def route(state: SessionState, goodbye: bool, generation_end: bool, held: int) -> Route:
    """What a client's request does, given its session's state and the requests already held."""
    if state not in _WITHOUT_WORKER:
        return Route.FORWARD
    if generation_end:  # kept behind a held prompt; else no generation is open
        return Route.HOLD if held else Route.DROP
    if state is SessionState.PARKED:
        return Route.END if goodbye and not held else Route.WAKE
    return Route.HOLD


def after_parking(held_goodbye_first: bool, held: int) -> Route | None:
    """A session's worker has parked and exited: what the requests held meanwhile do (None:
    none came; it stays parked)."""
    if not held:
        return None
    return Route.END if held_goodbye_first else Route.WAKE
