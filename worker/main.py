"""menos-worker: the I/O shell around ServerEngine and GrantPolicy, one process per client.

Spawned by the manager, never by hand. It connects a DEALER to the manager's worker
socket (ipc), announces itself, receives its setup (the client's request and the
shared-weights handle), maps the base weights, profiles its client's memory demand,
and then serves the client's Forward/Backward requests. Which memory token to ask for,
when to release or hold it, what a reclaim or an out-of-memory error means: all of it
is ``worker.policy``'s; this loop only turns messages into the policy's events and
carries out the actions it returns (sockets, the engine, the swap).
It exits on the client's Bye, on the manager's Shutdown, or when the manager dies.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time

import torch
import zmq

from menos import checkpoint, codecs, wire
from menos.procs import die_with_parent, malloc_trim, pid_alive
from menos.estimator import generation_token, vanilla_task_token
from menos.messages import (Activations, AdapterLoad, AdapterLoaded, AdapterRequest, AdapterState, ApplyStep, Backward,
                            Bye, Error, ErrorCode, Forward, GenerationEnd, Gradients, Park, Parked, ParkedState, Policy,
                            Profiled, Reclaim, ServerCheckpoint, Shutdown, StateRequest, StepApplied, TokenGrant,
                            TokenHold, TokenKind, TokenRefused, TokenRelease, TokenRequest, WorkerFailed, WorkerHello,
                            WorkerReady, WorkerSetup, Woken)  # fmt: skip
from menos.sharing import AttachedWeights
from menos.surgery import config_from_json
from worker import policy as P
from worker.engine import InputError, ServerEngine
from worker.failures import is_fatal, is_oom
from worker.profiling import profile
from worker.requests import Request, RequestError, Serving, job_for
from worker.swap import TaskSwap, task_swap

log = logging.getLogger("menos.worker")

SETUP_TIMEOUT_S = 60.0
PARENT_CHECK_S = 1.0


class _Exit(Exception):
    """The manager or the client ended this session."""


class _Refused(Exception):
    """The scheduler will not grant this request's memory."""


class WorkerProcess:
    def __init__(self, endpoint: str, session: str, manager_pid: int):
        self.session = session
        self.manager_pid = manager_pid
        self.parent_pid = os.getppid()  # the manager, or the launcher that forked us
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, session.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.engine: ServerEngine | None = None
        self.weights: AttachedWeights | None = None
        self.setup: WorkerSetup | None = None
        self.policy: P.GrantPolicy | None = None
        self.swap: TaskSwap | None = None  # vanilla: the task's own copy of its blocks
        self.serving: Serving | None = None
        self.saved_step = 0
        self.computing = False  # a signal now would interrupt an update: do not checkpoint then
        self.last_words = False  # a WorkerFailed was sent: close() lingers until it is out
        self.context_lost = False  # a fatal CUDA error: nothing on the device can be read any more
        self.ready: WorkerReady | None = None  # the profile as the manager was told it (kept when parking)
        self.parked = False  # the session's state is in its park file: this process exits without a checkpoint
        self.woken_queue_s = 0.0  # a woken session's first request: its wait for the wake (Woken)

    # ---------------------------------------------------------------- plumbing

    def send(self, msg, tensors=()) -> None:
        self.sock.send_multipart(wire.encode(msg, tensors), copy=False)

    def recv(self, timeout_s: float | None):
        """Next (msg, tensors) from the manager; raises _Exit if the manager is gone."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if os.getppid() != self.parent_pid or not pid_alive(self.manager_pid):
                raise _Exit("manager died")
            wait = PARENT_CHECK_S if deadline is None else min(PARENT_CHECK_S, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("no message from the manager in time")
            if self.sock.poll(int(wait * 1000)):
                frames = self.sock.recv_multipart(copy=False)
                try:
                    return wire.decode(frames)
                except wire.WireError as exc:
                    # The manager passes client frames on unparsed beyond the header.
                    self.send(Error(code=ErrorCode.BAD_MESSAGE, message=str(exc)))

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        self.send(WorkerHello())
        msg, _ = self.recv(SETUP_TIMEOUT_S)
        if isinstance(msg, Shutdown):
            raise _Exit("shutdown before setup")
        if not isinstance(msg, WorkerSetup):
            raise RuntimeError(f"expected worker_setup, got {type(msg).__name__}")
        self.setup = setup = msg
        if setup.threads > 0:
            torch.set_num_threads(setup.threads)
        vanilla = setup.policy is Policy.VANILLA
        try:
            # Loading (vanilla: the task's own copy) and profiling use memory: under a grant of the estimate.
            load = self._wait_grant(TokenRequest(request_id=0, nbytes=setup.load_nbytes, kind=TokenKind.LOAD))
            self.weights = AttachedWeights(setup.weights, setup.device)
            # The device as this process sees it (CUDA: matched by UUID, not the manager's index).
            self.engine = ServerEngine(config_from_json(setup.config), self.weights.tensors, setup.server_layers,
                                       setup.client, wire.dtype_from_name(setup.dtype), self.weights.device,
                                       setup.quantization)  # fmt: skip
            # A woken session's profile, or an earlier session's of the same shape: not measured again.
            known = setup.parked.profile if setup.parked is not None else None if vanilla else setup.profile
            if known is None:
                prof = profile(self.engine, setup.client.batch_size, setup.client.seq_len)
            if setup.parked is not None:  # its trained state
                self.engine.load_park(setup.park_dir, setup.parked.step, setup.parked.driven)
        except _Exit:
            raise
        except Exception as exc:  # noqa: BLE001  any setup failure goes back to the client
            self._setup_failed("", exc)
        self.engine.reject_nonfinite = setup.reject_nonfinite
        if setup.parked is None and setup.resume_step >= 0:
            try:
                # a checkpoint, or the state a session parked with when its manager went (manager.parking)
                where = setup.checkpoint_dir if setup.resume_step in checkpoint.steps(setup.checkpoint_dir) else \
                    setup.park_dir
                self.engine.load_checkpoint(where, setup.resume_step)
            except Exception as exc:  # noqa: BLE001
                self._setup_failed(f"cannot resume from step {setup.resume_step}: ", exc)
            log.info("resumed at step %d", self.engine.steps)
        # The last regular checkpoint: a session resumed from its parked state (a park file, not a
        # checkpoint) writes that step as a checkpoint when it leaves.
        saved = [step for step in checkpoint.steps(setup.checkpoint_dir) if step <= self.engine.steps]
        self.saved_step = setup.parked.saved_step if setup.parked is not None else max(saved, default=0)
        if known is None:
            log.info("profile: M_f %d M_b %d bytes (%s)", prof.m_f, prof.m_b, prof.method)
            m_f, m_b = prof.tokens()
            if vanilla:
                # The task starts swapped out; it is resident only under a grant for all of it.
                self.swap = task_swap(self.engine.base_named, self.weights.tensors, self.engine.device,
                                      self.engine.kernels.layers)  # fmt: skip
                self.swap.swap_out()
                m_f = m_b = vanilla_task_token(self.swap.nbytes, m_b)
            known = Profiled(m_f=m_f, m_b=m_b, m_step=prof.step_token(), t_f=prof.t_f, t_b=prof.t_b,
                             method=prof.method, persistent_bytes=prof.persistent_bytes,
                             standing_bytes=prof.persistent_bytes + self.engine.standing_extra_bytes())  # fmt: skip
        self._ready(load, known)

    def _ready(self, load: TokenGrant, known: Profiled) -> None:
        """Serve with this profile: measured now, a woken session's own (with its running
        means), or an earlier session's of the same shape."""
        self.send(TokenRelease(request_id=load.request_id))
        self.policy = P.GrantPolicy(self.setup.policy, known.m_f, known.m_b, known.t_f, known.t_b, known.m_step)
        if self.setup.parked is not None:
            self.policy.expected.update({P.Job(job): s for job, s in self.setup.parked.expected_s.items()})
        private = sum(not self.weights.owns(p) for p in self.engine.base_parameters())
        self.ready = WorkerReady(persistent_bytes=known.persistent_bytes, private_params=private, m_f=known.m_f,
                                 m_b=known.m_b, t_f=known.t_f, t_b=known.t_b, profile_method=known.method,
                                 step=self.engine.steps, standing_bytes=known.standing_bytes, m_step=known.m_step)  # fmt: skip
        self.send(self.ready)
        log.info("%s: blocks %s, step %d", "woken" if self.setup.parked else "ready", self.setup.server_layers,
                 self.engine.steps)

    def park(self) -> None:
        """Save the session's state to the park directory and exit; or say why not now."""
        reason = "a request is in progress" if not self.policy.idle else self.engine.park_reason()
        if not reason:
            try:
                self.engine.save_park(self.setup.park_dir)
            except Exception as exc:  # noqa: BLE001  a full disk, say: serve on, live
                log.exception("the park file could not be written")
                reason = f"the park file could not be written: {exc}"
        if reason:
            self.send(Parked(reason=reason))
            return
        self.send(Parked(state=ParkedState(
            step=self.engine.steps, saved_step=self.saved_step, driven=self.engine.opt.driven,
            profile=Profiled.of(self.ready), expected_s={j.value: s for j, s in self.policy.expected.items()})))  # fmt: skip
        self.parked = self.last_words = True  # the park file holds it all: no final checkpoint; Parked must get out
        raise _Exit("parked")

    def _setup_failed(self, what: str, exc: Exception):
        self.last_words = True
        if isinstance(exc, checkpoint.Mismatch):  # the client's mistake, nothing loaded: its words, no traceback
            log.warning("refused: %s", exc)
            self.send(WorkerFailed(message=str(exc)))
            raise _Exit("refused") from exc
        log.exception("setup failed")
        self.send(WorkerFailed(message=f"{what}{type(exc).__name__}: {exc}"))
        raise _Exit("setup failed") from exc

    def _wait_grant(self, request: TokenRequest) -> TokenGrant:
        """Start-up only (nothing else is served yet): ask, and wait for the grant."""
        self.send(request)
        while True:
            msg, _ = self.recv(None)
            if isinstance(msg, TokenGrant) and msg.request_id == request.request_id:
                return msg
            if isinstance(msg, TokenRefused):
                raise RuntimeError(f"no memory to start in: {msg.reason}")
            if isinstance(msg, (Shutdown, Bye)):
                raise _Exit(type(msg).__name__)

    def serve(self) -> None:
        while True:
            msg, tensors = self.recv(None)
            if isinstance(msg, (Bye, Shutdown)):
                log.info("session ends: %s%s", type(msg).__name__, f" ({msg.reason})" if isinstance(msg, Shutdown) else "")
                return
            if isinstance(msg, TokenGrant):
                if self.serving is not None:
                    self.serving.queue_s += time.perf_counter() - self.serving.asked_at
                self.run(self.policy.granted(msg.request_id, msg.preserve))
            elif isinstance(msg, TokenRefused):
                if self.serving is not None:
                    self.serving.error = _Refused(msg.reason)
                self.run(self.policy.refused(msg.request_id))
            elif isinstance(msg, Reclaim):
                self.run(self.policy.reclaim(msg.request_id))
            elif isinstance(msg, (Forward, Backward, ApplyStep)):
                self.accept(msg, tensors)
            elif isinstance(msg, GenerationEnd):
                self.run(self.policy.end_generation())
            elif isinstance(msg, AdapterLoad):
                self.load_adapter(msg, tensors)
            elif isinstance(msg, AdapterRequest):
                self.send_adapter(msg)
            elif isinstance(msg, StateRequest):
                self.send_checkpoint()
            elif isinstance(msg, Park):
                self.park()
            elif isinstance(msg, Woken):
                self.woken_queue_s = msg.queued_s
            else:
                self.send(Error(code=ErrorCode.BAD_MESSAGE, message=f"unexpected {type(msg).__name__} for a worker"))

    def accept(self, msg: Request, tensors) -> None:
        """Validate a client request before asking for memory: a bad one costs the others nothing."""
        if not self.policy.idle:
            self.send(Error(code=ErrorCode.BAD_REQUEST, message="a request is already in progress", step=msg.step))
            return
        try:
            job, x = job_for(msg, tensors, self.engine, self.setup.client.compression)
        except RequestError as exc:
            self.send(Error(code=exc.code, message=str(exc), step=msg.step))
            return
        nbytes = 0
        if job is P.Job.GENERATE:
            if self.policy.vanilla:
                self.send(Error(code=ErrorCode.BAD_REQUEST, message="the vanilla baseline does not generate "
                                "(it exists to compare training)", step=msg.step))  # fmt: skip
                return
            # One token from the prompt to the end: the cache, and one forward's working memory.
            nbytes = generation_token(self.engine.generation_bytes(x.shape[0], msg.generate), self.policy.m_f)
        self.serving = Serving(msg, x, queue_s=self.woken_queue_s)
        self.woken_queue_s = 0.0
        self.run(self.policy.start(job, nbytes))

    def send_adapter(self, msg: AdapterRequest) -> None:
        """The server's part of the adapter (export); ``drive``: the client's optimizer steps it
        from now on."""
        if msg.drive:
            try:
                if not self.policy.idle:
                    raise InputError("a request is in progress")
                self.engine.drive()
            except InputError as exc:  # busy, or an optimizer step half done: the same answer
                self.send(Error(code=ErrorCode.BAD_REQUEST, message=f"adapter_request(drive): {exc}"))
                return
        state = self.engine.adapter_state()
        self.send(AdapterState(names=tuple(state)), [t.detach() for t in state.values()])

    def load_adapter(self, msg: AdapterLoad, tensors) -> None:
        """Start from a trained adapter (connect(init_adapter=)), or a driven session's stepped
        weights: the server's part."""
        if not self.policy.idle:
            self.send(Error(code=ErrorCode.BAD_REQUEST, message="adapter_load: a request is in progress"))
            return
        try:
            count = self.engine.load_adapter(dict(zip(msg.names, tensors, strict=True)))
        except (InputError, ValueError) as exc:
            self.send(Error(code=ErrorCode.BAD_TENSOR, message=f"adapter_load: {exc}"))
            return
        if self.engine.opt.driven:
            self.run(self.policy.forget_kept())  # the engine dropped its kept forward: so does the policy
        self.send(AdapterLoaded(count=count))

    # ---------------------------------------------------------------- actions

    def run(self, actions) -> None:
        """Carry out the policy's actions; Compute and SwapIn report back as new events."""
        for act in actions:
            if isinstance(act, P.Ask):
                self.serving.asked_at = time.perf_counter()
                self.send(TokenRequest(request_id=act.request_id, nbytes=act.nbytes, kind=act.kind, retry=act.retry,
                                       expected_s=act.expected_s, preserve_nbytes=act.preserve_nbytes))  # fmt: skip
            elif isinstance(act, P.Release):
                if self.engine.device.type == "cpu":
                    malloc_trim()  # what the grant covered is free for others: give the heap's free pages back
                self.send(TokenRelease(request_id=act.request_id))
            elif isinstance(act, P.Hold):
                self.send(TokenHold(request_id=act.request_id, busy=act.busy))
            elif isinstance(act, P.Compute):
                self.run(self._compute(act.keep_graph))
            elif isinstance(act, P.SwapIn):
                self.run(self._swap_in())
            elif isinstance(act, P.SwapOut):
                self.swap.swap_out()
            elif isinstance(act, P.DropGraph):
                self.engine.drop_graph()
            elif isinstance(act, P.DropKept):
                self.engine.drop_kept()
            elif isinstance(act, P.DropCache):
                self.engine.end_generation()
            elif isinstance(act, P.FreeMemory):
                gc.collect()
                if self.engine.device.type == "cuda":
                    torch.cuda.empty_cache()
                else:  # the CPU's cache: the C heap keeps a step's freed pages unless asked
                    malloc_trim()
            elif isinstance(act, P.Reply):
                self._reply()
            elif isinstance(act, P.Fail):
                self._fail()

    def _compute(self, keep_graph: bool):
        s = self.serving
        t0 = time.perf_counter()
        try:
            if isinstance(s.msg, Forward) and (s.msg.generate or s.msg.cached):
                s.out = [self.engine.generate(s.x, s.msg)]
            elif isinstance(s.msg, Forward):
                s.out = [self.engine.forward(s.msg.step, s.x, s.msg.train, keep_graph, s.msg.adapter, s.msg.pads)]
            elif isinstance(s.msg, ApplyStep):
                self.computing = True
                self.engine.apply_step(s.msg.step, s.msg.scale)
                self.computing = False
            else:
                self.computing = True  # stays set if a signal (SystemExit) cuts the update short
                grad = self.engine.backward(s.msg.step, s.x, s.msg.want_input_grad, s.msg.fresh)
                self.computing = False
                s.out = [] if grad is None else [grad]
                if s.msg.adapter_grads:  # a driven session's gradients, for the client's optimizer
                    s.adapter_grads = self.engine.take_adapter_grads()
        except Exception as exc:  # noqa: BLE001  report, drop the step, keep serving
            self.computing = False  # failed before the optimizer step (it raises nothing itself)
            s.compute_s += time.perf_counter() - t0
            s.error = exc
            if is_oom(exc):
                log.warning("out of memory (%s): freeing everything and retrying under an exclusive grant", exc)
                return self.policy.out_of_memory()
            log.exception("step %s failed", s.msg.step)
            if is_fatal(exc):  # every later step would fail too: end, so the client can resume elsewhere
                self.context_lost = True
                self.run(self.policy.failed()[:-1])  # give the grant back; the client hears worker_died
                raise _Exit(f"CUDA context unusable: {exc}") from exc
            return self.policy.failed()
        s.compute_s += time.perf_counter() - t0
        return self.policy.done(time.perf_counter() - t0)

    def _swap_in(self):
        t0 = time.perf_counter()
        try:
            self.swap.swap_in()
        except Exception as exc:  # noqa: BLE001  the swap freed what it had read
            log.exception("swap-in failed")
            self.serving.error = exc
            return self.policy.failed()
        self.serving.swap_s += time.perf_counter() - t0
        return self.policy.swapped_in()

    def _reply(self) -> None:
        s, self.serving = self.serving, None
        times = dict(compute_s=s.compute_s, queue_s=s.queue_s, swap_s=s.swap_s)
        out = codecs.encode(s.out[0], self.setup.client.compression) if s.out else []  # the cut layer's codec
        if isinstance(s.msg, Forward):
            self.send(Activations(step=s.msg.step, **times), out)
            return
        pending = self.engine.pending_sq_norm  # clipping: the step waits for the client's ApplyStep
        saved = -1
        every = self.setup.checkpoint_every
        if pending is None and every and self.engine.steps % every == 0:
            saved = self.checkpoint()
        if isinstance(s.msg, ApplyStep):
            self.send(StepApplied(step=s.msg.step, checkpoint=saved, **times))
        else:
            self.send(Gradients(step=s.msg.step, checkpoint=saved, grad_sq_norm=pending,
                                adapter_grads=len(s.adapter_grads), **times), [*out, *s.adapter_grads])  # fmt: skip

    def _fail(self) -> None:
        s, self.serving = self.serving, None
        exc = s.error
        if isinstance(exc, _Refused):
            self.send(Error(code=ErrorCode.TOO_LARGE, message=f"no memory for this request: {exc}", step=s.msg.step))
            return
        self.send(Error(code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}", step=s.msg.step))

    def checkpoint(self) -> int:
        """Save the adapter, optimizer and step counter; returns the step saved."""
        if self.engine is not None and self.engine.steps > self.saved_step:
            if self.engine.save_checkpoint(self.setup.checkpoint_dir) is not None:
                self.saved_step = self.engine.steps
        return self.saved_step

    def send_checkpoint(self) -> None:
        """The client keeps a copy of each server checkpoint, to resume on any manager (a cluster)."""
        step = self.checkpoint() if self.policy.idle else self.saved_step
        try:
            data = bytearray(checkpoint.read_bytes(self.setup.checkpoint_dir, step))
        except OSError:
            self.send(Error(code=ErrorCode.NO_CHECKPOINT, message=f"the server has no checkpoint of step {step}"))
            return
        self.send(ServerCheckpoint(step=step), [torch.frombuffer(data, dtype=torch.uint8)])

    def close(self) -> None:
        self.engine = None
        if self.weights is not None:
            self.weights.close()
        # A refusal (WorkerFailed) must reach the manager before we exit: linger for it then, and
        # end the context, which waits for that send (the launcher's fork leaves by os._exit, which
        # would otherwise stop ZeroMQ's I/O thread with the message still queued).
        self.sock.close(2000 if self.last_words else 0)
        if self.last_words:
            self.ctx.term()


def serve_session(manager: str, session: str, manager_pid: int, log_level: str = "INFO") -> int:
    """Run one worker in this process until its session ends (the launcher calls this in a fork)."""
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s worker {session[:8]} %(levelname)s %(message)s")
    die_with_parent(os.getppid())  # the manager, or the launcher (which dies with the manager)
    if not pid_alive(manager_pid):
        sys.exit("menos-worker: the manager is already gone")
    # SIGTERM from the manager (or its death) ends the process like a Shutdown.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the manager, which stops us
    worker = WorkerProcess(manager, session, manager_pid)
    try:
        worker.start()
        worker.serve()
    except _Exit as exc:
        log.info("exiting: %s", exc)
    finally:
        # Whatever ends the session (goodbye, shutdown, vanished client, the manager's
        # death), keep what was trained, unless we were cut off inside an update.
        if not worker.computing and not worker.context_lost and not worker.parked and worker.setup is not None:
            try:
                worker.checkpoint()
            except Exception:  # noqa: BLE001
                log.exception("final checkpoint failed")
        worker.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="menos-worker", description="Menos worker (spawned by menos-manager).")
    p.add_argument("--manager", required=True, help="the manager's worker endpoint (ipc://...)")
    p.add_argument("--session", required=True, help="session id this worker serves")
    p.add_argument("--manager-pid", type=int, required=True, help="exit when this process is gone")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    return serve_session(args.manager, args.session, args.manager_pid, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
