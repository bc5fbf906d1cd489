"""menos-worker: the I/O shell around ServerEngine, one process per client.

Spawned by the manager, never by hand. It connects a DEALER to the manager's worker
socket (ipc), announces its session, receives its setup (the client's request and the
shared-weights handle), maps the base weights, and then serves the client's
Forward/Backward requests, each under a memory token granted by the manager.
It exits on the client's Bye, on the manager's Shutdown, or when the manager dies.
"""

from __future__ import annotations

import argparse
import ctypes
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
    Backward,
    Bye,
    Error,
    ErrorCode,
    Forward,
    Gradients,
    Shutdown,
    TokenGrant,
    TokenRelease,
    TokenRequest,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
    WorkerSetup,
)
from menos.sharing import AttachedWeights
from menos.surgery import config_from_json
from worker.engine import InputError, ServerEngine

log = logging.getLogger("menos.worker")

SETUP_TIMEOUT_S = 60.0
PARENT_CHECK_S = 1.0


class _Exit(Exception):
    """The manager or the client ended this session."""


def _die_with_parent(manager_pid: int) -> None:
    """Ask the kernel to SIGTERM us when the manager dies, and close the race."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the getppid() check in the loop still notices
    if os.getppid() != manager_pid:
        sys.exit("menos-worker: the manager is already gone")


class WorkerProcess:
    def __init__(self, endpoint: str, session: str, manager_pid: int):
        self.session = session
        self.manager_pid = manager_pid
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, session.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.engine: ServerEngine | None = None
        self.weights: AttachedWeights | None = None
        self.setup: WorkerSetup | None = None
        self._next_request = 0

    # ---------------------------------------------------------------- plumbing

    def send(self, msg, tensors=()) -> None:
        self.sock.send_multipart(wire.encode(msg, tensors), copy=False)

    def recv(self, timeout_s: float | None):
        """Next (msg, tensors) from the manager; raises _Exit if the manager is gone."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if os.getppid() != self.manager_pid:
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

    def acquire(self, nbytes: int, kind: str) -> tuple[int, float]:
        """Ask the scheduler for ``nbytes``; block until granted. Returns (request id, queue s)."""
        rid = self._next_request = self._next_request + 1
        t0 = time.perf_counter()
        self.send(TokenRequest(rid, nbytes, kind))
        while True:
            msg, _ = self.recv(None)
            if isinstance(msg, TokenGrant) and msg.request_id == rid:
                return rid, time.perf_counter() - t0
            if isinstance(msg, (Shutdown, Bye)):
                raise _Exit(type(msg).__name__)
            if isinstance(msg, (Forward, Backward)):
                self.send(Error(ErrorCode.BAD_REQUEST, "a request is already in progress", msg.step))

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
            self.engine = ServerEngine(config, self.weights.tensors, msg.server_layers, msg.client, dtype, msg.device)
        except Exception as exc:  # noqa: BLE001  any setup failure goes back to the client
            log.exception("setup failed")
            self.send(WorkerFailed(f"{type(exc).__name__}: {exc}"))
            raise _Exit("setup failed") from exc
        base = self.engine.base_parameters()
        shared = sum(self.weights.owns(p) for p in base)
        self.send(WorkerReady(self.engine.persistent_bytes, shared, len(base) - shared))
        log.info("ready: blocks %s, %d adapter params", msg.server_layers, sum(p.numel() for p in self.engine.params))

    def serve(self) -> None:
        while True:
            msg, tensors = self.recv(None)
            if isinstance(msg, (Bye, Shutdown)):
                log.info("session ends: %s", type(msg).__name__)
                return
            if isinstance(msg, (Forward, Backward)):
                self.handle(msg, tensors)
            else:
                self.send(Error(ErrorCode.BAD_MESSAGE, f"unexpected {type(msg).__name__} for a worker"))

    def handle(self, msg, tensors) -> None:
        engine, setup = self.engine, self.setup
        if len(tensors) != 1:
            self.send(Error(ErrorCode.BAD_TENSOR, f"{type(msg).__name__} carries exactly one tensor", msg.step))
            return
        (x,) = tensors
        try:
            # Validate before asking for memory: a bad request costs the others nothing.
            engine.check_input(x, "activations" if isinstance(msg, Forward) else "gradient")
            nbytes, kind = (setup.m_f, "forward") if isinstance(msg, Forward) else (setup.m_b, "backward")
            rid, queue_s = self.acquire(nbytes, kind)
            t0 = time.perf_counter()
            try:
                if isinstance(msg, Forward):
                    out, reply_type = [engine.forward(msg.step, x, msg.train)], Activations
                else:
                    g = engine.backward(msg.step, x, msg.want_input_grad)
                    out, reply_type = ([] if g is None else [g]), Gradients
            finally:
                compute_s = time.perf_counter() - t0
                self.send(TokenRelease(rid))
            self.send(reply_type(msg.step, compute_s, queue_s), out)
        except InputError as exc:
            self.send(Error(ErrorCode.BAD_TENSOR, str(exc), msg.step))
        except _Exit:
            raise
        except Exception as exc:  # noqa: BLE001  report, drop the step, keep serving
            log.exception("step %s failed", msg.step)
            engine.drop_kept()
            self.send(Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", msg.step))

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
    _die_with_parent(args.manager_pid)
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
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
