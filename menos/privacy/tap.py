"""A recording relay between a client and a manager: the audit's eyes at the cut.

The client connects to the tap's ROUTER as it would to the manager; each client connection
(the session's channel, the heartbeat thread's own) gets its own DEALER to the manager, so
the manager sees the same connections it would see without the tap. Frames pass both ways
unchanged; a decoded copy of the cut's tensors goes into a ``Traffic``. Plain text only:
a CURVE client would need the tap to hold the server's secret key.
"""

from __future__ import annotations

import threading

import zmq

from menos import codecs, wire
from menos.messages import Activations, Backward, Forward, Hello, Welcome
from menos.privacy.traffic import Traffic

_POLL_MS = 50  # how often the relay looks at its stop flag


class Tap:
    """``Tap(manager_endpoint)``: connect the victim to ``tap.endpoint``; ``stop()`` when done.

    ``traffic`` fills as the client trains; read it after ``stop()`` (the relay's thread writes it)."""

    def __init__(self, manager_endpoint: str):
        self.manager_endpoint = manager_endpoint
        self.traffic = Traffic()
        self._ctx = zmq.Context()  # its own: closing it never touches the client's sockets
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        port = self._front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._backs: dict[bytes, zmq.Socket] = {}  # client connection identity -> its DEALER to the manager
        self._stop = threading.Event()
        self.error: BaseException | None = None  # what ended the relay early, if anything
        self._thread = threading.Thread(target=self._run, name="menos-tap", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ relay

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        owners: dict[zmq.Socket, bytes] = {}
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(_POLL_MS):
                    if sock is self._front:
                        ident, *frames = self._front.recv_multipart()
                        back = self._backs.get(ident)
                        if back is None:
                            back = self._backs[ident] = self._backend()
                            owners[back] = ident
                            poller.register(back, zmq.POLLIN)
                        self._record(frames, to_server=True)
                        back.send_multipart(frames)
                    else:
                        frames = sock.recv_multipart()
                        self._record(frames, to_server=False)
                        self._front.send_multipart([owners[sock], *frames])
        except BaseException as exc:  # noqa: BLE001  kept for the driver: the victim then times out
            self.error = exc
        finally:
            for s in [*self._backs.values(), self._front]:
                s.close(linger=0)
            self._ctx.term()

    def _backend(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.manager_endpoint)
        return sock

    # ------------------------------------------------------------------ recording

    def _record(self, frames: list[bytes], to_server: bool) -> None:
        """Decode a copy of what the server receives (or sends) at the cut into the traffic."""
        try:
            msg = wire.decode_header(frames[0]).msg
        except wire.WireError:
            return  # the manager will answer it; nothing of the cut's in it
        t = self.traffic
        if to_server and isinstance(msg, Hello):
            t.head_layers, t.tail_layers = msg.head_layers, msg.tail_layers
            t.codec = codecs.Codec(msg.compression).value
        elif not to_server and isinstance(msg, Welcome):
            t.dtype = msg.dtype
        elif to_server and isinstance(msg, Forward) and msg.train and not msg.generate and not msg.cached:
            t.step(msg.step).received = self._tensor(frames)
        elif to_server and isinstance(msg, Backward) and msg.step in t.steps:
            t.step(msg.step).gradient = self._tensor(frames)
        elif not to_server and isinstance(msg, Activations) and msg.step in t.steps:
            t.step(msg.step).sent = self._tensor(frames)

    def _tensor(self, frames: list[bytes]):
        """The message's (B, T, H) tensor, decoded from the codec as the receiver decodes it."""
        _, tensors = wire.decode(frames)
        return codecs.decode(tensors, self.traffic.codec, wire.dtype_from_name(self.traffic.dtype)).float()

    # ------------------------------------------------------------------ life cycle

    def stop(self) -> Traffic:
        """End the relay, close its sockets; returns the traffic."""
        self._stop.set()
        self._thread.join()
        return self.traffic

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
