"""CURVE: who may connect, and that nothing crosses the network in plain text."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import menos

CLIENT = dict(batch_size=2, seq_len=16, adapter=menos.LoraSpec(r=4, alpha=8))
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "manager", *args], capture_output=True, text=True, timeout=120)


class Relay(threading.Thread):
    """A TCP relay on 127.0.0.2 that records every byte both ways: what a wiretap would see."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.lsock = socket.create_server(("127.0.0.2", 0))
        self.endpoint = f"tcp://127.0.0.2:{self.lsock.getsockname()[1]}"
        self.captured = bytearray()
        self.done = threading.Event()
        self.start()

    def run(self):
        peers: dict[socket.socket, socket.socket] = {}
        self.lsock.setblocking(False)
        while not self.done.is_set():
            ready, _, _ = select.select([self.lsock, *peers], [], [], 0.1)
            for s in ready:
                if s is self.lsock:
                    a, _ = s.accept()
                    b = socket.create_connection(self.target)
                    peers[a], peers[b] = b, a
                    continue
                data = s.recv(65536) if s in peers else b""
                if data:
                    self.captured += data
                    peers[s].sendall(data)
                else:
                    other = peers.pop(s, None)
                    peers.pop(other, None)
                    for x in (s, other):
                        if x is not None:
                            x.close()
        for s in peers:
            s.close()
        self.lsock.close()

    def stop(self):
        self.done.set()
        self.join(5)


@pytest.fixture
def keyed_state(tmp_path):
    """A state dir with server keys and one admitted client, alice; plus eve, not admitted."""
    state = str(tmp_path / "state")
    assert _cli("keys", "init", "--state-dir", state).returncode == 0
    for name in ("alice", "eve"):
        assert _cli("keys", "new", name, "--out", str(tmp_path / "client")).returncode == 0
    out = _cli("keys", "add", "alice", str(tmp_path / "client" / "alice.key"), "--state-dir", state)
    assert out.returncode == 0, out.stderr
    refused = _cli("keys", "add", "x", str(tmp_path / "client" / "alice.key_secret"), "--state-dir", state)
    assert refused.returncode != 0 and "public" in refused.stderr  # a secret key is never admitted
    keys = {n: str(tmp_path / "client" / f"{n}.key_secret") for n in ("alice", "eve")}
    return state, keys, os.path.join(state, "keys", "server.key")


def test_plain_text_off_loopback_is_refused_with_instructions(tmp_path):
    out = _cli("start", "--listen", "tcp://127.0.0.2:*", "--state-dir", str(tmp_path / "s"))
    assert out.returncode != 0
    assert "keys init" in out.stderr and "--insecure" in out.stderr


def test_only_admitted_keys_connect_and_traffic_is_encrypted(keyed_state, checkpoints, start_manager, tmp_path):
    state, keys, server_key = keyed_state
    mgr = start_manager("--model", checkpoints("llama"), "--listen", "tcp://127.0.0.2:*", state_dir=state)
    relay = Relay(mgr.endpoint)
    try:
        with menos.connect(relay.endpoint, client_key=keys["alice"], server_key=server_key, **CLIENT) as c:
            assert c.train_step(IDS) > 0
    finally:
        relay.stop()
    assert len(relay.captured) > 10_000  # the model's sections and activations went through
    for plain in (b"hello", b"forward", b"model_type", b"welcome", b"activations"):
        assert plain not in relay.captured, plain

    t0 = time.monotonic()
    with pytest.raises(menos.MenosError) as exc:  # a key the server does not list
        menos.connect(mgr.endpoint, client_key=keys["eve"], server_key=server_key, timeout_s=20, **CLIENT)
    assert exc.value.code == "unauthorized" and time.monotonic() - t0 < 20

    other = tmp_path / "other"
    _cli("keys", "new", "fake-server", "--out", str(other))
    t0 = time.monotonic()
    with pytest.raises(menos.MenosError, match="server_key is not its public key") as exc:  # the wrong server key
        menos.connect(mgr.endpoint, client_key=keys["alice"], server_key=str(other / "fake-server.key"),
                      timeout_s=60, **CLIENT)  # fmt: skip
    assert exc.value.code == "handshake" and time.monotonic() - t0 < 10

    # a key file dropped into the clients directory is picked up without a restart
    shutil.copyfile(keys["eve"].removesuffix("_secret"), os.path.join(state, "keys", "clients", "eve.key"))
    time.sleep(2)
    with menos.connect(mgr.endpoint, client_key=keys["eve"], server_key=server_key, **CLIENT) as c:
        assert c.eval_step(IDS) > 0


def test_insecure_plain_text_is_readable_on_the_wire(checkpoints, start_manager):
    """The control for the test above: without CURVE the same tap reads the messages."""
    mgr = start_manager("--model", checkpoints("llama"), "--listen", "tcp://127.0.0.2:*", "--insecure")
    relay = Relay(mgr.endpoint)
    try:
        with menos.connect(relay.endpoint, **CLIENT) as c:
            c.train_step(IDS)
    finally:
        relay.stop()
    assert b"hello" in relay.captured and b"model_type" in relay.captured
