"""CURVE set up on one side only, or with the wrong files: each says what to pass, at once."""

import pytest
import zmq
import zmq.auth

import menos
from menos.messages import ErrorCode

CLIENT = dict(batch_size=2, seq_len=16, connect_timeout_s=5)


@pytest.fixture
def keys(tmp_path):
    public, secret = zmq.auth.create_certificates(str(tmp_path), "alice")
    server_public, _ = zmq.auth.create_certificates(str(tmp_path), "server")
    return {"public": public, "secret": secret, "server": server_public, "dir": tmp_path}


def test_a_curve_client_against_a_plain_server_is_told_both_causes(keys):
    server = zmq.Context.instance().socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(menos.MenosError, match="drop client_key and server_key") as exc:
            menos.connect(f"tcp://127.0.0.1:{port}", client_key=keys["secret"], server_key=keys["server"], **CLIENT)
        assert exc.value.code == ErrorCode.HANDSHAKE
    finally:
        server.close(0)


@pytest.mark.parametrize("which, words", [
    ("missing secret", "client_key {dir}/nobody.key_secret: no such file (your NAME.key_secret"),
    ("public as secret", "client_key {dir}/alice.key: holds no secret key"),
    ("garbage", "client_key {dir}/garbage.key_secret: not a ZeroMQ key file"),
    ("server key only", "CURVE needs both client_key"),
    ("missing server key", "server_key {dir}/nope.key: no such file (the server's STATE_DIR/keys/server.key)"),
])  # fmt: skip
def test_wrong_key_files_are_named_before_connecting(keys, which, words):
    d = keys["dir"]
    (d / "garbage.key_secret").write_text("not a certificate\n")
    kw = {"missing secret": dict(client_key=str(d / "nobody.key_secret"), server_key=keys["server"]),
          "public as secret": dict(client_key=keys["public"], server_key=keys["server"]),
          "garbage": dict(client_key=str(d / "garbage.key_secret"), server_key=keys["server"]),
          "server key only": dict(server_key=keys["server"]),
          "missing server key": dict(client_key=keys["secret"], server_key=str(d / "nope.key"))}[which]  # fmt: skip
    with pytest.raises(ValueError) as exc:
        menos.connect("tcp://127.0.0.1:9", **kw, **CLIENT)  # nothing listens there: the files are read first
    assert words.format(dir=d) in str(exc.value)
