"""A real manager process, real workers, the client library: parity, concurrency, errors, exit."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import pytest
import torch
import zmq

import menos
from menos import wire
from menos.adapters import inject
from menos.messages import Error, ErrorCode, Forward, Hello, LoraSpec, WorkerHello
from menos.models import load_base

SPEC = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))


def _batch(seed=0, b=2, t=16):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_split_matches_local_fine_tuning(name, checkpoints, shared_manager):
    path = checkpoints(name)
    mgr = shared_manager(name)
    ids = _batch()
    _, full = load_base(path, torch.float32)
    with torch.no_grad():
        ref_eval = full(ids, labels=ids).loss.item()
    opt = torch.optim.AdamW(inject(full, SPEC, seed=3), lr=1e-2, weight_decay=0.0)

    # sections sent by the manager (model=None) and loaded locally (model=path) agree
    with menos.connect(mgr.endpoint, model=path, head_layers=1, tail_layers=1, adapter=SPEC,
                       batch_size=2, seq_len=16) as local:  # fmt: skip
        assert local.eval_step(ids) == pytest.approx(ref_eval, abs=1e-5)
    with menos.connect(mgr.endpoint, head_layers=1, tail_layers=1, adapter=SPEC, batch_size=2, seq_len=16,
                       lr=1e-2, seed=3) as client:  # fmt: skip
        assert client.server_layers == (1, 3)
        assert client.eval_step(ids) == pytest.approx(ref_eval, abs=1e-5)
        for step in range(4):
            split = client.train_step(ids)
            ref = full(ids, labels=ids).loss
            ref.backward()
            opt.step()
            opt.zero_grad()
            assert split == pytest.approx(ref.item(), abs=1e-4), f"step {step}"
        with torch.no_grad():
            assert client.eval_step(ids) == pytest.approx(full(ids, labels=ids).loss.item(), abs=1e-4)


def test_three_concurrent_clients_with_different_cuts_and_ranks(shared_manager):
    mgr = shared_manager("llama")
    setups = [
        dict(head_layers=1, tail_layers=0, adapter=LoraSpec(r=2, alpha=4)),
        dict(head_layers=2, tail_layers=1, adapter=LoraSpec(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj"))),
        dict(head_layers=1, tail_layers=2, adapter=LoraSpec(r=4, alpha=8)),
    ]  # fmt: skip
    results, errors = {}, []

    def train(i, kw):
        try:
            with menos.connect(mgr.endpoint, batch_size=2, seq_len=16, lr=2e-2, seed=i, **kw) as c:
                ids = _batch(seed=i)
                results[i] = (c.server_layers, [c.train_step(ids) for _ in range(8)])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(i, kw)) for i, kw in enumerate(setups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert [results[i][0] for i in range(3)] == [(1, 4), (2, 3), (1, 2)]
    for i, (_, losses) in results.items():
        print(f"client {i}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        assert losses[-1] < losses[0] - 0.05, (i, losses)


def _raw_socket(endpoint):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _ask(sock, frames, timeout_ms=60000):
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), "no reply"
    return wire.decode(sock.recv_multipart())[0]


def test_bad_input_gets_clear_errors_and_others_keep_training(shared_manager):
    mgr = shared_manager("llama")
    ids = _batch()
    with menos.connect(mgr.endpoint, batch_size=2, seq_len=16, adapter=SPEC, lr=1e-2) as honest:
        first = honest.train_step(ids)
        raw = _raw_socket(mgr.endpoint)
        try:
            err = _ask(raw, [b"\x00not msgpack"])
            assert isinstance(err, Error) and err.code == ErrorCode.BAD_MESSAGE
            err = _ask(raw, wire.encode(Forward(step=1, train=True), [torch.zeros(2, 16, 64)]))
            assert err.code == ErrorCode.UNKNOWN_SESSION
            err = _ask(raw, wire.encode(WorkerHello()))
            assert err.code == ErrorCode.BAD_MESSAGE and "may not send" in err.message
            err = _ask(raw, wire.encode(Hello(head_layers=3, tail_layers=1, seq_len=16)))
            assert err.code == ErrorCode.BAD_REQUEST and "no block for the server" in err.message
            err = _ask(raw, wire.encode(Hello(batch_size=1 << 24, seq_len=64)))  # terabytes of activations
            assert err.code == ErrorCode.TOO_LARGE and "capacity" in err.message
        finally:
            raw.close(0)
        # wrong tensors inside a real session: the worker refuses them, the session survives
        with menos.connect(mgr.endpoint, batch_size=2, seq_len=16, adapter=SPEC) as clumsy:
            chan = clumsy.stages[0].chan  # speak the protocol by hand
            for bad, code in [
                (torch.zeros(2, 16, 63), ErrorCode.BAD_TENSOR),
                (torch.zeros(2, 16, 64, dtype=torch.float16), ErrorCode.BAD_TENSOR),
                (torch.zeros(4, 16, 64), ErrorCode.BAD_TENSOR),
            ]:
                chan.send(Forward(step=1, train=True), [bad])
                with pytest.raises(menos.MenosError) as exc:
                    chan.recv(Error)  # any reply other than Error would fail here too
                assert exc.value.code == code
            chan.sock.send_multipart(wire.encode(Forward(step=1, train=True), [torch.zeros(2, 16, 64)])[:1])  # frame missing
            with pytest.raises(menos.MenosError, match="bad_message"):
                chan.recv(Error)
            with pytest.raises(ValueError, match="exceeds"):
                clumsy.train_step(_batch(b=3))
            assert clumsy.eval_step(ids) > 0
        assert honest.train_step(ids) < first


def test_worker_death_is_reported_and_others_continue(shared_manager):
    mgr = shared_manager("llama")
    ids = _batch()
    with menos.connect(mgr.endpoint, batch_size=2, seq_len=16, adapter=SPEC) as victim, \
         menos.connect(mgr.endpoint, batch_size=2, seq_len=16, adapter=SPEC) as other:  # fmt: skip
        victim.train_step(ids)
        status = menos.status(mgr.endpoint)
        pid = next(c.pid for c in status.clients if c.session == victim.session)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(menos.MenosError) as exc:
            victim.train_step(ids)
        assert exc.value.code == ErrorCode.WORKER_DIED
        assert time.monotonic() - t0 < 5
        for _ in range(2):
            other.train_step(ids)
        status = menos.status(mgr.endpoint)
        sessions = {c.session for c in status.clients}
        assert other.session in sessions and victim.session not in sessions
        assert status.granted == 0 and status.queued == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_manager_stop_leaves_nothing_behind(sig, checkpoints, start_manager):
    mgr = start_manager("--model", checkpoints("opt"))
    clients = [menos.connect(mgr.endpoint, batch_size=2, seq_len=16, adapter=SPEC) for _ in range(2)]
    clients[0].train_step(_batch())
    workers = mgr.workers()
    assert len(workers) == 2
    segments = glob.glob(f"/dev/shm/menos_{mgr.pid}_*")
    assert len(segments) == 1
    run_dir = os.path.join(mgr.state_dir, f"run-{mgr.pid}")
    assert os.path.exists(os.path.join(run_dir, "workers.sock"))

    assert mgr.stop(sig) == 0
    for w in workers:
        assert not w.is_running() or w.status() == "zombie"
    assert glob.glob(f"/dev/shm/menos_{mgr.pid}_*") == []
    assert not os.path.exists(run_dir)
    assert not os.path.exists(os.path.join(mgr.state_dir, "manager.json"))
    for c in clients:  # the clients are told, not left hanging
        with pytest.raises(menos.MenosError, match="shutting_down"):
            c.train_step(_batch())
        c.close()
