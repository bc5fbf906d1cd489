"""Nothing a client trained is lost: checkpoints, resume, crashes of a worker, the manager, a client."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

import menos
from menos import checkpoint
from menos.messages import ErrorCode, LoraSpec

CLIENT = dict(batch_size=2, seq_len=16, adapter=LoraSpec(r=4, alpha=8), lr=1e-2, seed=7, head_layers=1, tail_layers=1)


def _batch(i):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 + i))


@pytest.fixture(scope="module")
def reference(shared_manager):
    """Losses of 10 uninterrupted steps."""
    with menos.connect(shared_manager("llama").endpoint, **CLIENT) as c:
        return [c.train_step(_batch(i)) for i in range(10)]


def test_disconnect_and_resume_gives_the_uninterrupted_losses(reference, shared_manager, tmp_path):
    state = str(tmp_path / "alice")
    with menos.connect(shared_manager("llama").endpoint, identity="alice", state_dir=state, **CLIENT) as c:
        first = [c.train_step(_batch(i)) for i in range(5)]
    assert checkpoint.steps(state) == [5]
    with menos.connect(shared_manager("llama").endpoint, identity="alice", state_dir=state, resume=True, **CLIENT) as c:
        assert c.steps == 5
        second = [c.train_step(_batch(i)) for i in range(5, 10)]
    assert first + second == pytest.approx(reference, abs=1e-6)


def test_a_client_carrying_the_server_state_resumes_on_a_manager_that_never_ran_it(reference, shared_manager, tmp_path):
    """The cluster's resume anywhere, on one manager: with carry_server_state the client keeps a
    copy of each server checkpoint; the server's own is then gone (another machine), and the
    client's copy, handed over at connect, continues the run exactly."""
    from manager.sessions import checkpoint_dir
    from menos.join import carried_dir

    mgr = shared_manager("llama")
    state = str(tmp_path / "dave")
    with menos.connect(mgr.endpoint, identity="dave", state_dir=state, carry_server_state=True, **CLIENT) as c:
        first = [c.train_step(_batch(i)) for i in range(5)]
    assert checkpoint.steps(state) == checkpoint.steps(carried_dir(state)) == [5]
    server_dir = checkpoint_dir(mgr.state_dir, "dave")
    assert checkpoint.read_bytes(server_dir, 5) == checkpoint.read_bytes(carried_dir(state), 5)
    for name in os.listdir(server_dir):
        os.unlink(os.path.join(server_dir, name))
    with menos.connect(mgr.endpoint, identity="dave", state_dir=state, resume=True, carry_server_state=True,
                       **CLIENT) as c:  # fmt: skip
        assert c.steps == 5
        second = [c.train_step(_batch(i)) for i in range(5, 10)]
    assert first + second == pytest.approx(reference, abs=1e-6)
    assert checkpoint.steps(carried_dir(state))[-1] == 10


def test_a_carried_file_that_is_no_checkpoint_is_refused(shared_manager, tmp_path):
    from menos.join import carried_dir

    mgr = shared_manager("llama")
    state = str(tmp_path / "erin")
    with menos.connect(mgr.endpoint, identity="erin", state_dir=state, carry_server_state=True, **CLIENT) as c:
        c.train_step(_batch(0))
    os.makedirs(carried_dir(state), exist_ok=True)
    checkpoint.save(state, 7, {}, None)  # the client's own side of a step the server never saw
    with open(os.path.join(carried_dir(state), "step-00000007.safetensors"), "wb") as f:
        f.write(b"\x08" + b"\0" * 7 + b"not json, not tensors")
    with pytest.raises(menos.MenosError, match="carried checkpoint of step 7") as exc:
        menos.connect(mgr.endpoint, identity="erin", state_dir=state, resume=True, **CLIENT)
    assert exc.value.code == ErrorCode.BAD_REQUEST
    with menos.connect(mgr.endpoint, **CLIENT) as other:  # the manager serves on
        assert other.train_step(_batch(0)) > 0


def test_resume_without_a_matching_checkpoint_is_refused(shared_manager, tmp_path):
    state = str(tmp_path / "bob")
    with menos.connect(shared_manager("llama").endpoint, identity="bob", state_dir=state, **CLIENT) as c:
        c.train_step(_batch(0))
    with pytest.raises(menos.MenosError) as exc:  # another identity has no server checkpoint
        menos.connect(shared_manager("llama").endpoint, identity="mallory", state_dir=state, resume=True, **CLIENT)
    assert exc.value.code == ErrorCode.NO_CHECKPOINT
    with pytest.raises(ValueError, match="state_dir"):
        menos.connect(shared_manager("llama").endpoint, identity="bob", resume=True, **CLIENT)


def test_killed_worker_mid_backward_client_resumes_from_checkpoint(checkpoints, start_manager, tmp_path):
    mgr = start_manager("--model", checkpoints("small"), "--checkpoint-every", "2")
    # A backward long enough to be caught in: under a loaded suite a status round trip can take
    # as long as a short one, and the kill then lands after the reply (a CI-like run saw it).
    big = dict(CLIENT, batch_size=12, seq_len=128)
    batch = lambda i: torch.randint(0, 128, (12, 128), generator=torch.Generator().manual_seed(i))  # noqa: E731
    with menos.connect(mgr.endpoint, **big) as ref:
        reference = [ref.train_step(batch(i)) for i in range(6)]
    state = str(tmp_path / "carol")
    with menos.connect(mgr.endpoint, **dict(big, seed=1)) as other:
        with menos.connect(mgr.endpoint, identity="carol", state_dir=state, **big) as c:
            for i in range(3):
                c.train_step(batch(i))
            assert checkpoint.steps(state) == [2]
            pid = next(s.pid for s in menos.status(mgr.endpoint).clients if s.session == c.session)
            pending = c.forward_step(batch(3))
            errors = []

            def backward():
                try:
                    c.backward_step(pending)
                except menos.MenosError as exc:
                    errors.append((exc, time.monotonic()))

            t = threading.Thread(target=backward)
            t.start()
            while next(s.state for s in menos.status(mgr.endpoint).clients if s.session == c.session) != "computing":
                time.sleep(0.002)
            os.kill(pid, signal.SIGKILL)  # while it holds its backward grant
            killed = time.monotonic()
            t.join(30)
            (exc, when), = errors
            assert exc.code == ErrorCode.WORKER_DIED and when - killed < 5
        for i in range(3):
            other.train_step(batch(i))  # the others keep training
        st = menos.status(mgr.endpoint)
        assert st.granted == 0 and st.queued == 0 and len(st.clients) == 1
    with menos.connect(mgr.endpoint, identity="carol", state_dir=state, resume=True, **big) as c:
        assert c.steps == 2
        resumed = [c.train_step(batch(i)) for i in range(2, 6)]
    assert resumed == pytest.approx(reference[2:6], abs=1e-6)


def test_killed_manager_workers_exit_and_a_new_manager_resumes(reference, checkpoints, start_manager, tmp_path):
    state_dir = str(tmp_path / "server")
    mgr = start_manager("--model", checkpoints("llama"), "--checkpoint-every", "3", state_dir=state_dir)
    state = str(tmp_path / "dave")
    c = menos.connect(mgr.endpoint, identity="dave", state_dir=state, **CLIENT)
    for i in range(4):
        c.train_step(_batch(i))
    assert mgr.workers()
    children = mgr.children()  # the workers, the launcher that forked them, the rest
    os.kill(mgr.pid, signal.SIGKILL)
    mgr.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"{alive} outlived the manager by 10 s"
    c.close()  # saves the client's step 4; the server's last checkpoint is step 3
    mgr2 = start_manager("--model", checkpoints("llama"), "--checkpoint-every", "3", state_dir=state_dir)
    assert glob.glob(f"/dev/shm/menos_{mgr.pid}_*") == []
    assert not os.path.exists(os.path.join(state_dir, f"run-{mgr.pid}"))
    # The worker checkpointed at its exit (step 4) unless cut off mid-update; either way
    # the client resumes at a step both sides have, and the losses continue exactly.
    with menos.connect(mgr2.endpoint, identity="dave", state_dir=state, resume=True, **CLIENT) as c2:
        assert c2.steps in (3, 4)
        resumed = [c2.train_step(_batch(i)) for i in range(c2.steps, 7)]
    assert resumed == pytest.approx(reference[7 - len(resumed) : 7], abs=1e-6)


CLIENT_SCRIPT = r"""
import sys, torch, menos
c = menos.connect(sys.argv[1], identity="erin", state_dir=sys.argv[2], batch_size=2, seq_len=16)
for i in range(3):
    c.train_step(torch.randint(0, 128, (2, 16)))
print("trained", flush=True)
import time; time.sleep(600)
"""


def test_vanished_client_worker_checkpoints_and_exits(checkpoints, start_manager, tmp_path):
    mgr = start_manager("--model", checkpoints("llama"), "--client-timeout", "3", "--checkpoint-every", "0")
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, mgr.endpoint, str(tmp_path / "erin")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "trained"
        (worker,) = mgr.workers()
        proc.kill()
        worker.wait(30)  # heartbeats stop; after 3 s the manager stops the worker
    finally:
        proc.kill()
        proc.wait()
    ckpts = glob.glob(os.path.join(mgr.state_dir, "checkpoints", "*", "step-00000003.safetensors"))
    assert len(ckpts) == 1
    # The worker's exit and a status request can reach the manager in one poll, the request first:
    # the session is gone once the manager has reaped it, within a second or so.
    deadline = time.monotonic() + 5
    while menos.status(mgr.endpoint).clients and time.monotonic() < deadline:
        time.sleep(0.1)
    assert menos.status(mgr.endpoint).clients == ()
