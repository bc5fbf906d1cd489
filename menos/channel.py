"""A client's sockets to a manager: request/reply with timeouts and typed errors, the
heartbeat thread, and ``status``. No torch here: ``menos-manager status`` uses it alone."""

from __future__ import annotations

import threading
import time

import zmq

from menos import wire
from menos.errors import MenosError, MenosTimeout
from menos.keys import CurveKeys
from menos.link import Link
from menos.messages import Error, ErrorCode, Heartbeat, Status, StatusRequest


class Channel:
    """A DEALER socket speaking menos.wire, with timeouts and server errors as exceptions;
    with a ``link``, every message is delayed as that link would (menos.link)."""

    def __init__(self, endpoint: str, timeout_s: float, curve: CurveKeys | None = None, link: Link | None = None):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.curve = curve
        self._monitor = None
        if curve is not None:
            curve.apply(self.sock)
            # A refused key shows only as a failed handshake: watch for it to say so.
            self._monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.link = link

    def send(self, msg, tensors=()) -> None:
        frames = wire.encode(msg, tensors)
        if self.link is not None:
            self.link.transit(sum(memoryview(f).nbytes for f in frames))
        self.sock.send_multipart(frames, copy=False)

    def recv(self, expect: type, timeout_s: float | None = None):
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.sock.poll(min(200, max(0, int((deadline - time.monotonic()) * 1000)))):
            if self._monitor is not None and self._monitor.poll(0):
                raise MenosError(ErrorCode.UNAUTHORIZED, f"{self.endpoint} refused this client's key")
            if time.monotonic() >= deadline:
                hint = " (with CURVE, a wrong server key looks like this)" if self.curve else ""
                raise MenosTimeout(f"no answer from {self.endpoint} within {timeout_s:.0f} s{hint}")
        frames = self.sock.recv_multipart(copy=False)
        if self.link is not None:
            self.link.transit(sum(f.buffer.nbytes for f in frames))
        msg, tensors = wire.decode(frames)
        if isinstance(msg, Error):
            raise MenosError(msg.code, msg.message)
        if not isinstance(msg, expect):
            raise MenosError(ErrorCode.PROTOCOL, f"expected {expect.__name__}, got {type(msg).__name__}")
        return msg, tensors

    def close(self, linger_ms: int = 0) -> None:
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(0)
        # A last message (Bye) needs linger to leave the queue before the socket closes.
        self.sock.close(linger_ms)


class HeartbeatThread:
    """Tells the manager, from a side socket and thread, that this client is alive, even
    while the main thread computes for a long time."""

    def __init__(self, endpoint: str, session: str, interval_s: float, curve: CurveKeys | None):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint, session, interval_s, curve), daemon=True)
        self._thread.start()

    def _run(self, endpoint: str, session: str, interval_s: float, curve) -> None:
        chan = Channel(endpoint, interval_s, curve)  # zmq sockets are not thread-safe: this thread's own
        try:
            while True:
                chan.send(Heartbeat(session=session))
                if self._stop.wait(interval_s):
                    break
        finally:
            chan.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def status(endpoint: str = "tcp://127.0.0.1:5555", timeout_s: float = 10.0,
           client_key: str | None = None, server_key: str | None = None) -> Status:  # fmt: skip
    """A running manager's status (model, memory, sessions)."""
    chan = Channel(endpoint, timeout_s, CurveKeys.load(client_key, server_key) if client_key else None)
    try:
        chan.send(StatusRequest())
        return chan.recv(Status)[0]
    finally:
        chan.close()
