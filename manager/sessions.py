"""One client session as the manager sees it: its worker, its cut, its tokens, its telemetry."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

from manager.workers import WorkerHandle
from menos.cut import Cut
from menos.messages import Hello, ParkedState, SessionState, TokenKind


def checkpoint_dir(state_dir: str, identity: str) -> str:
    """Where an identity's checkpoints live; hashed, since keys hold '/' and the like."""
    return os.path.join(state_dir, "checkpoints", hashlib.sha256(identity.encode()).hexdigest()[:32])


def park_dir(checkpoints: str) -> str:
    """Where a session parks (manager.parking): beside its checkpoints, so that its state
    outlives the manager's run and a resume can start from it."""
    return os.path.join(checkpoints, "parked")


def server_steps(checkpoints: str, steps_of=None) -> list[int]:
    """The steps a session can resume from: its checkpoints' and its parked state's."""
    from menos import checkpoint

    steps_of = steps_of or checkpoint.steps
    return sorted(set(steps_of(checkpoints)) | set(steps_of(park_dir(checkpoints))))


@dataclass
class Session:
    sid: str
    client: bytes  # the client's routing id on the client socket
    hello: Hello
    cut: Cut
    m_f: int  # the tokens it asks for: the admission estimate until the worker's profile
    m_b: int
    proc: WorkerHandle | None  # None while parked or waiting for a worker slot (manager.parking)
    identity: str = ""  # whose checkpoints these are ("" for an anonymous client)
    checkpoint_dir: str = ""
    resume_step: int = -1
    state: SessionState = SessionState.STARTING
    persistent_bytes: int = 0
    standing_bytes: int = 0  # held for the session's life, outside any token
    steps: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    sections: list | None = None  # the client's base tensors, until it has fetched them (menos.sections)
    successor: tuple | None = None  # (routing id, Hello, user) of the same identity, waiting for this worker to exit
    # telemetry: requests served, total seconds queued and holding grants
    requests: int = 0
    queue_s: float = 0.0
    compute_s: float = 0.0
    reclaims: int = 0
    oom_retries: int = 0
    cache: tuple[int, int] | None = None  # an open generation's grant: (request id, bytes)
    # parking (manager.parking): the parked state, the client requests held while there is no
    # worker to take them, when the first of them came, and deaths of workers waking it
    parked: ParkedState | None = None
    held: list = field(default_factory=list)  # (message, frames) in arrival order
    wake_since: float = 0.0
    wake_deaths: int = 0
    park_sent: float = 0.0  # when its worker was told to park (or, past the deadline, stopped)
    park_stops: int = 0  # signals sent to a worker that did not park in time
    _asked: dict = field(default_factory=dict)  # request id -> (time asked, kind)
    _granted_at: dict = field(default_factory=dict)  # request id -> time granted

    @property
    def ended(self) -> bool:
        return self.state in (SessionState.CLOSING, SessionState.FAILED)

    @property
    def parkable(self) -> bool:
        """Idle as the manager sees it: a live worker, no grant, no open generation, nothing held
        back (the worker checks the rest: manager.parking)."""
        return self.proc is not None and self.state is SessionState.IDLE and self.cache is None and not self.held

    def asked(self, request_id: int, kind: TokenKind, now: float) -> None:
        self._asked[request_id] = (now, kind)
        self.token_state(SessionState.WAITING)

    def granted(self, request_id: int, now: float, nbytes: int = 0) -> tuple[TokenKind, float]:
        """(kind, seconds queued) of a request the scheduler granted."""
        asked, kind = self._asked.pop(request_id)
        self.requests += 1
        self.queue_s += now - asked
        self._granted_at[request_id] = now
        if kind is TokenKind.CACHE:  # held from the prompt to the generation's end
            self.cache = (request_id, nbytes)
        self.token_state(SessionState.GENERATING if self.cache else SessionState.COMPUTING)
        return kind, now - asked

    def refused(self, request_id: int) -> None:
        self._asked.pop(request_id, None)
        self.token_state(SessionState.IDLE)

    def released(self, request_id: int, now: float) -> float:
        """Seconds the released grant was held."""
        held = now - self._granted_at.pop(request_id, now)
        self.compute_s += held
        if self.cache is not None and self.cache[0] == request_id:
            self.cache = None
        self.token_state(SessionState.GENERATING if self.cache else SessionState.IDLE)
        return held

    def held_state(self) -> SessionState:
        """The state its grants say (after a worker declined to park: token events were not
        applied while it was asked)."""
        if self.cache is not None:
            return SessionState.GENERATING
        if self._granted_at:
            return SessionState.COMPUTING
        return SessionState.WAITING if self._asked else SessionState.IDLE

    def token_state(self, state: SessionState) -> None:
        """A token event's state. One that ended stays so (its worker may release after the Bye); one
        that is starting stays so until its worker is ready, though it loads under a grant: until then
        the manager answers its client itself and reads its worker's death as a refusal."""
        if not self.ended and self.state not in _UNTOUCHED:
            self.state = state


# States that token events do not change: a worker starting or waking loads under a grant (until
# it is ready the manager answers its client itself); one parking holds none and sends none.
_UNTOUCHED = (SessionState.STARTING, SessionState.WAKING, SessionState.PARKING, SessionState.PARKED)
