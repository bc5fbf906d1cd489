"""CURVE on the manager's client socket: the server's key pair, the admitted client keys
(re-read when the directory changes), and who an authenticated message came from."""

from __future__ import annotations

import logging
import os
import time

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from menos import keys

log = logging.getLogger("menos.manager")

RELOAD_S = 1.0  # how often the admitted keys directory is checked for changes


def server_secret(state_dir: str) -> str:
    return os.path.join(keys.server_dir(state_dir), "server.key_secret")


def has_keys(state_dir: str) -> bool:
    return os.path.exists(server_secret(state_dir))


def plain_text_refusal(state_dir: str, listen: str, insecure: bool) -> str | None:
    """Why the manager must not serve ``listen`` as configured, with how to fix it; None if it may."""
    if has_keys(state_dir) or keys.is_loopback(listen) or insecure:
        return None
    return (
        f"menos-manager: refusing to serve {listen} in plain text. Create keys with\n"
        f"  menos-manager keys init --state-dir {state_dir}\n"
        f"  menos-manager keys add NAME CLIENT.key --state-dir {state_dir}\n"
        "or pass --insecure to accept unencrypted, unauthenticated clients."
    )


class CurveGate:
    """CURVE for ``sock`` when the state dir holds the server's keys; plain text otherwise."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, state_dir: str, listen: str):
        self.auth = None
        self._checked = 0.0
        if not has_keys(state_dir):
            level = logging.INFO if keys.is_loopback(listen) else logging.WARNING
            log.log(level, "plain text, unauthenticated clients on %s", listen)
            return
        public, secret_key = zmq.auth.load_certificate(server_secret(state_dir))
        sock.curve_publickey, sock.curve_secretkey = public, secret_key
        sock.curve_server = True
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("menos.manager.auth"))
        self.auth.start()
        self.clients_dir = keys.clients_dir(state_dir)
        os.makedirs(self.clients_dir, mode=0o700, exist_ok=True)
        self._seen = None
        self.reload()
        log.info("CURVE on: clients must hold a key listed in %s", self.clients_dir)

    def user(self, frame) -> str | None:
        """The authenticated client key (z85) of a received frame; None on a plain-text endpoint."""
        return frame.get("User-Id") if self.auth is not None else None

    def reload(self) -> None:
        """Re-read the admitted client keys if the directory changed (files dropped in)."""
        if self.auth is None:
            return
        seen = tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(self.clients_dir)))
        if seen != self._seen:
            self._seen = seen
            self.auth.configure_curve(domain="*", location=self.clients_dir)
            log.info("authorized client keys: %d", sum(name.endswith(".key") for name, _ in seen))

    def tick(self) -> None:
        """Call from the poll loop: reloads at most once per RELOAD_S."""
        if self.auth is not None and time.monotonic() - self._checked > RELOAD_S:
            self._checked = time.monotonic()
            self.reload()

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
