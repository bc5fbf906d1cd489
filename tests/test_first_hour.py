"""A new user's ordinary mistakes: each gets a clear error that names the problem, within
seconds (not after a timeout), and the server goes on serving everyone else."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import zmq

import menos
from menos.messages import ErrorCode
from menos.models import builtin_config, random_model, save_checkpoint
from tests.conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = dict(batch_size=2, seq_len=16)
FAST_S = 5.0  # "within seconds": well under any timeout


class _Clock:
    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.s = time.monotonic() - self.t0


def test_bad_token_ids_and_a_closed_client_are_refused_before_anything_is_sent(shared_manager):
    mgr = shared_manager("llama")
    ok = torch.randint(0, 128, (2, 16))
    with menos.connect(mgr.endpoint, identity="first-hour-ids", **CLIENT) as c:
        with pytest.raises(ValueError, match=r"token id 128, outside the vocabulary \(0..127\)"):
            c.train_step(torch.full((2, 16), 128))
        with pytest.raises(ValueError, match=r"labels holds -5"):
            c.train_step(ok, torch.full((2, 16), -5))
        with pytest.raises(TypeError, match="integer token ids"):
            c.train_step(ok.float())
        with pytest.raises(TypeError, match="not str"):
            c.train_step("hello")
        assert c.train_step(ok.tolist()) > 0  # lists of ints are taken as a tensor
        import numpy as np

        assert c.eval_step(np.asarray(ok)) > 0
    with pytest.raises(menos.MenosError, match="closed") as exc:
        c.train_step(ok)
    assert exc.value.code == ErrorCode.CLOSED


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5555", "localhost", "tcp://127.0.0.1", "tcp://127.0.0.1:*", ""])
def test_a_malformed_endpoint_gets_an_example_of_a_good_one(endpoint):
    with _Clock() as t, pytest.raises(ValueError, match=r"e\.g\. tcp://127\.0\.0\.1:5555"):
        menos.connect(endpoint, **CLIENT)
    assert t.s < 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_is_said_at_once_not_after_the_step_timeout():
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with _Clock() as t, pytest.raises(menos.MenosError, match="nothing answered.*is a manager running") as exc:
        menos.connect(endpoint, connect_timeout_s=2.0, **CLIENT)
    assert exc.value.code == ErrorCode.UNREACHABLE and t.s < FAST_S
    out = subprocess.run([sys.executable, "-m", "manager", "status", "--connect", endpoint], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1 and "nothing answered" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_plain_text_client_against_a_curve_server_is_told_to_pass_keys():
    ctx = zmq.Context.instance()
    public, secret = zmq.curve_keypair()
    server = ctx.socket(zmq.ROUTER)
    server.curve_server, server.curve_secretkey, server.curve_publickey = True, secret, public
    port = server.bind_to_random_port("tcp://127.0.0.1")
    try:
        with _Clock() as t, pytest.raises(menos.MenosError, match="uses CURVE.*pass server_key=") as exc:
            menos.connect(f"tcp://127.0.0.1:{port}", **CLIENT)
        assert exc.value.code == ErrorCode.HANDSHAKE and t.s < FAST_S
    finally:
        server.close(0)


def test_paths_expand_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = menos.ClientConfig(state_dir="~/state", model="~/ckpt")
    assert (cfg.state_dir, cfg.model) == (str(tmp_path / "state"), str(tmp_path / "ckpt"))
    from manager.cli import main  # noqa: F401  (the manager's side: menos-manager start --model ~/...)
    from manager.config import ManagerConfig, add_arguments, from_args
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    mcfg = from_args(p.parse_args(["--model", "~/ckpt", "--state-dir", "~/menos"]), ManagerConfig)
    assert (mcfg.model, mcfg.state_dir) == (str(tmp_path / "ckpt"), str(tmp_path / "menos"))


def _manager(*args, env=None):
    return subprocess.run([sys.executable, "-m", "manager", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


def _one_line(out, words):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert words in out.stderr, out.stderr


def test_server_commands_fail_like_command_line_tools(tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    garbage = tmp_path / "garbage-weights"  # loads in the loader process: its reason comes back
    builtin_config().save_pretrained(garbage)
    (garbage / "model.safetensors").write_bytes(b"\x08" + bytes(63))
    state = ["--state-dir", str(tmp_path / "state")]
    for args, words in [
        (["start", "--model", str(tmp_path / "missing"), *state], "no such directory"),
        (["start", "--model", str(config_only), *state], "no weights"),
        (["start", "--device", "tpu", *state], "use cpu, cuda or cuda:N"),
        (["keys", "add", "alice", str(tmp_path / "alice.key"), *state], "no such file"),
    ]:
        with _Clock() as t:
            out = _manager(*args)
        _one_line(out, words)
        assert t.s < FAST_S, (args, t.s)
    # after the imports a start needs (seconds, not timed here): the loader's reason, in one line
    _one_line(_manager("start", "--model", str(garbage), *state), "the model did not load: SafetensorError: ")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line(_manager("start", "--listen", f"tcp://127.0.0.1:{port}", *state), "Address already in use")


def test_a_cuda_device_that_is_not_there_is_named():
    """The check ``menos-manager start`` runs once torch is imported (its one-line exit is
    the one tested above)."""
    from manager.preflight import StartupError, check_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(StartupError, match="no CUDA device here" if not count else f"has {count} CUDA device"):
        check_device(f"cuda:{max(count, 0)}" if count else "cuda", torch)
    check_device("cpu", torch)


def test_a_local_checkpoint_with_other_weights_is_refused_and_its_worker_goes_at_once(checkpoints, shared_manager,
                                                                                       tmp_path):  # fmt: skip
    """Same architecture, other weights (another fine-tune): model_mismatch naming the first
    tensor that differs; the session's worker exits at once, the others train on."""
    mgr = shared_manager("llama")
    other = save_checkpoint(random_model(TINY["llama"](), seed=2), str(tmp_path / "other-llama"))
    with menos.connect(mgr.endpoint, identity="first-hour-other", **CLIENT) as bystander:
        with _Clock() as t, pytest.raises(menos.MenosError, match="differs from the server's base") as exc:
            menos.connect(mgr.endpoint, model=other, identity="first-hour-mismatch", **CLIENT)
        assert exc.value.code == ErrorCode.MODEL_MISMATCH and ": lm_head.weight differs" in str(exc.value)  # the first, by name
        assert t.s < FAST_S * 2
        deadline = time.monotonic() + FAST_S
        while any(c.identity == "first-hour-mismatch" for c in menos.status(mgr.endpoint).clients):
            assert time.monotonic() < deadline, "the worker of a client that gave up lives on"
            time.sleep(0.1)
        assert bystander.train_step(torch.randint(0, 128, (2, 16))) > 0
    with menos.connect(mgr.endpoint, model=checkpoints("llama"), identity="first-hour-same", **CLIENT) as c:
        assert c.train_step(torch.randint(0, 128, (2, 16))) > 0  # the same base is accepted


def test_the_port_check_takes_a_port_in_time_wait_and_interface_names():
    from manager.preflight import StartupError, check_port_free

    with socket.socket() as s:  # a listener closed with a connection open leaves TIME_WAIT behind
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = s.accept()
        a.close()
        c.close()
    check_port_free(f"tcp://127.0.0.1:{port}")  # free again: a restart must not be refused
    check_port_free("tcp://no-such-interface-name:5555")  # left to ZeroMQ
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(StartupError, match="in use"):
            check_port_free(f"tcp://127.0.0.1:{held.getsockname()[1]}")


def test_a_demo_too_short_for_its_clients_schedules_says_so_before_starting(capsys):
    from tools import demo

    with pytest.raises(SystemExit) as exc:
        demo.main(["--steps", "5"])
    assert exc.value.code == 2
    assert "--steps 5: lr_schedule='cosine' needs total_steps > warmup_steps" in capsys.readouterr().err
