"""A client's sockets to a manager: request/reply with timeouts and typed errors, the
heartbeat thread, and ``status``. No torch here: ``menos-manager status`` uses it alone."""

from __future__ import annotations

import re
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from menos import wire
from menos.errors import MenosError, MenosTimeout
from menos.keys import CurveKeys
from menos.link import Link
from menos.messages import ClusterStatus, Error, ErrorCode, Heartbeat, Status, StatusRequest


_ENDPOINT = re.compile(r"(tcp://([^\s:/\[\]]+|\[[0-9A-Fa-f:.]+\]):\d+|ipc://\S+|inproc://\S+)")
_EXAMPLE = "e.g. tcp://127.0.0.1:5555 or tcp://server.example.org:5555"


def check_endpoint(endpoint: str) -> str:
    """A ZeroMQ address a client can connect to, or ValueError with an example of one."""
    if not isinstance(endpoint, str) or not _ENDPOINT.fullmatch(endpoint):
        raise ValueError(f"endpoint {endpoint!r} is not an address to connect to; {_EXAMPLE}")
    return endpoint


class WrongService(MenosError):
    """The endpoint answers, but is the other kind of Menos service (a cluster's gateway, a manager)."""

    def __init__(self, code_or_message: str, message: str | None = None):  # (message), or (code, message) unpickled
        super().__init__(ErrorCode.PROTOCOL, code_or_message if message is None else message)


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)  # fmt: skip


class Channel:
    """A DEALER socket speaking menos.wire, with timeouts and server errors as exceptions;
    with a ``link``, every message is delayed as that link would (menos.link).

    A monitor watches the connection: ``wait_connected`` tells "nothing answered" from "a
    failed encryption handshake", and a key the server refuses is reported as such."""

    def __init__(self, endpoint: str, timeout_s: float, curve: CurveKeys | None = None, link: Link | None = None):
        check_endpoint(endpoint)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.curve = curve
        if curve is not None:
            curve.apply(self.sock)
        events = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED
        self._monitor = self.sock.get_monitor_socket(events)
        self._connected = self._ready = False
        self._lost: MenosError | None = None  # the server closed the connection: every later call says so
        self.bytes_sent = self.bytes_received = 0  # every frame, headers included
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:  # e.g. a host name ZeroMQ will not take
            self.close()
            raise ValueError(f"endpoint {endpoint!r}: {exc}; {_EXAMPLE}") from None
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.link = link

    def send(self, msg, tensors=()) -> None:
        if self._lost is not None:
            raise self._lost
        frames = wire.encode(msg, tensors)
        size = sum(memoryview(f).nbytes for f in frames)
        self.bytes_sent += size
        if self.link is not None:
            self.link.transit(size)
        self.sock.send_multipart(frames, copy=False)

    def recv(self, expect: type | tuple[type, ...], timeout_s: float | None = None):
        if self._lost is not None:
            raise self._lost
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.sock.poll(min(200, max(0, int((deadline - time.monotonic()) * 1000)))):
            self._watch()
            if time.monotonic() >= deadline:
                hint = " (with CURVE, a wrong server key looks like this)" if self.curve else ""
                raise MenosTimeout(f"no answer from {self.endpoint} within {timeout_s:.0f} s{hint}")
        frames = self.sock.recv_multipart(copy=False)
        size = sum(f.buffer.nbytes for f in frames)
        self.bytes_received += size
        if self.link is not None:
            self.link.transit(size)
        msg, tensors = wire.decode(frames)
        if isinstance(msg, Error):
            raise MenosError(msg.code, msg.message)
        if not isinstance(msg, expect):
            want = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
            raise MenosError(ErrorCode.PROTOCOL, f"expected {want}, got {type(msg).__name__}")
        return msg, tensors

    def _watch(self) -> None:
        """Read the connection's events; raise for a failed handshake."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._ready = True
            elif event == zmq.EVENT_DISCONNECTED and self._ready:
                # ZeroMQ would reconnect quietly and the answer never come: say so instead
                self._lost = MenosError(ErrorCode.DISCONNECTED, f"{self.endpoint} closed the connection (its process "
                                        "died, or a message exceeded its --max-message-bytes); with a state_dir, "
                                        "connect again with resume=True")  # fmt: skip
                raise self._lost
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise MenosError(ErrorCode.UNAUTHORIZED, f"{self.endpoint} refused this client's key")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:  # one side speaks CURVE, the other plain text
                hint = ("this client uses CURVE but the server does not: drop client_key and server_key"
                        if self.curve else
                        "this server uses CURVE: pass server_key= (its public .key) and client_key= (your .key_secret)")  # fmt: skip
                raise MenosError(ErrorCode.HANDSHAKE, f"connected to {self.endpoint}, but the encryption handshake failed: {hint}")
            elif event & _HANDSHAKE_FAILED:
                # Both mismatches end this way (ZeroMQ tells the client no more): name each cause.
                hint = ("either it does not use CURVE (then drop client_key and server_key) or server_key is not "
                        "its public key (the server's STATE_DIR/keys/server.key)" if self.curve else
                        "it uses CURVE, most likely: pass server_key= (its public .key) and client_key= "
                        "(your .key_secret, from menos-manager keys new NAME)")  # fmt: skip
                raise MenosError(ErrorCode.HANDSHAKE, f"connected to {self.endpoint}, but the server broke off the handshake: {hint}")

    def wait_connected(self, timeout_s: float) -> None:
        """Return once the connection is up and its handshake done; raise MenosError
        (unreachable, handshake, unauthorized) within ``timeout_s`` otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._watch()
            if self._ready:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                if self._connected:
                    raise MenosError(ErrorCode.HANDSHAKE, f"connected to {self.endpoint}, but no handshake within "
                                     f"{timeout_s:.0f} s (with CURVE, a wrong server key looks like this)")  # fmt: skip
                raise MenosError(ErrorCode.UNREACHABLE,
                                 f"nothing answered at {self.endpoint} within {timeout_s:.0f} s (is a manager running there?)")
            self._monitor.poll(int(min(left, 0.2) * 1000))

    def close(self, linger_ms: int = 0) -> None:
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
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
           client_key: str | None = None, server_key: str | None = None, connect_timeout_s: float = 3.0) -> Status:  # fmt: skip
    """A running manager's status (model, memory, sessions)."""
    chan = Channel(endpoint, timeout_s, CurveKeys.load(client_key, server_key) if client_key or server_key else None)
    try:
        chan.wait_connected(connect_timeout_s)
        chan.send(StatusRequest())
        st = chan.recv((Status, ClusterStatus))[0]
    finally:
        chan.close()
    if isinstance(st, ClusterStatus):
        raise WrongService(f"{endpoint} is a cluster's gateway, not a manager; use menos-cluster status --connect {endpoint}")
    return st
