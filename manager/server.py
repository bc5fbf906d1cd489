"""The manager process: shared base weights, client endpoint, workers, scheduler.

One thread, one ZeroMQ poll loop over three kinds of sources:
- the client ROUTER (``--listen``): a Hello goes to admission (``manager.admission``),
  which decides whether a worker is spawned; Forward/Backward/ApplyStep/AdapterRequest/Bye are
  passed to that session's worker unparsed beyond the header;
- the worker ROUTER (ipc, in a private run directory): setup, memory-token requests
  and releases (``manager.scheduler`` decides), and replies that are passed on to the
  worker's client;
- one pidfd per worker, so a worker's death is noticed at once: its tokens and queue
  entries are reclaimed and its client gets a ``worker_died`` error.

This module routes; the decisions live in the pure pieces it calls (admission, the
scheduler, the worker's own policy), CURVE in ``manager.curve``, the status in
``manager.status_view``. ``--baseline vanilla`` runs the baseline in the same loop.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time

import torch
import zmq

from manager import carried, runinfo
from manager.base import publish
from manager.router import drain
from manager.admission import Admission, Admit, Refuse, Wait, shape_key
from manager.capacity import DeviceMemory
from manager.config import ManagerConfig
from manager.curve import CurveGate, plain_text_refusal
from manager.metrics import Metrics
from manager.parking import Route, Start, WorkerSlots, after_parking, route
from manager.scheduler import Scheduler, TooLarge
from manager.sessions import Session, checkpoint_dir, park_dir
from manager.status_view import status_of
from manager.tokens import TokenDesk
from manager.workers import WorkerSpawner, stop_workers
from menos import checkpoint, sections, wire
from menos.messages import (CLIENT_BOUND, AdapterLoad, AdapterRequest, ApplyStep, Backward, Bye, Error, ErrorCode, Forward,
                            GenerationEnd, Gradients, Heartbeat, Hello, Park as ParkMsg, Parked, Policy, Profiled,
                            SectionRequest, SessionState, Shutdown, SpawnWorker, StateRequest, StatusRequest, StepApplied, TokenHold, TokenRelease, TokenRequest,
                            Welcome, WorkerFailed, WorkerHello, WorkerReady, WorkerSetup, Woken)  # fmt: skip
from menos.quantization import Quantization
from menos.procs import raise_open_files
from menos.sharing import SharedWeights, sweep_stale_segments
from menos.weight_files import FileWeights
from menos.sizes import format_size, parse_size

log = logging.getLogger("menos.manager")

POLL_MS = 200
WAITING_POLL_MS = 50
STOP_GRACE_S = 5.0
# Open files: each session's two client connections (requests, heartbeats; a live worker adds
# its socket and pidfd), and what the manager holds besides (measured: benchmarks/tenants.py).
FILES_PER_SESSION = 2
FILES_SPARE = 64
PARK_DEADLINE_S = 30.0  # a worker told to park that has not exited by then is killed
# Sessions whose worker is not (yet) serving: silence does not end them, and a worker's
# death is read after its last words (a refusal)
_NOT_TIMED = (SessionState.STARTING, SessionState.WAKING, SessionState.PARKING)


class Manager:
    def __init__(self, cfg: ManagerConfig, spawner: WorkerSpawner | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = wire.dtype_from_name(cfg.dtype)
        self.policy = cfg.worker_policy
        self.vanilla = self.policy is Policy.VANILLA
        self.sessions: dict[str, Session] = {}
        self.by_client: dict[bytes, Session] = {}
        self._stop = False
        self._closing = False
        self.open_files = 1 << 20  # this process's limit, read at start
        self.spawner = spawner  # started by the caller before the heavy imports, or in start()
        self.metrics = Metrics()
        self._trace_file = None
        self.curve: CurveGate | None = None
        self.shared: SharedWeights | FileWeights | None = None
        self.base = None  # manager.base.Base, once loaded
        self.ctx = self.front = self.back = self.scheduler = None
        self.run_dir = os.path.join(cfg.state_dir, f"run-{os.getpid()}")
        self.slots = WorkerSlots(cfg.max_workers, cfg.park_after)
        self.slots.fits = self._fits
        self.profiles: dict[bytes, Profiled] = {}  # admission.shape_key -> the first profile of that shape
        self._on_client_msg = {Hello: self._hello, Heartbeat: self._heartbeat, StatusRequest: self._status_request,
                               SectionRequest: self._section_request,
                               Forward: self._to_worker, GenerationEnd: self._to_worker, Backward: self._to_worker,
                               ApplyStep: self._to_worker,
                               AdapterRequest: self._to_worker, AdapterLoad: self._to_worker, StateRequest: self._to_worker,
                               Bye: self._to_worker}  # fmt: skip
        self._on_worker_msg = {TokenRequest: self._token_msg, TokenRelease: self._token_msg,
                               TokenHold: self._token_msg, WorkerHello: self._worker_hello,
                               WorkerReady: self._worker_ready, WorkerFailed: self._worker_failed, Parked: self._parked,
                               **{t: self._to_client for t in CLIENT_BOUND}}  # fmt: skip

    # ---------------------------------------------------------------- start / stop

    def start(self) -> None:
        refusal = plain_text_refusal(self.cfg.state_dir, self.cfg.listen, self.cfg.insecure)
        if refusal:
            raise SystemExit(refusal)  # before anything is loaded: fail fast, say how to fix it
        os.makedirs(self.cfg.state_dir, mode=0o700, exist_ok=True)
        for name in sweep_stale_segments():
            log.warning("removed shared-memory segment %s of a dead manager", name)
        for name in runinfo.sweep_dead_runs(self.cfg.state_dir):
            log.warning("removed %s (socket files of a dead manager)", name)
        os.makedirs(self.run_dir, mode=0o700)  # worker socket: only this user may connect
        self.open_files = files = raise_open_files()
        needed = FILES_PER_SESSION * self.cfg.max_clients + FILES_SPARE
        if files < needed:
            log.warning("this process may open %d files: about %d sessions (%d each), fewer than --max-clients %d; "
                        "raise the limit (ulimit -n) to serve them all", files, (files - FILES_SPARE) // FILES_PER_SESSION,
                        FILES_PER_SESSION, self.cfg.max_clients)  # fmt: skip
        self.spawner = self.spawner or WorkerSpawner()  # its launcher imports while the model loads
        start, stop = self.cfg.block_range
        base = publish(self.cfg.model, self.dtype, self.device, self.run_dir, self.vanilla, start,
                       self.spawner.load_base, Quantization.parse(self.cfg.quantization), stop)  # fmt: skip
        self.base = base
        self.model_name, self.config, self.config_json, self.shared = base.name, base.config, base.config_json, base.weights
        self.devmem = DeviceMemory(self.device, self.cfg.free_memory_file)
        cap = self.cfg.memory_capacity
        self.capacity = parse_size(cap) if cap else self.devmem.default_capacity(self.cfg.memory_share)
        self.scheduler = Scheduler(self.capacity, self.cfg.backfill)
        self.admission = Admission(config=self.config, elem_bytes=self.dtype.itemsize, check=self.scheduler.check,
                                   room_for=self.scheduler.room_for, state_dir=self.cfg.state_dir,
                                   max_clients=self.cfg.max_clients, vanilla=self.vanilla,
                                   block_bytes=base.block_bytes, codecs=self.cfg.codecs,
                                   min_head=0 if self.vanilla and self.cfg.blocks is None else base.min_head,
                                   stop=base.served[1], quantization=base.quantization)  # fmt: skip
        self.metrics.capacity.set(self.capacity)
        self.metrics.shared.set(self.shared.size)
        if self.cfg.metrics_port:
            self.metrics.serve(self.cfg.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", self.cfg.metrics_port)
        self._trace_file = open(self.cfg.trace, "a") if self.cfg.trace else None  # noqa: SIM115
        self.tokens = TokenDesk(self.scheduler, self.sessions, self.metrics, self.devmem, self._trace_file)

        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes)
        self.curve = CurveGate(self.ctx, self.front, self.cfg.state_dir, self.cfg.listen)
        self.front.bind(self.cfg.listen)
        self.endpoint = self.front.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a woken session's new worker takes its session id over
        self.back_endpoint = f"ipc://{self.run_dir}/workers.sock"
        self.back.bind(self.back_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.front, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)

        runinfo.write(self.cfg.state_dir, pid=os.getpid(), endpoint=self.endpoint, model=self.model_name)
        log.info("model %s (%s, %d blocks) %s: %s on %s; capacity %s; listening on %s (%s, backfill %s)",
                 self.model_name, self.config.model_type, self.config.num_hidden_layers,
                 "in a file (vanilla)" if self.vanilla else "shared", format_size(self.shared.size), self.device,
                 format_size(self.capacity) + self._share_note(), self.endpoint,
                 "vanilla baseline" if self.vanilla else f"policy {self.policy.value}", self.cfg.backfill)  # fmt: skip

    def _share_note(self) -> str:  # managers that share the device (a cluster's, on one node) split its memory
        shared = self.cfg.memory_share < 1 and not self.cfg.memory_capacity
        return f" ({self.cfg.memory_share:.3g} of the device's, shared)" if shared else ""

    def stop(self, *_) -> None:  # SIGINT, SIGTERM
        self._stop = True

    def close(self) -> None:
        """Stop every worker (Shutdown, then TERM, then KILL), release memory and run files."""
        self._closing = True
        for s in list(self.sessions.values()):
            if s.proc is not None:
                self._send_worker(s, Shutdown(reason="manager stopping"))
            if s.state is not SessionState.CLOSING:
                self._send_client(s.client, Error(code=ErrorCode.SHUTTING_DOWN, message="the manager is shutting down"))
        stop_workers([s.proc for s in self.sessions.values() if s.proc is not None], STOP_GRACE_S)
        for s in list(self.sessions.values()):  # a parked session's state stays in its park directory
            self._forget(s)
        if self.spawner is not None:
            self.spawner.close()
        for sock in (self.front, self.back):
            if sock is not None:
                sock.close(0)
        if self.curve is not None:
            self.curve.stop()
        if self.ctx is not None:
            self.ctx.term()
        if self.base is not None:
            self.base.close()
        if self._trace_file is not None:
            self._trace_file.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        runinfo.remove(self.cfg.state_dir, os.getpid())
        if self.front is not None:  # a start that failed says why, and nothing more
            log.info("stopped")

    # ---------------------------------------------------------------- loop

    def serve_forever(self) -> None:
        while not self._stop:
            # while anyone waits for memory, wake often enough to sample the device (manager.tokens)
            events = dict(self.poller.poll(WAITING_POLL_MS if self.scheduler.waiting else POLL_MS))
            if self.front in events:
                drain(self.front, self._on_client, log)
            if self.back in events:
                drain(self.back, self._on_worker, log)
            self._reap()
            self._post(self.tokens.tick(time.monotonic()))
            if self.slots.parks:
                self._apply(self.slots.tick(time.monotonic(), self._parkable))
            self._check_clients()
            self.curve.tick()

    # ---------------------------------------------------------------- clients

    def _send_client(self, rid: bytes, msg, tensors=()) -> None:
        self.front.send_multipart([rid, *wire.encode(msg, tensors)], copy=False)

    def _on_client(self, rid: bytes, frames) -> None:
        try:
            msg = wire.decode_header(frames[0].buffer).msg
        except wire.WireError as exc:
            self._send_client(rid, Error(code=ErrorCode.BAD_MESSAGE, message=str(exc)))
            return
        s = self.by_client.get(rid)
        if s is not None:
            s.last_seen = time.monotonic()
        handler = self._on_client_msg.get(type(msg))
        if handler is None:
            self._send_client(rid, Error(code=ErrorCode.BAD_MESSAGE, message=f"clients may not send {type(msg).__name__}"))
            return
        try:
            handler(rid, msg, frames)
        except OSError as exc:  # out of open files, a disk error: this request fails, said so at once
            log.exception("a client's %s failed", type(msg).__name__)
            self._send_client(rid, Error(code=ErrorCode.INTERNAL, message=f"the server failed: {exc}"))

    def _heartbeat(self, rid: bytes, msg: Heartbeat, frames) -> None:
        s = self.sessions.get(msg.session)
        if s is not None and (not s.identity or self.curve.user(frames[0]) in (None, s.identity)):
            s.last_seen = time.monotonic()

    def _status_request(self, rid: bytes, msg, frames) -> None:
        self._send_client(rid, self.status())

    def _to_worker(self, rid: bytes, msg, frames) -> None:
        if isinstance(msg, AdapterRequest) and self.cfg.no_adapter_export:
            self._send_client(rid, Error(code=ErrorCode.FORBIDDEN, message="adapter export is disabled on this server"))
            return
        s = self.by_client.get(rid)
        if s is None:
            if not isinstance(msg, (Bye, GenerationEnd)):  # answered by nothing, even here
                self._send_client(rid, Error(code=ErrorCode.UNKNOWN_SESSION, message="no session: send hello first"))
        elif s.state is SessionState.STARTING:
            if isinstance(msg, Bye) and s.proc is None:  # gave up waiting for a worker slot
                self._end_parked(s, "its client said goodbye while it waited for a worker")
            if isinstance(msg, (Bye, GenerationEnd)):
                return
            self._send_client(rid, Error(code=ErrorCode.BAD_REQUEST, message="the session's worker is still starting"))
        elif (how := route(s.state, isinstance(msg, Bye), isinstance(msg, GenerationEnd), len(s.held))) != Route.FORWARD:
            self._hold(s, how, msg, frames)
        else:
            s.sections = None  # fetched (a request to the worker comes only after they are)
            self.slots.touched(s.sid, time.monotonic())
            # The worker decodes and validates the tensors; pass the frames on as they are.
            self.back.send_multipart([s.sid.encode(), *frames], copy=False)
            if isinstance(msg, Bye):
                s.state = SessionState.CLOSING
                del self.by_client[rid]

    def _hello(self, rid: bytes, hello: Hello, frames=None, user: str | None = None) -> None:
        if frames is not None:
            user = self.curve.user(frames[0])
            answer = carried.take(hello, user or hello.identity, frames, self.cfg.state_dir)
            if answer is not None:  # StateWanted, or an Error for a carried file that is no checkpoint
                self._send_client(rid, answer)
                return
        if self._files_short():
            self._send_client(rid, Error(code=ErrorCode.BAD_REQUEST, message=(
                f"the server is full: {len(self.sessions)} sessions hold its open files (limit {self.open_files}; "
                "its operator can raise it with ulimit -n)")))  # fmt: skip
            return
        verdict = self.admission.admit(hello, user, self.sessions.values(), connected=rid in self.by_client)
        if isinstance(verdict, Wait):
            verdict.previous.successor = (rid, hello, user)
            return
        if isinstance(verdict, Refuse):
            log.info("refused a client: %s", verdict.message)
            self._send_client(rid, Error(code=verdict.code, message=verdict.message))
            return
        self._spawn(rid, hello, verdict)

    def _files_short(self) -> bool:
        """Whether one more session would leave too few open files for status, workers and files
        (a session's connections are open already when its Hello comes)."""
        try:
            return len(os.listdir("/proc/self/fd")) + FILES_PER_SESSION + FILES_SPARE > self.open_files
        except OSError:  # no /proc, or out of files to list it with
            return not os.path.isdir("/proc/self")

    def _spawn(self, rid: bytes, hello: Hello, admit: Admit) -> None:
        sid = secrets.token_hex(8)
        s = Session(sid, rid, hello, admit.cut, admit.m_f, admit.m_b, None, identity=admit.identity,
                    checkpoint_dir=checkpoint_dir(self.cfg.state_dir, admit.identity or f"anonymous-{sid}"),
                    resume_step=admit.resume_step)  # fmt: skip
        self.sessions[sid] = s
        self.by_client[rid] = s
        self.metrics.clients.set(len(self.sessions))
        log.info("session %s: blocks %d..%d on the server, tokens M_f %s M_b %s", sid,
                 admit.cut.server_blocks.start, admit.cut.server_blocks.stop - 1,
                 format_size(admit.m_f), format_size(admit.m_b))  # fmt: skip
        self._apply(self.slots.want(sid, time.monotonic(), self._parkable))  # its worker now, or once a slot frees

    def _start_worker(self, s: Session) -> None:
        try:
            s.proc = self.spawner.spawn(SpawnWorker(manager=self.back_endpoint, session=s.sid, manager_pid=os.getpid(),
                                                    log_level=self.cfg.log_level, identity=s.identity or ""))  # fmt: skip
        except OSError as exc:  # out of processes or open files: this session fails, the others are served
            log.error("session %s: no worker could be started: %s", s.sid, exc)
            self._fail_session(s, ErrorCode.WORKER_FAILED, f"the server could not start a worker: {exc}")
            self._end_parked(s, "no worker could be started")  # its parked state, if any, kept as a checkpoint
            return
        if s.proc.pidfd is not None:
            self.poller.register(s.proc.pidfd, zmq.POLLIN)  # wakes the loop the moment it dies
        self.metrics.live_workers.set(len(self.slots.live))
        log.debug("session %s: worker pid %d%s", s.sid, s.proc.pid, " (waking)" if s.parked else "")

    # ---------------------------------------------------------------- parking (manager.parking decides)

    def _parkable(self, sid: str) -> bool:
        s = self.sessions.get(sid)
        return s is not None and s.parkable

    def _fits(self, sid: str) -> bool:
        """Whether a parked session's standing memory fits again (others may have taken what it
        gave back, or are starting and will take it); until it does, it waits, and idle
        sessions park to make room."""
        s = self.sessions.get(sid)
        if s is None or s.parked is None:
            return True
        starting = sum(o.parked.profile.standing_bytes for o in self.sessions.values()
                       if o.proc is not None and o.state is SessionState.WAKING and o.parked is not None)  # fmt: skip
        return self.scheduler.room_for(s.parked.profile.standing_bytes + starting, s.m_b)

    def _apply(self, decisions) -> None:
        for d in decisions:
            s = self.sessions.get(d.sid)
            if s is None or self._closing:
                continue  # ended meanwhile (a start that failed); or every worker is being stopped
            if isinstance(d, Start):
                self._start_worker(s)
            else:
                s.state = SessionState.PARKING
                s.park_sent = time.monotonic()
                self._send_worker(s, ParkMsg())

    def _parked(self, s: Session, msg: Parked, frames) -> None:
        """The worker's answer to Park: saved (it exits; ``_reap`` sees it go), or not now."""
        if msg.state is not None:
            s.parked = msg.state
            self.metrics.parks.inc()
            self.tokens.parking(s, time.monotonic(), "park")
            log.info("session %s parks at step %d", s.sid, msg.state.step)
            return
        log.debug("session %s does not park now: %s", s.sid, msg.reason)
        if s.state is SessionState.PARKING:
            s.state = s.held_state()  # a request may have reached it just before the Park
        self._apply(self.slots.declined_to_park(s.sid, time.monotonic(), self._parkable))
        self._flush_held(s)

    def _hold(self, s: Session, how: Route, msg, frames) -> None:
        """A request for a session without a worker to take it (manager.parking.route)."""
        if how is Route.END:
            self._end_parked(s, "its client said goodbye")
        elif how is not Route.DROP:
            s.held.append((msg, frames))
            if how is Route.WAKE:
                self._wake(s)

    def _wake(self, s: Session) -> None:
        s.state = SessionState.WAKING
        s.wake_since = time.monotonic()
        self._apply(self.slots.want(s.sid, s.wake_since, self._parkable))

    def _flush_held(self, s: Session) -> None:
        held, s.held = s.held, []
        for msg, frames in held:
            self._to_worker(s.client, msg, frames)

    def _worker_gone(self, s: Session) -> None:
        """A parked session's worker exited: its slot and standing memory go back; any request
        that came meanwhile wakes it at once (a goodbye ends it)."""
        self._drop_worker(s)
        s.state = SessionState.PARKED
        how = after_parking(bool(s.held) and isinstance(s.held[0][0], Bye), len(s.held))
        if how is Route.END:
            self._end_parked(s, "its client said goodbye")
        elif how is Route.WAKE:
            self._wake(s)

    def _drop_worker(self, s: Session) -> None:
        if s.proc.pidfd is not None:
            try:
                self.poller.unregister(s.proc.pidfd)
            except KeyError:
                pass
        s.proc.close()
        s.proc = None
        now = time.monotonic()
        self._post(self.tokens.drop(s, now))
        self._apply(self.slots.exited(s.sid, now, self._parkable))
        self.metrics.live_workers.set(len(self.slots.live))

    def _end_parked(self, s: Session, why: str) -> None:
        """A session without a worker ends; what it parked stays, to resume from."""
        log.info("session %s ends without a worker (%s)", s.sid, why)
        self._forget(s)

    def _check_clients(self) -> None:
        """A client silent for longer than --client-timeout is gone: its worker checkpoints and exits."""
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if s.state is SessionState.PARKING and now - s.park_sent > PARK_DEADLINE_S:
                # Still there: TERM (a worker still saving leaves with a regular checkpoint), then KILL.
                log.error("session %s: worker pid %d has not parked in %.0f s; stopping it", s.sid, s.proc.pid,
                          PARK_DEADLINE_S)  # fmt: skip
                if s.park_stops:
                    s.proc.kill()
                else:
                    s.proc.terminate()
                s.park_stops += 1
                s.park_sent = now
            queued = s.proc is None and s.state in (SessionState.STARTING, SessionState.WAKING)
            if (s.state in _NOT_TIMED and not queued) or s.ended or now - s.last_seen < self.cfg.client_timeout:
                continue
            if s.proc is None:  # parked, or waiting for a worker slot with nobody asking any more
                if s.state is SessionState.STARTING:  # no heartbeats before a Welcome: tell it, in case
                    self._send_client(s.client, Error(code=ErrorCode.TIMEOUT, message=(
                        f"no worker slot within --client-timeout ({self.cfg.client_timeout:g} s): the server's "
                        f"--max-workers are busy; connect again")))  # fmt: skip
                self._end_parked(s, f"no request or heartbeat for {now - s.last_seen:.0f} s")
                continue
            log.warning("session %s: client silent for %.0f s; stopping its worker", s.sid, now - s.last_seen)
            s.state = SessionState.CLOSING
            self.by_client.pop(s.client, None)
            self._send_worker(s, Shutdown(reason="client vanished"))

    def _welcome(self, s: Session) -> None:
        s.sections, aliases, digests = self.base.client_sections(s.cut.client_blocks, s.hello.send_sections)
        welcome = Welcome(session=s.sid, config=self.config_json, dtype=self.cfg.dtype,
                          server_layers=s.cut.server_layers, section_names=aliases, base_digests=digests,
                          sections=sections.metas(s.sections, s.hello.compression), step=max(s.resume_step, 0),
                          heartbeat_s=min(self.cfg.heartbeat, self.cfg.client_timeout / 3))  # fmt: skip
        self._send_client(s.client, welcome)  # the client fetches its sections in chunks (menos.sections)

    def _section_request(self, rid: bytes, msg: SectionRequest, frames) -> None:
        s = self.by_client.get(rid)
        reply = sections.chunk(s.sections, msg, s.hello.compression) if s is not None and s.sections else \
            (Error(code=ErrorCode.BAD_REQUEST, message="no sections to send this connection"), [])
        self._send_client(rid, *reply)

    def _fail_session(self, s: Session, code: ErrorCode, message: str) -> None:
        s.state = SessionState.FAILED
        self._send_client(s.client, Error(code=code, message=message))
        self.by_client.pop(s.client, None)

    # ---------------------------------------------------------------- workers

    def _send_worker(self, s: Session, msg) -> None:
        self.back.send_multipart([s.sid.encode(), *wire.encode(msg)], copy=False)

    def _on_worker(self, wid: bytes, frames) -> None:
        s = self.sessions.get(wid.decode(errors="replace"))
        if s is None:
            log.warning("message from unknown worker %r", wid[:32])
            return
        msg = wire.decode_header(frames[0].buffer).msg
        handler = self._on_worker_msg.get(type(msg))
        if handler is None:
            log.warning("session %s: unexpected %s from its worker", s.sid, type(msg).__name__)
            return
        handler(s, msg, frames)

    def _token_msg(self, s: Session, msg: TokenRequest | TokenRelease | TokenHold, frames) -> None:
        desk = {TokenRequest: self.tokens.request, TokenRelease: self.tokens.release, TokenHold: self.tokens.hold}
        self._post(desk[type(msg)](s, msg, time.monotonic()))

    def _post(self, outbox) -> None:
        for s, msg in outbox:
            self._send_worker(s, msg)

    def _to_client(self, s: Session, msg, frames) -> None:
        if isinstance(msg, StepApplied) or (isinstance(msg, Gradients) and msg.grad_sq_norm is None):
            s.steps += 1  # a micro-batch is trained (with clipping, the last one of a step once applied)
        if s.state is not SessionState.CLOSING:
            self.front.send_multipart([s.client, *frames], copy=False)

    def _worker_hello(self, s: Session, msg: WorkerHello, frames) -> None:
        self._send_worker(s, WorkerSetup(
            client=s.hello, config=self.config_json, dtype=self.cfg.dtype, device=str(self.device),
            weights=self.shared.handle_for_worker(), server_layers=s.cut.server_layers, threads=self.cfg.worker_threads,
            policy=self.policy, checkpoint_dir=s.checkpoint_dir, checkpoint_every=self.cfg.checkpoint_every,
            resume_step=s.resume_step, reject_nonfinite=self.cfg.reject_nonfinite, load_nbytes=s.m_b,
            quantization=self.cfg.quantization, park_dir=park_dir(s.checkpoint_dir), parked=s.parked,
            profile=None if self.vanilla else self.profiles.get(shape_key(s.hello)),
        ))  # fmt: skip

    def _worker_ready(self, s: Session, msg: WorkerReady, frames) -> None:
        s.resume_step = msg.step if s.resume_step >= 0 else -1
        if msg.private_params and not self.vanilla:
            log.warning("session %s: %d base parameters are not shared", s.sid, msg.private_params)
        s.persistent_bytes, s.m_f, s.m_b, s.standing_bytes = msg.persistent_bytes, msg.m_f, msg.m_b, msg.standing_bytes
        try:
            self.scheduler.check(msg.m_b)
            self.scheduler.reserve(s.sid, msg.standing_bytes, msg.m_b)
        except TooLarge as exc:
            self._send_worker(s, Shutdown(reason="too large"))
            self._fail_session(s, ErrorCode.TOO_LARGE, f"a backward of this client (profiled) {exc}; lower sizes")
            return
        s.state = SessionState.IDLE
        if s.parked is not None:
            self._woken(s)
            return
        key = shape_key(s.hello)
        how = "its shape's profile" if key in self.profiles else "profiled"
        if not self.vanilla:
            self.profiles.setdefault(key, Profiled.of(msg))
        log.info("session %s ready: %s M_f %s, M_b %s, t_f %.3f s, t_b %.3f s (%s)", s.sid, how,
                 format_size(msg.m_f), format_size(msg.m_b), msg.t_f, msg.t_b, msg.profile_method)  # fmt: skip
        self._drop_other_lineage(s, msg.step)
        s.last_seen = time.monotonic()  # silence counts from the Welcome: heartbeats start then
        self.slots.touched(s.sid, s.last_seen)  # idle from now, not from its worker's start
        self._welcome(s)

    def _drop_other_lineage(self, s: Session, step: int) -> None:
        """A new session's worker is ready: parked states it did not start from (a fresh start:
        all; a resume: those past its step) are another run's, never to be resumed."""
        directory = park_dir(s.checkpoint_dir)
        for old in checkpoint.steps(directory):
            if s.resume_step < 0 or old > step:
                checkpoint.remove(directory, old)

    def _woken(self, s: Session) -> None:
        """A parked session's new worker is ready: the requests held for it go in."""
        now = time.monotonic()
        waited = now - s.wake_since
        self.slots.touched(s.sid, now)
        s.parked, s.wake_deaths = None, 0
        self.metrics.wakes.inc()  # the park file stays: the state at its step, to resume from after a crash
        self.metrics.wake_seconds.observe(waited)
        self.tokens.parking(s, now, "wake", waited)
        s.queue_s += waited
        log.info("session %s woken in %.3f s", s.sid, waited)
        self._send_worker(s, Woken(queued_s=waited))
        self._flush_held(s)

    def _worker_failed(self, s: Session, msg: WorkerFailed, frames) -> None:
        self._fail_session(s, ErrorCode.WORKER_FAILED, f"the worker could not start: {msg.message}")

    def _reap(self) -> None:
        for s in list(self.sessions.values()):
            code = None if s.proc is None else s.proc.poll()
            if code is None:
                continue
            self._last_words(s)
            if s.state is SessionState.PARKING and s.parked is not None:
                self._worker_gone(s)
                continue
            if s.state is SessionState.WAKING and s.wake_deaths == 0:  # its parked state is intact: once more
                s.wake_deaths += 1
                self.metrics.worker_deaths.inc()
                log.error("session %s: worker pid %d died while waking; waking it again", s.sid, s.proc.pid)
                self._drop_worker(s)
                self._apply(self.slots.want(s.sid, time.monotonic(), self._parkable))
                continue
            if not s.ended and s.state != SessionState.FAILED:
                self.metrics.worker_deaths.inc()
                how = f" (exit code {code})" if code >= 0 else ""
                log.error("session %s: worker pid %d died%s", s.sid, s.proc.pid, how)
                self._send_client(s.client, Error(code=ErrorCode.WORKER_DIED,
                                                  message=f"the server's worker for this session died{how}"))  # fmt: skip
            self._forget(s)  # its tokens and its slot go back
            if s.successor is not None:
                rid, hello, user = s.successor
                self._hello(rid, hello, user=user)

    def _last_words(self, s: Session, wait_s: float = 1.0) -> None:
        """Read what a worker sent just before it exited: a starting or waking one's WorkerFailed,
        rather than call it a death; a parking one's Parked, rather than call it lost."""

        def unsaid() -> bool:
            if s.state is SessionState.PARKING:
                return s.parked is None
            return not s.ended and s.state in _NOT_TIMED

        deadline = time.monotonic() + wait_s
        while unsaid() and self.back.poll(
                max(0, int((deadline - time.monotonic()) * 1000))):  # fmt: skip
            drain(self.back, self._on_worker, log)

    def _forget(self, s: Session) -> None:
        self.sessions.pop(s.sid, None)
        self.metrics.clients.set(len(self.sessions))
        if self.by_client.get(s.client) is s:
            del self.by_client[s.client]
        if s.proc is not None:
            self._drop_worker(s)
        self._apply(self.slots.forget(s.sid, time.monotonic(), self._parkable))
        if not s.identity:  # nobody can resume an anonymous session: its parked state goes with it
            shutil.rmtree(park_dir(s.checkpoint_dir), ignore_errors=True)

    # ---------------------------------------------------------------- status

    def status(self):
        return status_of(self)
