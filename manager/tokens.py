"""The manager's memory-token desk: worker token messages in, scheduler decisions out.

It feeds the pure scheduler, keeps each session's grant telemetry, the Prometheus
metrics and the ``--trace`` file, and returns the messages to send (grants, refusals,
reclaims) as ``(session, message)`` pairs: no sockets here.

It also owns the device readings (``tick``): free memory is sampled on a timer, every
SAMPLE_WAITING_S while anyone waits and every SAMPLE_IDLE_S otherwise, and fed to the
scheduler as an event of its own, so a head blocked by outside use wakes without any
message arriving. A reading that fails is logged and skipped: it never costs a
request or a release.
"""

from __future__ import annotations

import json
import logging

from manager.capacity import DeviceMemory
from manager.metrics import Metrics
from manager.scheduler import Decision, Grant, Scheduler, TooLarge
from manager.sessions import Session
from menos.messages import (Reclaim, SessionState, TokenGrant, TokenHold, TokenRefused, TokenRelease,
                            TokenRequest)  # fmt: skip

log = logging.getLogger("menos.manager")

SAMPLE_WAITING_S = 0.1
SAMPLE_IDLE_S = 1.0

Outbox = list[tuple[Session, object]]


class TokenDesk:
    def __init__(self, scheduler: Scheduler, sessions: dict[str, Session], metrics: Metrics, devmem: DeviceMemory,
                 trace_file=None):  # fmt: skip
        self.scheduler = scheduler
        self.sessions = sessions
        self.metrics = metrics
        self.devmem = devmem
        self.trace_file = trace_file
        self._sampled = float("-inf")
        self._reading_failed = False

    def tick(self, now: float) -> Outbox:
        """Sample the device's free memory if it is time (see the module's docstring)."""
        period = SAMPLE_WAITING_S if self.scheduler.waiting else SAMPLE_IDLE_S
        if now - self._sampled < period:
            return []
        self._sampled = now
        try:
            free = self.devmem.free()
        except Exception as exc:  # noqa: BLE001  NVML can fail; keep the last reading
            if not self._reading_failed:
                log.warning("free-memory reading failed (%s); keeping the last one", exc)
            self._reading_failed = True
            return []
        self._reading_failed = False
        decisions = self.scheduler.device_free(free, now)
        self._trace(now, "reading", "", 0, free)
        return self._schedule(now, decisions)

    def request(self, s: Session, msg: TokenRequest, now: float) -> Outbox:
        if msg.retry:
            s.oom_retries += 1
            self.metrics.oom_retries.inc()
            log.warning("session %s ran out of memory; retrying under an exclusive grant", s.sid)
        s.asked(msg.request_id, msg.kind, now)
        self._trace(now, "request", s.sid, msg.request_id, msg.nbytes, msg.kind.value)
        try:
            grants = self.scheduler.request(s.sid, msg.request_id, msg.nbytes, now, msg.expected_s,
                                            msg.preserve_nbytes, exclusive=msg.retry)  # fmt: skip
        except TooLarge as exc:  # a generation's cache larger than the server (M_f, M_b are checked at ready)
            s.refused(msg.request_id)
            log.warning("session %s: request %d refused: %s", s.sid, msg.request_id, exc)
            return [(s, TokenRefused(request_id=msg.request_id, reason=str(exc)))]
        return self._schedule(now, grants)

    def release(self, s: Session, msg: TokenRelease, now: float) -> Outbox:
        held = s.released(msg.request_id, now)
        self.metrics.releases.inc()
        self.metrics.compute_seconds.observe(held)
        grants = self.scheduler.release(s.sid, msg.request_id, now)
        self._trace(now, "release", s.sid, msg.request_id, 0)
        return self._schedule(now, grants)

    def hold(self, s: Session, msg: TokenHold, now: float) -> Outbox:
        s.token_state(SessionState.COMPUTING if msg.busy else SessionState.HOLDING)
        self.scheduler.set_reclaimable(s.sid, msg.request_id, busy=msg.busy)
        return self._schedule(now, [])

    def drop(self, s: Session, now: float) -> Outbox:
        """The session's worker is gone: everything it held or waited for returns."""
        return self._schedule(now, self.scheduler.drop_owner(s.sid, now))

    def parking(self, s: Session, now: float, event: str, seconds: float = 0.0) -> None:
        """A park or a wake (manager.parking), in the trace beside the grants it brings."""
        self._trace(now, event, s.sid, 0, 0, seconds=seconds)

    def _schedule(self, now: float, decisions: list[Decision]) -> Outbox:
        """The grants and refusals an event made, and reclaims that make room for a blocked head."""
        out: Outbox = []
        for g in decisions:
            s = self.sessions[g.owner]
            if not isinstance(g, Grant):  # a refusal: outside use holds what it needs
                s.refused(g.request_id)
                log.warning("session %s: request %d refused: %s", s.sid, g.request_id, g.reason)
                self._trace(now, "refuse", g.owner, g.request_id, 0)
                out.append((s, TokenRefused(request_id=g.request_id, reason=g.reason)))
                continue
            kind, queued = s.granted(g.request_id, now, g.nbytes)
            self.metrics.grants.labels(kind.value).inc()
            self.metrics.queue_seconds.observe(queued)
            self._trace(now, "grant", g.owner, g.request_id, g.nbytes, kind.value)
            out.append((s, TokenGrant(request_id=g.request_id, nbytes=g.nbytes, preserve=g.preserve)))
        self.metrics.granted.set(self.scheduler.used)
        self.metrics.queued.set(len(self.scheduler.waiting))
        for owner, rid in self.scheduler.to_reclaim():
            s = self.sessions[owner]
            s.reclaims += 1
            self.metrics.reclaims.inc()
            self._trace(now, "reclaim", owner, rid, 0)
            out.append((s, Reclaim(request_id=rid)))
        return out

    def _trace(self, now: float, event: str, owner: str, rid: int, nbytes: int, kind: str = "", **extra) -> None:
        if self.trace_file is not None:
            rec = {"t": now, "event": event, "session": owner, "request_id": rid, "nbytes": nbytes, "kind": kind,
                   "used": self.scheduler.used, "capacity": self.scheduler.capacity,
                   "waiting": len(self.scheduler.waiting), **extra}  # fmt: skip
            self.trace_file.write(json.dumps(rec) + "\n")
            self.trace_file.flush()
