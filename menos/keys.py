"""CURVE key pairs, in ZeroMQ's certificate files (``NAME.key`` public, ``NAME.key_secret``).

The server's pair lives in ``STATE_DIR/keys/``; the public keys of the clients it
admits live in ``STATE_DIR/keys/clients/`` (one ``NAME.key`` each, dropped in or added
with ``menos-manager keys add``). A client holds its own pair and the server's public key.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

import zmq
import zmq.auth


@dataclass(frozen=True)
class CurveKeys:
    """What a client socket needs for CURVE: its own pair and the server's public key (z85 bytes)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, client_secret_file: str | None, server_public_file: str | None) -> "CurveKeys":
        """ValueError naming the argument for a missing, unreadable or wrong file."""
        if not client_secret_file or not server_public_file:
            raise ValueError("CURVE needs both client_key (your .key_secret) and server_key (the server's public .key)")
        public, secret = _certificate("client_key", client_secret_file, "your NAME.key_secret, from menos-manager keys new NAME")
        if secret is None:
            raise ValueError(f"client_key {client_secret_file}: holds no secret key (use the .key_secret file)")
        server, _ = _certificate("server_key", server_public_file, "the server's STATE_DIR/keys/server.key")
        return cls(public, secret, server)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def _certificate(arg: str, path: str, what: str) -> tuple[bytes, bytes | None]:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ValueError(f"{arg} {path}: no such file ({what})")
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:  # zmq: "Invalid certificate file"
        raise ValueError(f"{arg} {path}: not a ZeroMQ key file ({exc}); it should be {what}") from None


def new_pair(directory: str, name: str) -> tuple[str, str]:
    """Create ``directory/name.key`` and ``name.key_secret``; returns their paths."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-'")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public = os.path.join(directory, f"{name}.key")
    for path in (public, public + "_secret"):  # either one: the pair would no longer match
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists, not overwriting a key")
    pub, sec = zmq.auth.create_certificates(directory, name)
    os.chmod(sec, 0o600)
    return pub, sec


def server_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "keys")


def clients_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "keys", "clients")


def add_client(state_dir: str, name: str, keyfile: str) -> str:
    """Admit a client: copy its PUBLIC key file into the clients directory."""
    public, secret = zmq.auth.load_certificate(keyfile)
    if secret is not None:
        raise ValueError(f"{keyfile} holds a secret key: give the client's public .key file")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"client name {name!r}: use letters, digits, '.', '_' or '-'")
    os.makedirs(clients_dir(state_dir), mode=0o700, exist_ok=True)
    dest = os.path.join(clients_dir(state_dir), f"{name}.key")
    shutil.copyfile(keyfile, dest)
    return dest


def is_loopback(endpoint: str) -> bool:
    """Plain text is allowed here: ipc://, inproc://, or TCP on 127.0.0.1 / localhost / [::1]."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:]+):(\d+|\*)", endpoint)
    return bool(m) and m.group(1) in ("127.0.0.1", "localhost", "[::1]")
