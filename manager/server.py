"""The manager process: shared base weights, client endpoint, workers, scheduler.

One thread, one ZeroMQ poll loop over three kinds of sources:
- the client ROUTER (``--listen``): Hello starts a session and spawns its worker;
  Forward/Backward/Bye are passed to that worker unparsed beyond the header;
- the worker ROUTER (ipc, in a private run directory): setup, memory-token requests
  and releases, and replies that are passed on to the worker's client;
- one pidfd per worker, so a worker's death is noticed at once: its tokens and queue
  entries are reclaimed and its client gets a ``worker_died`` error.

With ``--baseline vanilla`` the same loop runs the baseline: the weights go to a file
instead of shared memory, and each worker's token covers its whole task (its own
copy of its blocks and its kept activations; see worker.swap).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

import psutil
import torch
import transformers
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from manager import runinfo
from manager.capacity import DeviceMemory
from manager.config import ManagerConfig
from manager.metrics import Metrics
from manager.scheduler import Scheduler, TooLarge
from manager.workers import WorkerHandle, WorkerSpawner
from menos import wire
from menos.memory import format_size, parse_size, token_sizes
from menos.messages import (
    CLIENT_BOUND,
    AdapterRequest,
    PROTOCOL_VERSION,
    Backward,
    Bye,
    ClientStatus,
    Error,
    ErrorCode,
    Forward,
    Gradients,
    Heartbeat,
    Hello,
    Reclaim,
    Shutdown,
    Status,
    StatusRequest,
    TokenGrant,
    TokenHold,
    TokenRelease,
    TokenRequest,
    Welcome,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
    WorkerSetup,
)
from menos import checkpoint, keys
from menos.models import load_base
from menos.sharing import FileWeights, SharedWeights, pid_alive, sweep_stale_segments
from menos.surgery import config_to_json, section_keys, split_layers

log = logging.getLogger("menos.manager")

POLL_MS = 200
STOP_GRACE_S = 5.0


@dataclass
class Session:
    sid: str
    client: bytes  # the client's routing id on the client socket
    hello: Hello
    server_layers: tuple[int, int]
    client_blocks: tuple[int, ...]
    m_f: int
    m_b: int
    proc: WorkerHandle
    state: str = "starting"  # starting, idle, waiting, computing, holding, closing, failed
    persistent_bytes: int = 0
    steps: int = 0
    # telemetry: requests served, total seconds queued and holding grants
    requests: int = 0
    queue_s: float = 0.0
    compute_s: float = 0.0
    reclaims: int = 0
    oom_retries: int = 0
    asked: dict = field(default_factory=dict)  # request id -> (time asked, preserve, kind)
    granted_at: dict = field(default_factory=dict)  # request id -> time granted
    identity: str = ""  # whose checkpoints these are ("" for an anonymous client)
    checkpoint_dir: str = ""
    resume_step: int = -1
    last_seen: float = field(default_factory=time.monotonic)
    successor: tuple | None = None  # a Hello of the same identity, waiting for this worker to exit


def checkpoint_dir(state_dir: str, identity: str) -> str:
    """Where an identity's checkpoints live; hashed, since keys hold '/' and the like."""
    return os.path.join(state_dir, "checkpoints", hashlib.sha256(identity.encode()).hexdigest()[:32])


class Manager:
    def __init__(self, cfg: ManagerConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = wire.dtype_from_name(cfg.dtype)
        self.sessions: dict[str, Session] = {}
        self.by_client: dict[bytes, Session] = {}
        self._stop = False
        self.spawner: WorkerSpawner | None = None
        self.metrics = Metrics()
        self._trace_file = None
        self._last_keys_check = 0.0
        self.auth = None
        self.shared: SharedWeights | FileWeights | None = None
        self.vanilla = cfg.baseline == "vanilla"
        self.ctx = self.front = self.back = None
        self.run_dir = os.path.join(cfg.state_dir, f"run-{os.getpid()}")

    # ---------------------------------------------------------------- start / stop

    def start(self) -> None:
        if not (self._has_keys() or keys.is_loopback(self.cfg.listen) or self.cfg.insecure):
            raise SystemExit(  # before anything is loaded: fail fast, say how to fix it
                f"menos-manager: refusing to serve {self.cfg.listen} in plain text. Create keys with\n"
                f"  menos-manager keys init --state-dir {self.cfg.state_dir}\n"
                f"  menos-manager keys add NAME CLIENT.key --state-dir {self.cfg.state_dir}\n"
                "or pass --insecure to accept unencrypted, unauthenticated clients."
            )
        os.makedirs(self.cfg.state_dir, mode=0o700, exist_ok=True)
        for name in sweep_stale_segments():
            log.warning("removed shared-memory segment %s of a dead manager", name)
        for name in os.listdir(self.cfg.state_dir):
            m = re.fullmatch(r"run-(\d+)", name)
            if m and not pid_alive(int(m.group(1))):
                shutil.rmtree(os.path.join(self.cfg.state_dir, name), ignore_errors=True)
                log.warning("removed %s (socket files of a dead manager)", name)
        os.makedirs(self.run_dir, mode=0o700)  # worker socket: only this user may connect
        self.spawner = WorkerSpawner()  # starts importing while the model loads
        self.model_name, model = load_base(self.cfg.model, self.dtype)
        self.config = model.config
        self.config_json = config_to_json(self.config)
        if self.vanilla:  # nothing shared: workers read their own copies from a file
            self.shared = FileWeights(model.state_dict(), os.path.join(self.run_dir, "base.weights"))
        else:
            self.shared = SharedWeights(model.state_dict(), self.device)
        del model  # the shared block (vanilla: the file) is now the only copy
        self.devmem = DeviceMemory(self.device)
        self.capacity = (
            parse_size(self.cfg.memory_capacity) if self.cfg.memory_capacity else self.devmem.default_capacity()
        )
        self.scheduler = Scheduler(self.capacity, self.cfg.backfill)
        self.metrics.capacity.set(self.capacity)
        self.metrics.shared.set(self.shared.size)
        if self.cfg.metrics_port:
            self.metrics.serve(self.cfg.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", self.cfg.metrics_port)
        self._trace_file = open(self.cfg.trace, "a") if self.cfg.trace else None  # noqa: SIM115

        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes)
        self._setup_curve()
        self.front.bind(self.cfg.listen)
        self.endpoint = self.front.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back_endpoint = f"ipc://{self.run_dir}/workers.sock"
        self.back.bind(self.back_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.front, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)

        runinfo.write(self.cfg.state_dir, pid=os.getpid(), endpoint=self.endpoint, model=self.model_name)
        log.info(
            "model %s (%s, %d blocks) shared: %s on %s; capacity %s",
            self.model_name, self.config.model_type, self.config.num_hidden_layers,
            format_size(self.shared.size), self.device, format_size(self.capacity),
        )  # fmt: skip
        log.info("listening on %s (%s, backfill %s)", self.endpoint,
                 "vanilla baseline" if self.vanilla else f"policy {self.cfg.policy}", self.cfg.backfill)  # fmt: skip

    def _setup_curve(self) -> None:
        """CURVE on the client socket when the server has keys; plain text only where allowed."""
        self.auth = None
        if not self._has_keys():
            level = logging.INFO if keys.is_loopback(self.cfg.listen) else logging.WARNING
            log.log(level, "plain text, unauthenticated clients on %s", self.cfg.listen)
            return
        public, secret_key = zmq.auth.load_certificate(self._server_secret())
        self.front.curve_publickey, self.front.curve_secretkey = public, secret_key
        self.front.curve_server = True
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("menos.manager.auth"))
        self.auth.start()
        self._clients_dir = keys.clients_dir(self.cfg.state_dir)
        os.makedirs(self._clients_dir, mode=0o700, exist_ok=True)
        self._keys_seen = None
        self._reload_keys()
        log.info("CURVE on: clients must hold a key listed in %s", self._clients_dir)

    def _server_secret(self) -> str:
        return os.path.join(keys.server_dir(self.cfg.state_dir), "server.key_secret")

    def _has_keys(self) -> bool:
        return os.path.exists(self._server_secret())

    def _reload_keys(self) -> None:
        """Re-read the authorized client keys when the directory changes (files dropped in)."""
        if self.auth is None:
            return
        seen = tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(self._clients_dir)))
        if seen != self._keys_seen:
            self._keys_seen = seen
            self.auth.configure_curve(domain="*", location=self._clients_dir)
            log.info("authorized client keys: %d", sum(name.endswith(".key") for name, _ in seen))

    def stop(self, *_) -> None:
        self._stop = True

    def close(self) -> None:
        """Stop every worker (Shutdown, then TERM, then KILL), release memory and run files."""
        for s in list(self.sessions.values()):
            self._send_worker(s, Shutdown("manager stopping"))
            if s.state != "closing":
                self._send_client(s.client, Error(ErrorCode.SHUTTING_DOWN, "the manager is shutting down"))
        deadline = time.monotonic() + STOP_GRACE_S
        for s in list(self.sessions.values()):
            try:
                s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.terminate()
        for s in list(self.sessions.values()):
            try:
                s.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
            self._forget(s)
        if self.spawner is not None:
            self.spawner.close()
        for sock in (self.front, self.back):
            if sock is not None:
                sock.close(0)
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        if self.ctx is not None:
            self.ctx.term()
        if self.shared is not None:
            self.shared.close()
        if self._trace_file is not None:
            self._trace_file.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        runinfo.remove(self.cfg.state_dir, os.getpid())
        log.info("stopped")

    # ---------------------------------------------------------------- loop

    def serve_forever(self) -> None:
        while not self._stop:
            events = dict(self.poller.poll(POLL_MS))
            if self.front in events:
                self._drain(self.front, self._on_client)
            if self.back in events:
                self._drain(self.back, self._on_worker)
            self._reap()
            self._check_clients()
            if time.monotonic() - self._last_keys_check > 1.0:
                self._last_keys_check = time.monotonic()
                self._reload_keys()

    def _drain(self, sock, handler, limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            try:
                handler(frames[0].bytes, frames[1:])
            except Exception:  # noqa: BLE001  one bad message must not stop the server
                log.exception("error handling a message")

    # ---------------------------------------------------------------- clients

    def _send_client(self, rid: bytes, msg, tensors=()) -> None:
        self.front.send_multipart([rid, *wire.encode(msg, tensors)], copy=False)

    def _on_client(self, rid: bytes, frames) -> None:
        try:
            msg = wire.decode_header(frames[0].buffer).msg
        except wire.WireError as exc:
            self._send_client(rid, Error(ErrorCode.BAD_MESSAGE, str(exc)))
            return
        s = self.by_client.get(rid)
        if s is not None:
            s.last_seen = time.monotonic()
        if isinstance(msg, Hello):
            self._hello(rid, msg, self._user(frames[0]))
        elif isinstance(msg, Heartbeat):
            beat = self.sessions.get(msg.session)
            if beat is not None and (not beat.identity or self._user(frames[0]) in (None, beat.identity)):
                beat.last_seen = time.monotonic()
        elif isinstance(msg, StatusRequest):
            self._send_client(rid, self.status())
        elif isinstance(msg, AdapterRequest) and self.cfg.no_adapter_export:
            self._send_client(rid, Error(ErrorCode.FORBIDDEN, "adapter export is disabled on this server"))
        elif isinstance(msg, (Forward, Backward, AdapterRequest, Bye)):
            s = self.by_client.get(rid)
            if s is None:
                if not isinstance(msg, Bye):
                    self._send_client(rid, Error(ErrorCode.UNKNOWN_SESSION, "no session: send hello first"))
            elif s.state == "starting":
                self._send_client(rid, Error(ErrorCode.BAD_REQUEST, "the session's worker is still starting"))
            else:
                # The worker decodes and validates the tensors; pass the frames on as they are.
                self.back.send_multipart([s.sid.encode(), *frames], copy=False)
                if isinstance(msg, Bye):
                    s.state = "closing"
                    del self.by_client[rid]
        else:
            self._send_client(rid, Error(ErrorCode.BAD_MESSAGE, f"clients may not send {type(msg).__name__}"))

    def _hello(self, rid: bytes, hello: Hello, user: str | None) -> None:
        def refuse(code, text):
            log.info("refused a client: %s", text)
            self._send_client(rid, Error(code, text))

        if rid in self.by_client:
            return refuse(ErrorCode.BAD_REQUEST, "this connection already has a session")
        if len(self.sessions) >= self.cfg.max_clients:
            return refuse(ErrorCode.BAD_REQUEST, f"the server is full ({self.cfg.max_clients} sessions)")
        identity = user or hello.identity  # an authenticated key wins over a claimed name
        previous = next((s for s in self.sessions.values() if identity and s.identity == identity), None)
        if previous is not None:
            if previous.state in ("closing", "failed") and previous.successor is None:
                # Its worker is writing its last checkpoint: answer once it has exited.
                previous.successor = (rid, hello, user)
                return None
            return refuse(ErrorCode.BAD_REQUEST, "this identity already has a session")
        if hello.protocol != PROTOCOL_VERSION:
            return refuse(ErrorCode.BAD_REQUEST, f"protocol {hello.protocol}, server speaks {PROTOCOL_VERSION}")
        max_pos = getattr(self.config, "max_position_embeddings", None) or hello.seq_len
        if not (0 < hello.batch_size and 0 < hello.seq_len <= max_pos):
            return refuse(ErrorCode.BAD_REQUEST, f"batch_size must be > 0 and seq_len in 1..{max_pos}")
        try:
            head, middle, tail = split_layers(self.config.num_hidden_layers, hello.head_layers, hello.tail_layers)
            m_f, m_b = token_sizes(self.config, len(middle), hello.batch_size, hello.seq_len, self.dtype.itemsize,
                                   hello.adapter.r, hello.adapter.target_modules)  # fmt: skip
            if self.vanilla:  # one token for the whole task: its own blocks too
                m_f = m_b = m_b + sum(
                    self.shared.tensors.nbytes(k) for k in section_keys(self.shared.tensors, self.config, middle, False)
                )
            self.scheduler.check(m_b)
        except TooLarge as exc:
            return refuse(ErrorCode.TOO_LARGE, f"a backward of this client {exc}; lower batch_size or seq_len")
        except ValueError as exc:
            return refuse(ErrorCode.BAD_REQUEST, str(exc))
        sid = secrets.token_hex(8)
        ckpt_dir = checkpoint_dir(self.cfg.state_dir, identity or f"anonymous-{sid}")
        resume_step = -1
        if hello.resume_steps:
            common = set(hello.resume_steps) & set(checkpoint.steps(ckpt_dir))
            if not identity or not common:
                return refuse(
                    ErrorCode.NO_CHECKPOINT,
                    f"no server checkpoint matches the client's steps {sorted(hello.resume_steps)} "
                    f"(server has {checkpoint.steps(ckpt_dir) if identity else 'none: resuming needs an identity'})",
                )
            resume_step = max(common)
        proc = self.spawner.spawn([
            "--manager", self.back_endpoint, "--session", sid,
            "--manager-pid", str(os.getpid()), "--log-level", self.cfg.log_level,
        ])  # fmt: skip
        if proc.pidfd is not None:
            self.poller.register(proc.pidfd, zmq.POLLIN)  # wakes the loop the moment it dies
        s = Session(sid, rid, hello, (middle.start, middle.stop), (*head, *tail), m_f, m_b, proc,
                    identity=identity, checkpoint_dir=ckpt_dir, resume_step=resume_step)  # fmt: skip
        self.sessions[sid] = s
        self.by_client[rid] = s
        self.metrics.clients.set(len(self.sessions))
        log.info(
            "session %s: blocks %d..%d on the server, worker pid %d, tokens M_f %s M_b %s",
            sid, middle.start, middle.stop - 1, proc.pid, format_size(m_f), format_size(m_b),
        )  # fmt: skip

    def _user(self, frame) -> str | None:
        """The authenticated client key (CURVE, z85), or None on a plain-text endpoint."""
        return frame.get("User-Id") if self.auth is not None else None

    def _check_clients(self) -> None:
        """A client silent for longer than --client-timeout is gone: its worker checkpoints and exits."""
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if s.state in ("starting", "closing", "failed") or now - s.last_seen < self.cfg.client_timeout:
                continue
            log.warning("session %s: client silent for %.0f s; stopping its worker", s.sid, now - s.last_seen)
            s.state = "closing"
            self.by_client.pop(s.client, None)
            self._send_worker(s, Shutdown("client vanished"))

    def _welcome(self, s: Session) -> None:
        tensors, aliases = [], []
        if s.hello.send_sections:
            wanted = set(section_keys(self.shared.tensors, self.config, s.client_blocks, client_modules=True))
            for e in self.shared.entries:
                names = tuple(n for n in e.names if n in wanted)
                if names:
                    tensors.append(self.shared.tensors[names[0]])
                    aliases.append(names)
        welcome = Welcome(s.sid, self.config_json, self.cfg.dtype, s.server_layers, tuple(aliases),
                          step=max(s.resume_step, 0),
                          heartbeat_s=min(self.cfg.heartbeat, self.cfg.client_timeout / 3))  # fmt: skip
        self._send_client(s.client, welcome, tensors)

    # ---------------------------------------------------------------- workers

    def _send_worker(self, s: Session, msg) -> None:
        self.back.send_multipart([s.sid.encode(), *wire.encode(msg)], copy=False)

    def _on_worker(self, wid: bytes, frames) -> None:
        s = self.sessions.get(wid.decode(errors="replace"))
        if s is None:
            log.warning("message from unknown worker %r", wid[:32])
            return
        msg = wire.decode_header(frames[0].buffer).msg
        now = time.monotonic()
        if isinstance(msg, (TokenRequest, TokenRelease, TokenHold)):
            # CUDA: never grant more than the device has free now (other programs count).
            # Our own grants that are not yet allocated show as free there, so this cap
            # can only make the scheduler more careful, never less.
            self.scheduler.external_free = self.devmem.live_cap()
        if isinstance(msg, TokenRequest):
            nbytes, preserve = msg.nbytes, False
            if msg.preserve_nbytes and self.scheduler.plentiful(msg.preserve_nbytes):
                nbytes, preserve = msg.preserve_nbytes, True  # adaptive: keep the activations
            if msg.kind.endswith("+retry"):
                s.oom_retries += 1
                self.metrics.oom_retries.inc()
                log.warning("session %s ran out of memory; retrying under an exclusive grant", s.sid)
            s.asked[msg.request_id] = (now, preserve, msg.kind.split("+")[0])
            s.state = "waiting"
            self._trace(now, "request", s.sid, msg.request_id, nbytes)
            self._schedule(now, self.scheduler.request(s.sid, msg.request_id, nbytes, now, msg.expected_s))
        elif isinstance(msg, TokenRelease):
            held = now - s.granted_at.pop(msg.request_id, now)
            s.compute_s += held
            self.metrics.releases.inc()
            self.metrics.compute_seconds.observe(held)
            s.state = "idle"
            grants = self.scheduler.release(s.sid, msg.request_id, now)
            self._trace(now, "release", s.sid, msg.request_id, 0)
            self._schedule(now, grants)
        elif isinstance(msg, TokenHold):
            s.state = "computing" if msg.busy else "holding"
            self.scheduler.set_reclaimable(s.sid, msg.request_id, busy=msg.busy)
            self._schedule(now, [])
        elif isinstance(msg, CLIENT_BOUND):
            if isinstance(msg, Gradients):
                s.steps += 1
            if s.state != "closing":
                self.front.send_multipart([s.client, *frames], copy=False)
        elif isinstance(msg, WorkerHello):
            setup = WorkerSetup(
                s.hello, self.config_json, self.cfg.dtype, str(self.device), self.shared.handle,
                s.server_layers, self.cfg.worker_threads, self.cfg.worker_policy, self.capacity,
                s.checkpoint_dir, self.cfg.checkpoint_every, s.resume_step, self.cfg.reject_nonfinite,
            )  # fmt: skip
            self._send_worker(s, setup)
        elif isinstance(msg, WorkerReady):
            s.resume_step = msg.step if s.resume_step >= 0 else -1
            self._ready(s, msg)
        elif isinstance(msg, WorkerFailed):
            s.state = "failed"
            self._send_client(s.client, Error(ErrorCode.WORKER_FAILED, f"the worker could not start: {msg.message}"))
            self.by_client.pop(s.client, None)

    def _ready(self, s: Session, msg: WorkerReady) -> None:
        if msg.private_params and not self.vanilla:
            log.warning("session %s: %d base parameters are not shared", s.sid, msg.private_params)
        s.persistent_bytes, s.m_f, s.m_b = msg.persistent_bytes, msg.m_f, msg.m_b
        try:
            self.scheduler.check(msg.m_b)
        except TooLarge as exc:
            s.state = "failed"
            self._send_worker(s, Shutdown("too large"))
            self._send_client(
                s.client, Error(ErrorCode.TOO_LARGE, f"a backward of this client (profiled) {exc}; lower batch_size or seq_len")
            )
            self.by_client.pop(s.client, None)
            return
        log.info(
            "session %s ready: profiled M_f %s, M_b %s, t_f %.3f s, t_b %.3f s (%s)",
            s.sid, format_size(msg.m_f), format_size(msg.m_b), msg.t_f, msg.t_b, msg.profile_method,
        )  # fmt: skip
        s.state = "idle"
        s.last_seen = time.monotonic()  # silence counts from the Welcome: heartbeats start then
        self._welcome(s)

    def _schedule(self, now: float, grants) -> None:
        """Send the grants an event made, and ask idle holders to make room for a blocked head."""
        for g in grants:
            s = self.sessions[g.owner]
            asked, preserve, kind = s.asked.pop(g.request_id)
            s.requests += 1
            s.queue_s += now - asked
            self.metrics.grants.labels(kind).inc()
            self.metrics.queue_seconds.observe(now - asked)
            s.granted_at[g.request_id] = now
            s.state = "computing"
            self._trace(now, "grant", g.owner, g.request_id, g.nbytes)
            self._send_worker(s, TokenGrant(g.request_id, g.nbytes, preserve))
        self.metrics.granted.set(self.scheduler.used)
        self.metrics.queued.set(len(self.scheduler.waiting))
        for owner, rid in self.scheduler.to_reclaim():
            s = self.sessions[owner]
            s.reclaims += 1
            self.metrics.reclaims.inc()
            self._trace(now, "reclaim", owner, rid, 0)
            self._send_worker(s, Reclaim(rid))

    def _trace(self, now: float, event: str, owner: str, rid: int, nbytes: int) -> None:
        if self._trace_file is not None:
            rec = {"t": now, "event": event, "session": owner, "request_id": rid, "nbytes": nbytes,
                   "used": self.scheduler.used, "capacity": self.capacity, "waiting": len(self.scheduler.waiting)}  # fmt: skip
            self._trace_file.write(json.dumps(rec) + "\n")
            self._trace_file.flush()

    def _reap(self) -> None:
        for s in list(self.sessions.values()):
            code = s.proc.poll()
            if code is None:
                continue
            if s.state not in ("closing", "failed"):
                self.metrics.worker_deaths.inc()
                how = f" (exit code {code})" if code >= 0 else ""
                log.error("session %s: worker pid %d died%s", s.sid, s.proc.pid, how)
                self._send_client(s.client, Error(ErrorCode.WORKER_DIED, f"the server's worker for this session died{how}"))
            self._forget(s)
            now = time.monotonic()
            self._schedule(now, self.scheduler.drop_owner(s.sid, now))
            if s.successor is not None:
                self._hello(*s.successor)

    def _forget(self, s: Session) -> None:
        self.sessions.pop(s.sid, None)
        self.metrics.clients.set(len(self.sessions))
        if self.by_client.get(s.client) is s:
            del self.by_client[s.client]
        if s.proc.pidfd is not None:
            try:
                self.poller.unregister(s.proc.pidfd)
            except KeyError:
                pass
        s.proc.close()

    # ---------------------------------------------------------------- status

    def status(self) -> Status:
        pss = {"manager": _pss(os.getpid())}
        if self.spawner is not None and self.spawner.launcher is not None:
            pss["launcher"] = _pss(self.spawner.launcher.pid)  # the workers' shared library pages
        clients = []
        for s in self.sessions.values():
            pss[f"worker {s.sid}"] = _pss(s.proc.pid)
            n = max(s.requests, 1)
            clients.append(
                ClientStatus(
                    s.sid, s.proc.pid, s.identity, s.hello.head_layers, s.hello.tail_layers,
                    s.server_layers, s.hello.adapter, s.persistent_bytes, s.m_f, s.m_b,
                    s.steps, s.state, s.requests, s.queue_s / n, s.compute_s / n, s.reclaims, s.oom_retries,
                )  # fmt: skip
            )
        return Status(
            model=self.model_name, model_type=self.config.model_type, dtype=self.cfg.dtype, device=str(self.device),
            shared_bytes=self.shared.size, capacity=self.capacity, granted=self.scheduler.used,
            queued=len(self.scheduler.waiting), policy=self.cfg.worker_policy, clients=tuple(clients), pss=pss,
        )  # fmt: skip


def _pss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_full_info().pss
    except (psutil.Error, AttributeError):
        return 0


def run(cfg: ManagerConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s manager %(levelname)s %(message)s")
    transformers.utils.logging.disable_progress_bar()  # a server log is no terminal
    mgr = Manager(cfg)
    signal.signal(signal.SIGINT, mgr.stop)
    signal.signal(signal.SIGTERM, mgr.stop)
    try:
        mgr.start()
        mgr.serve_forever()
    finally:
        mgr.close()
    return 0
