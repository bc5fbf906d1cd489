"""menos-worker: the I/O shell around ServerEngine, one process per client.

Spawned by the manager, never by hand. It connects a DEALER to the manager's worker
socket (ipc), announces its session, receives its setup (the client's request and the
shared-weights handle), maps the base weights, and then serves the client's
Forward/Backward requests, each under a memory token granted by the manager.
It exits on the client's Bye, on the manager's Shutdown, or when the manager dies.

Under the vanilla baseline (policy "vanilla") the worker holds its OWN copy of its
blocks, and the grant for its whole task (weights + kept activations) from the
iteration that swaps it in until a Reclaim swaps it out (worker.swap).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import signal
import sys
import time

import torch
import zmq

from menos import wire
from menos.messages import (
    Activations,
    AdapterRequest,
    AdapterState,
    Backward,
    Bye,
    Error,
    ErrorCode,
    Forward,
    Gradients,
    Shutdown,
    Reclaim,
    TokenGrant,
    TokenHold,
    TokenRelease,
    TokenRequest,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
    WorkerSetup,
)
from menos.sharing import AttachedWeights, pid_alive
from menos.memory import token_sizes
from menos.surgery import config_from_json, section_keys
from worker.engine import InputError, ServerEngine
from worker.profiling import profile
from worker.swap import TaskSwap, task_swap

log = logging.getLogger("menos.worker")

SETUP_TIMEOUT_S = 60.0
PARENT_CHECK_S = 1.0


class _Exit(Exception):
    """The manager or the client ended this session."""


_OOM_TYPES = tuple({getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError, MemoryError})


def is_oom(exc: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError that says so."""
    return isinstance(exc, _OOM_TYPES) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))
    )


def run_with_oom_retry(fn, retry, release, acquire_exclusive, on_oom=lambda exc: None):
    """Run ``fn()`` under the current grant; if it runs out of memory, free everything,
    release the grant, and run ``retry()`` once under an exclusive grant.

    ``release()`` gives the current grant back; ``acquire_exclusive()`` returns a function
    that releases the exclusive one. A second failure propagates."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        on_oom(exc)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    release()
    release_exclusive = acquire_exclusive()
    try:
        return retry()
    finally:
        release_exclusive()


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGTERM us when our parent dies, and close the race."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the checks in the loop still notice
    if os.getppid() != parent_pid:
        sys.exit("menos-worker: parent already gone")


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
        self.tokens = (0, 0)  # (M_f, M_b) from the profile
        self.expected = [0.0, 0.0]  # expected compute seconds (forward, backward), a running mean
        self.held: int | None = None  # grant kept from a forward to its backward (preserve/adaptive)
        self.saved_step = 0
        self.computing = False  # a signal now would interrupt an update: do not checkpoint then
        self._next_request = 0
        # vanilla baseline: the task's swap, the grant it is resident under, and whether a
        # Reclaim waits for the end of the open iteration (a forward's graph is kept)
        self.swap: TaskSwap | None = None
        self.resident: int | None = None
        self.resident_busy = False  # as last told to the scheduler (idle grants are reclaimed first)
        self.reclaim_pending = False

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
                    self.send(Error(ErrorCode.BAD_MESSAGE, str(exc)))

    def acquire(self, nbytes: int, kind: str, expected_s: float = 0.0, preserve_nbytes: int = 0):
        """Ask the scheduler for ``nbytes``; block until granted. Returns (grant, queue seconds)."""
        rid = self._next_request = self._next_request + 1
        t0 = time.perf_counter()
        self.send(TokenRequest(rid, nbytes, kind, expected_s, preserve_nbytes))
        while True:
            msg, _ = self.recv(None)
            if isinstance(msg, TokenGrant) and msg.request_id == rid:
                return msg, time.perf_counter() - t0
            if isinstance(msg, Reclaim):
                self.reclaim(msg.request_id)
            elif isinstance(msg, (Shutdown, Bye)):
                raise _Exit(type(msg).__name__)
            elif isinstance(msg, (Forward, Backward)):
                self.send(Error(ErrorCode.BAD_REQUEST, "a request is already in progress", msg.step))

    def release(self, rid: int) -> None:
        self.send(TokenRelease(rid))

    def reclaim(self, rid: int) -> None:
        """Adaptive policy: the scheduler needs the memory our kept activations hold.
        Vanilla: it needs our task's memory; swap out now, or after this iteration."""
        if self.swap is not None:
            if rid == self.resident:
                self.reclaim_pending = True
                self.end_iteration()  # now, unless an iteration is open
            return
        if self.held == rid:  # else the backward already used and released it
            self.release_held()
            log.debug("dropped kept activations (grant %d reclaimed)", rid)

    def release_held(self) -> None:
        if self.held is not None:
            self.engine.drop_graph()
            self.release(self.held)
            self.held = None

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        self.send(WorkerHello(self.session, os.getpid()))
        msg, _ = self.recv(SETUP_TIMEOUT_S)
        if isinstance(msg, Shutdown):
            raise _Exit("shutdown before setup")
        if not isinstance(msg, WorkerSetup):
            raise RuntimeError(f"expected worker_setup, got {type(msg).__name__}")
        self.setup = msg
        if msg.threads > 0:
            torch.set_num_threads(msg.threads)
        try:
            config = config_from_json(msg.config)
            dtype = wire.dtype_from_name(msg.dtype)
            self.weights = AttachedWeights(msg.weights, msg.device)
            load = self._acquire_load(config, dtype) if msg.policy == "vanilla" else None
            self.engine = ServerEngine(config, self.weights.tensors, msg.server_layers, msg.client, dtype, msg.device)
            prof = profile(self.engine, msg.client.batch_size, msg.client.seq_len)
        except _Exit:
            raise
        except Exception as exc:  # noqa: BLE001  any setup failure goes back to the client
            log.exception("setup failed")
            self.send(WorkerFailed(f"{type(exc).__name__}: {exc}"))
            raise _Exit("setup failed") from exc
        self.engine.reject_nonfinite = msg.reject_nonfinite
        if msg.resume_step >= 0:
            try:
                self.engine.load_checkpoint(msg.checkpoint_dir, msg.resume_step)
            except Exception as exc:  # noqa: BLE001
                log.exception("resume failed")
                self.send(WorkerFailed(f"cannot resume from step {msg.resume_step}: {exc}"))
                raise _Exit("resume failed") from exc
            log.info("resumed at step %d", self.engine.steps)
        self.saved_step = self.engine.steps
        self.tokens = prof.tokens()
        self.expected = [prof.t_f, prof.t_b]
        if load is not None:
            # The task starts swapped out; it is resident only under a grant for all of it.
            self.swap = task_swap(self.engine.base_named, self.weights.tensors, self.engine.device)
            self.swap.swap_out()
            self.release(load.request_id)
            task = self.swap.nbytes + self.tokens[1]
            self.tokens = (task, task)
        base = self.engine.base_parameters()
        shared = sum(self.weights.owns(p) for p in base)
        self.send(WorkerReady(self.engine.persistent_bytes, shared, len(base) - shared, *self.tokens,
                              prof.t_f, prof.t_b, prof.method, self.engine.steps))  # fmt: skip
        log.info("ready: blocks %s, profile M_f %d M_b %d bytes (%s)", msg.server_layers, prof.m_f, prof.m_b, prof.method)

    def _acquire_load(self, config, dtype) -> TokenGrant:
        """Vanilla: a grant for loading and profiling the task (its estimated size)."""
        setup = self.setup
        names = section_keys(self.weights.tensors, config, range(*setup.server_layers), False)
        weights = sum(self.weights.tensors.nbytes(n) for n in names)
        _, m_b = token_sizes(config, setup.server_layers[1] - setup.server_layers[0], setup.client.batch_size,
                             setup.client.seq_len, dtype.itemsize, setup.client.adapter.r,
                             setup.client.adapter.target_modules)  # fmt: skip
        grant, _ = self.acquire(min(weights + m_b, setup.capacity), "load")
        return grant

    def serve(self) -> None:
        while True:
            msg, tensors = self.recv(None)
            if isinstance(msg, (Bye, Shutdown)):
                log.info("session ends: %s%s", type(msg).__name__, f" ({msg.reason})" if isinstance(msg, Shutdown) else "")
                return
            if isinstance(msg, Reclaim):
                self.reclaim(msg.request_id)
            elif isinstance(msg, (Forward, Backward)):
                self.handle(msg, tensors)
            elif isinstance(msg, AdapterRequest):
                state = self.engine.adapter_state()
                self.send(AdapterState(tuple(state), self.engine.steps), list(state.values()))
            else:
                self.send(Error(ErrorCode.BAD_MESSAGE, f"unexpected {type(msg).__name__} for a worker"))

    def handle(self, msg, tensors) -> None:
        if len(tensors) != 1:
            self.send(Error(ErrorCode.BAD_TENSOR, f"{type(msg).__name__} carries exactly one tensor", msg.step))
            return
        (x,) = tensors
        try:
            # Validate before asking for memory: a bad request costs the others nothing.
            if isinstance(msg, Forward):
                self.engine.check_input(x, "activations")
                self.release_held()  # a new forward supersedes an unanswered one
                out, compute_s, queue_s, swap_s = self._forward(msg, x)
                self.send(Activations(msg.step, compute_s, queue_s, swap_s), out)
            else:
                self.engine.check_backward(msg.step, x)
                out, compute_s, queue_s, swap_s = self._backward(msg, x)
                saved = -1
                every = self.setup.checkpoint_every
                if every and self.engine.steps % every == 0:
                    saved = self.checkpoint()
                self.send(Gradients(msg.step, compute_s, queue_s, saved, swap_s), out)
        except InputError as exc:
            self.send(Error(ErrorCode.BAD_TENSOR, str(exc), msg.step))
        except _Exit:
            raise
        except Exception as exc:  # noqa: BLE001  report, drop the step, keep serving
            log.exception("step %s failed", msg.step)
            self.computing = False  # failed before the optimizer step (it raises nothing itself)
            self.release_held()
            self.engine.drop_kept()
            self.send(Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", msg.step))
        self.end_iteration()  # whatever happened: a pending Reclaim is honoured once no iteration is open

    def _exclusive(self, kind: str):
        grant, _ = self.acquire(self.setup.capacity, kind + "+retry")
        return lambda: self.release(grant.request_id)

    def _on_oom(self, exc) -> None:
        log.warning("out of memory (%s): freeing everything and retrying under an exclusive grant", exc)
        self.held = None  # the retry runs on-demand
        self.engine.drop_graph()

    def _run(self, rid: int, kind: str, fn, retry):
        """``fn()`` under grant ``rid``, retried once if out of memory. Returns
        (result, True if ``rid`` is still held, i.e. no retry released it)."""
        released = []

        def release():
            released.append(rid)
            self.release(rid)

        out = run_with_oom_retry(fn, retry, release, lambda: self._exclusive(kind), self._on_oom)
        return out, not released

    # ---------------------------------------------------------------- vanilla baseline

    def _vanilla(self, fn):
        """Run ``fn`` with the task resident: swapped in under a grant for all of it, or
        still resident from its last iteration. Returns (out, compute s, queue s, swap s).

        The grant is reclaimable from the start: a Reclaim swaps the task out at once
        between iterations, or at the end of the open one (``end_iteration``)."""
        queue_s = swap_s = 0.0
        if self.resident is None:
            grant, queue_s = self.acquire(self.tokens[1], "task", sum(self.expected))
            t0 = time.perf_counter()
            try:
                self.swap.swap_in()
            except BaseException:
                self.release(grant.request_id)  # the swap freed what it had read
                raise
            swap_s = time.perf_counter() - t0
            self.resident = grant.request_id
        if not self.resident_busy:
            self.resident_busy = True
            self.send(TokenHold(self.resident, busy=True))
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, queue_s, swap_s

    def end_iteration(self) -> None:
        """Vanilla, once no iteration is open: swap out if a Reclaim is pending, else
        tell the scheduler the task is idle."""
        if self.resident is None or self.engine.holds_graph:
            return
        if self.reclaim_pending:
            self.swap_out()
        elif self.resident_busy:
            self.resident_busy = False
            self.send(TokenHold(self.resident))

    def swap_out(self) -> None:
        self.engine.drop_kept()
        self.swap.swap_out()
        self.release(self.resident)
        self.resident, self.resident_busy, self.reclaim_pending = None, False, False

    # ---------------------------------------------------------------- Menos

    def _forward(self, msg: Forward, x):
        if self.swap is not None:
            y, *times = self._vanilla(lambda: self.engine.forward(msg.step, x, msg.train, keep_graph=True))
            return [y], *times
        m_f, m_b = self.tokens
        policy = self.setup.policy if msg.train else "on-demand"
        kind = "forward" if msg.train else "eval"
        if policy == "preserve":
            grant, queue_s = self.acquire(m_b, kind, self.expected[0])
        elif policy == "adaptive":
            grant, queue_s = self.acquire(m_f, kind, self.expected[0], preserve_nbytes=m_b)
        else:
            grant, queue_s = self.acquire(m_f, kind, self.expected[0])
        keep = policy == "preserve" or grant.preserve
        t0 = time.perf_counter()
        y, held = self._run(
            grant.request_id, kind,
            lambda: self.engine.forward(msg.step, x, msg.train, keep_graph=keep),
            lambda: self.engine.forward(msg.step, x, msg.train, keep_graph=False),
        )  # fmt: skip
        compute_s = time.perf_counter() - t0
        if held and self.engine.holds_graph:
            self.held = grant.request_id  # kept until the backward (or a reclaim)
            if policy == "adaptive":
                self.send(TokenHold(grant.request_id))  # idle holder now: the scheduler may reclaim it
        elif held:
            self.release(grant.request_id)
        self.expected[0] = 0.8 * self.expected[0] + 0.2 * compute_s
        return [y], compute_s, queue_s, 0.0

    def _backward(self, msg: Backward, g):
        if self.swap is not None:
            out, *times = self._vanilla(lambda: self.engine.backward(msg.step, g, msg.want_input_grad))
            return ([] if out is None else [out]), *times
        queue_s = 0.0
        if self.held is not None and self.engine.holds_graph:
            rid, self.held = self.held, None  # the forward's grant covers the backward
        else:
            self.release_held()
            grant, queue_s = self.acquire(self.tokens[1], "backward", self.expected[1])
            rid = grant.request_id
        t0 = time.perf_counter()
        backward = lambda: self.engine.backward(msg.step, g, msg.want_input_grad)  # noqa: E731
        self.computing = True  # stays set if a signal (SystemExit) cuts the update short
        out, held = self._run(rid, "backward", backward, backward)
        self.computing = False
        compute_s = time.perf_counter() - t0
        if held:
            self.release(rid)
        self.expected[1] = 0.8 * self.expected[1] + 0.2 * compute_s
        return ([] if out is None else [out]), compute_s, queue_s, 0.0

    def checkpoint(self) -> int:
        """Save the adapter, optimizer and step counter; returns the step saved."""
        if self.engine is not None and self.engine.steps > self.saved_step:
            self.engine.save_checkpoint(self.setup.checkpoint_dir)
            self.saved_step = self.engine.steps
        return self.saved_step

    def close(self) -> None:
        self.engine = None
        if self.weights is not None:
            self.weights.close()
        self.sock.close(0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="menos-worker", description="Menos worker (spawned by menos-manager).")
    p.add_argument("--manager", required=True, help="the manager's worker endpoint (ipc://...)")
    p.add_argument("--session", required=True, help="session id this worker serves")
    p.add_argument("--manager-pid", type=int, required=True, help="exit when this process is gone")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s worker {args.session[:8]} %(levelname)s %(message)s",
    )
    die_with_parent(os.getppid())  # the manager, or the launcher (which dies with the manager)
    if not pid_alive(args.manager_pid):
        sys.exit("menos-worker: the manager is already gone")
    # SIGTERM from the manager (or its death) ends the process like a Shutdown.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the manager, which stops us
    worker = WorkerProcess(args.manager, args.session, args.manager_pid)
    try:
        worker.start()
        worker.serve()
    except _Exit as exc:
        log.info("exiting: %s", exc)
    finally:
        # Whatever ends the session (goodbye, shutdown, vanished client, the manager's
        # death), keep what was trained, unless we were cut off inside an update.
        if not worker.computing and worker.setup is not None:
            try:
                worker.checkpoint()
            except Exception:  # noqa: BLE001
                log.exception("final checkpoint failed")
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
