"""The worker's grant and policy state machine: which memory token to ask for, when to
hold it, release it, honour a reclaim, swap the task out, and retry after running out
of memory. Pure: no sockets, no torch, no clock.

The worker's I/O loop (``worker.main``) feeds it events and carries out the actions
each event returns, in order:

    events   start(job, nbytes)   granted(id, preserve)   refused(id)   swapped_in()   done(seconds)
             out_of_memory()   failed()   reclaim(id)   end_generation()
    actions  Ask  Release  Hold  Compute  SwapIn  SwapOut  DropGraph  DropKept  DropCache
             FreeMemory  Reply  Fail

``Compute`` and ``SwapIn`` always end their list: the loop runs them and reports how
they went (``done``/``out_of_memory``/``failed``, ``swapped_in``/``failed``), and the
policy goes on from there. ``Reply`` and ``Fail`` end a request: send its result, or
its error.

Policies (``menos.messages.Policy``):
- on-demand (Menos): a forward asks for M_f and keeps only its input; a backward asks
  for M_b and recomputes the forward. A clipped optimizer step (``Job.STEP``, after the
  client's clip coefficient arrives) asks for its own small token, under every policy
  but vanilla (whose task token covers it).
- preserve: a training forward asks for M_b and holds it, with its activations, until
  the backward, which then needs no new grant.
- adaptive: a training forward asks for M_f, or M_b if the scheduler finds memory
  plentiful (it decides: ``manager.scheduler``); a kept forward's grant is
  reclaimable, and a reclaim drops the activations (the backward recomputes them).
- vanilla (the baseline): one grant for the whole task, its own copy of the blocks
  and its kept activations, from the request that swaps it in until a reclaim; a
  reclaim during an open iteration (a forward's graph kept) waits for its end.

A generation (every policy but vanilla, which only trains) asks for one CACHE token
(``Job.GENERATE``: its size comes with the prompt) and holds it after the prompt's
forward; its token steps (``Job.DECODE``) compute under it with no new grant. It is
released by ``end_generation``, by any other request, or by a failure.

Running out of memory under a grant frees everything, releases the grant and retries
once under an exclusive one (the scheduler grants it alone, with all the memory free
then); a second failure fails the request. A generation does not retry: held across
its token steps, an exclusive grant would stop everyone else for as long. The vanilla baseline does not retry. A
request that fails for any reason gives its memory back before its grant (other
workers would run out of it otherwise), then reports the error. A refused request
(the memory it needs is held outside the scheduler) fails with that reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from menos.messages import Policy, TokenKind

EXPECTED_DECAY = 0.8  # running mean of compute seconds: weight of the old value
# A generation's cache grant lasts as long as its client keeps generating: unknown, so
# EASY backfilling never lets it pass a blocked head on the promise of ending first.
GENERATION_EXPECTED_S = 1e6


class Job(str, enum.Enum):
    FORWARD = "forward"  # a training forward: the backward follows
    EVAL = "eval"  # a forward that keeps nothing
    BACKWARD = "backward"
    STEP = "step"  # a clipped optimizer step (the client sent the clip coefficient)
    GENERATE = "generate"  # a generation's prompt: opens its cache under a CACHE token it keeps
    DECODE = "decode"  # a further token step of the open generation, under that token


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Ask:
    """Send a TokenRequest."""

    request_id: int
    nbytes: int
    kind: TokenKind
    expected_s: float = 0.0
    preserve_nbytes: int = 0
    retry: bool = False


@dataclass(frozen=True)
class Release:
    request_id: int


@dataclass(frozen=True)
class Hold:
    """Tell the scheduler this grant may be reclaimed (``busy``: only at the end of an iteration)."""

    request_id: int
    busy: bool = False


@dataclass(frozen=True)
class Compute:
    """Run the request's compute; report done, out_of_memory or failed."""

    keep_graph: bool


@dataclass(frozen=True)
class SwapIn:
    """Vanilla: read the task's blocks back in; report swapped_in or failed."""


@dataclass(frozen=True)
class SwapOut:
    """Vanilla: free the task's blocks (its weights stay in the slower tier)."""


@dataclass(frozen=True)
class DropGraph:
    """Free a kept forward's activations, keeping its input (the backward recomputes)."""


@dataclass(frozen=True)
class DropKept:
    """Forget the kept forward entirely (its backward would be refused)."""


@dataclass(frozen=True)
class DropCache:
    """Free the open generation's key/value cache."""


@dataclass(frozen=True)
class FreeMemory:
    """Return freed memory to the system (collect, empty the allocator's cache)."""


@dataclass(frozen=True)
class Reply:
    """The request succeeded: send its result."""


@dataclass(frozen=True)
class Fail:
    """The request failed: send its error."""


Action = Ask | Release | Hold | Compute | SwapIn | SwapOut | DropGraph | DropKept | DropCache | FreeMemory | Reply | Fail

_TOKEN_KIND = {Job.FORWARD: TokenKind.FORWARD, Job.EVAL: TokenKind.EVAL, Job.BACKWARD: TokenKind.BACKWARD,
               Job.STEP: TokenKind.STEP, Job.GENERATE: TokenKind.CACHE}  # fmt: skip


class _Phase(enum.Enum):
    WAITING = "waiting"  # for a grant
    SWAPPING = "swapping"  # vanilla: the task is being read in
    COMPUTING = "computing"


@dataclass
class _Request:
    job: Job
    request_id: int = 0  # the grant it waits for or computes under
    phase: _Phase = _Phase.WAITING
    keep: bool = False  # keep the forward's activations under its grant
    retried: bool = False
    nbytes: int = 0  # a generation's token (its size comes with the request)
    ended: bool = False  # a generation ended (GenerationEnd) while its prompt waited: release at once


class ProtocolViolation(RuntimeError):
    """An event that cannot happen in this state (a bug in the caller, or a stray grant)."""


class GrantPolicy:
    """One worker's memory grants under one policy. See the module's docstring."""

    def __init__(self, policy: Policy, m_f: int, m_b: int, t_f: float = 0.0, t_b: float = 0.0, m_step: int = 0):
        self.policy = Policy(policy)
        self.m_f, self.m_b = m_f, m_b  # vanilla: both are the task's token
        # Each job's token (a clipped step's is small: the adapter's optimizer temporaries).
        self.need = {Job.FORWARD: m_f, Job.EVAL: m_f, Job.BACKWARD: m_b, Job.STEP: m_step or m_f}
        self.expected = {Job.FORWARD: t_f, Job.EVAL: t_f, Job.BACKWARD: t_b, Job.STEP: 0.0, Job.GENERATE: t_f,
                         Job.DECODE: 0.0}  # fmt: skip
        self.request: _Request | None = None
        self.held: int | None = None  # a kept forward's grant (preserve, adaptive)
        self.cache: int | None = None  # an open generation's grant
        # vanilla: the grant the task is resident under, as last told to the scheduler
        # (busy: an iteration is open), and whether a reclaim waits for its end
        self.resident: int | None = None
        self.busy = False
        self.reclaim_pending = False
        self.graph = False  # vanilla: a training forward's graph is kept (the iteration is open)
        self._next_id = 0

    @property
    def vanilla(self) -> bool:
        return self.policy is Policy.VANILLA

    @property
    def idle(self) -> bool:
        """No request in progress: a new one may start."""
        return self.request is None

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _ask(self, nbytes: int, kind: TokenKind, **kw) -> Ask:
        req = self.request
        req.request_id, req.phase = self._new_id(), _Phase.WAITING
        return Ask(req.request_id, nbytes, kind, **kw)

    # ---------------------------------------------------------------- events

    def start(self, job: Job, nbytes: int = 0) -> list[Action]:
        """A client request arrived (validated by the caller); ``nbytes``: a generation's token."""
        if self.request is not None:
            raise ProtocolViolation("a request is already in progress")
        job = Job(job)
        if job is Job.DECODE:
            if self.cache is None:
                raise ProtocolViolation("no generation is open")
            self.request = _Request(job, self.cache, _Phase.COMPUTING)
            return [Compute(keep_graph=False)]
        if job is Job.GENERATE and self.vanilla:
            raise ProtocolViolation("the vanilla baseline does not generate")
        closed = self.end_generation()  # any other request ends an open generation
        self.request = _Request(job, nbytes=nbytes)
        return [*closed, *self._start(self.request)]

    def _start(self, req: _Request) -> list[Action]:
        expected = self.expected[req.job]
        if req.job is Job.GENERATE:
            return [*self._drop_held(), self._ask(req.nbytes, TokenKind.CACHE, expected_s=GENERATION_EXPECTED_S)]
        if self.vanilla:
            if self.resident is None:
                iteration = self.expected[Job.FORWARD] + self.expected[Job.BACKWARD]
                return [self._ask(self.m_b, TokenKind.TASK, expected_s=iteration)]
            req.request_id = self.resident
            return self._vanilla_compute()
        if req.job is Job.BACKWARD and self.held is not None:
            # The kept forward's grant covers its backward.
            req.request_id, self.held = self.held, None
            req.phase = _Phase.COMPUTING
            return [Compute(keep_graph=False)]
        acts = self._drop_held()  # a new forward supersedes an unanswered one
        if req.job is Job.BACKWARD:
            return [*acts, self._ask(self.m_b, TokenKind.BACKWARD, expected_s=expected)]
        if req.job is Job.FORWARD and self.policy is Policy.PRESERVE:
            req.keep = True
            return [*acts, self._ask(self.m_b, TokenKind.FORWARD, expected_s=expected)]
        if req.job is Job.FORWARD and self.policy is Policy.ADAPTIVE:
            return [*acts, self._ask(self.m_f, TokenKind.FORWARD, expected_s=expected, preserve_nbytes=self.m_b)]
        return [*acts, self._ask(self.need[req.job], _TOKEN_KIND[req.job], expected_s=expected)]

    def granted(self, request_id: int, preserve: bool = False) -> list[Action]:
        req = self.request
        if req is None or req.phase is not _Phase.WAITING or req.request_id != request_id:
            raise ProtocolViolation(f"grant {request_id} was not asked for")
        if self.vanilla:
            self.resident = request_id
            req.phase = _Phase.SWAPPING
            return [SwapIn()]
        req.keep = (req.keep or preserve) and not req.retried
        req.phase = _Phase.COMPUTING
        return [Compute(keep_graph=req.keep)]

    def swapped_in(self) -> list[Action]:
        if self.request is None or self.request.phase is not _Phase.SWAPPING:
            raise ProtocolViolation("no swap-in in progress")
        return self._vanilla_compute()

    def done(self, seconds: float) -> list[Action]:
        """The compute finished; ``seconds`` feeds the expected time (EASY backfilling)."""
        req = self._computing()
        for job in (Job.FORWARD, Job.EVAL) if req.job in (Job.FORWARD, Job.EVAL) else (req.job,):
            self.expected[job] = EXPECTED_DECAY * self.expected[job] + (1 - EXPECTED_DECAY) * seconds
        self.request = None
        if self.vanilla:
            if req.job is not Job.EVAL:  # an evaluation between a forward and its backward (DPO's
                self.graph = req.job is Job.FORWARD  # reference) leaves the iteration open
            return [*self._end_iteration(), Reply()]
        if req.job in (Job.GENERATE, Job.DECODE):
            if req.ended:  # its client gave up on it while the prompt waited (GenerationEnd)
                return [DropCache(), FreeMemory(), Release(req.request_id), Reply()]
            self.cache = req.request_id  # held until the generation ends
            return [Reply()]
        if req.job is Job.FORWARD and req.keep:
            self.held = req.request_id  # kept until the backward, or a reclaim
            return [Hold(req.request_id), Reply()] if self.policy is Policy.ADAPTIVE else [Reply()]
        return [Release(req.request_id), Reply()]

    def out_of_memory(self) -> list[Action]:
        """The compute ran out of memory: retry once under an exclusive grant."""
        req = self._computing()
        # A generation does not retry: an exclusive grant held across its token steps would
        # stop every other client for as long.
        if self.vanilla or req.retried or req.job in (Job.GENERATE, Job.DECODE):
            return self.failed()
        released = req.request_id
        req.retried, req.keep = True, False
        return [DropGraph(), FreeMemory(), Release(released),
                self._ask(self.need[req.job], _TOKEN_KIND[req.job], expected_s=self.expected[req.job], retry=True)]  # fmt: skip

    def failed(self) -> list[Action]:
        """The compute (or the vanilla swap-in) raised: give back its memory, fail the request."""
        req = self.request
        if req is None or req.phase is _Phase.WAITING:
            raise ProtocolViolation("nothing is running")
        self.request = None
        if req.job in (Job.GENERATE, Job.DECODE):
            self.cache = None
            return [DropCache(), FreeMemory(), Release(req.request_id), Fail()]
        if not self.vanilla:
            return [DropKept(), FreeMemory(), Release(req.request_id), Fail()]
        if req.phase is _Phase.SWAPPING:  # the swap freed what it had read: return it, then the grant
            self.resident, self.busy, self.reclaim_pending = None, False, False
            return [FreeMemory(), Release(req.request_id), Fail()]
        self.graph = False
        return [DropKept(), FreeMemory(), *self._end_iteration(), Fail()]

    def refused(self, request_id: int) -> list[Action]:
        """The scheduler will not grant the request's memory: it fails."""
        req = self.request
        if req is None or req.phase is not _Phase.WAITING or req.request_id != request_id:
            return []  # not (or no longer) asked for
        self.request = None
        return [Fail()]

    def reclaim(self, request_id: int) -> list[Action]:
        """The scheduler needs the memory under ``request_id`` (stale ids are ignored)."""
        if self.vanilla:
            if request_id != self.resident:
                return []
            self.reclaim_pending = True
            return self._end_iteration() if self.request is None else []
        if request_id != self.held:
            return []  # the backward already used and released it
        return self._drop_held()

    def forget_kept(self) -> list[Action]:
        """The kept forward is void (a driven session's new weights replace those it ran
        with): drop it, and the grant or the open iteration that held it."""
        if self.vanilla:
            self.graph = False
            return [DropKept(), *self._end_iteration()]
        return [*self._drop_held(), DropKept()]

    def end_generation(self) -> list[Action]:
        """The open generation is over (the client says so, or another request starts)."""
        if self.request is not None and self.request.job is Job.GENERATE:
            self.request.ended = True  # its prompt still waits or computes: released when it is done
        if self.cache is None:
            return []
        released, self.cache = self.cache, None
        return [DropCache(), FreeMemory(), Release(released)]

    # ---------------------------------------------------------------- helpers

    def _computing(self) -> _Request:
        req = self.request
        if req is None or req.phase is not _Phase.COMPUTING:
            raise ProtocolViolation("no compute in progress")
        return req

    def _drop_held(self) -> list[Action]:
        if self.held is None:
            return []
        released, self.held = self.held, None
        return [DropGraph(), Release(released)]

    def _vanilla_compute(self) -> list[Action]:
        self.request.phase = _Phase.COMPUTING
        acts: list[Action] = []
        if not self.busy:
            self.busy = True
            acts.append(Hold(self.resident, busy=True))
        return [*acts, Compute(keep_graph=True)]

    def _end_iteration(self) -> list[Action]:
        """Vanilla, once no iteration is open: swap out if a reclaim waits, else tell the
        scheduler the task is idle (idle tasks are reclaimed first)."""
        if self.resident is None or self.graph:
            return []
        if self.reclaim_pending:
            released = self.resident
            self.resident, self.busy, self.reclaim_pending = None, False, False
            return [DropKept(), SwapOut(), Release(released)]
        if self.busy:
            self.busy = False
            return [Hold(self.resident)]
        return []
