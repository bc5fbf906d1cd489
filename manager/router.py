"""Reading a ROUTER socket: every message waiting now, each handled on its own, so one
bad message costs nobody else anything. Shared by the manager and a cluster's gateway."""

from __future__ import annotations

import logging

import zmq


def drain(sock: zmq.Socket, handler, log: logging.Logger, limit: int = 1000) -> None:
    """``handler(routing id, frames)`` for up to ``limit`` waiting messages; an exception in
    one is logged, not raised."""
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        if len(frames) < 2:  # a routing id and nothing else
            continue
        try:
            handler(frames[0].bytes, frames[1:])
        except Exception:  # noqa: BLE001  one bad message must not stop the server
            log.exception("error handling a message")
