"""Hostile input: a fuzzer sends malformed messages while two honest clients train."""

from __future__ import annotations

import random
import threading
import time

import msgspec
import pytest
import torch
import zmq

import menos
from menos import wire
from menos.codecs import Codec
from menos.messages import (
    PROTOCOL_VERSION, Activations, Backward, Error, Forward, Hello, LoraSpec, TokenKind, TokenRequest, Welcome,
    WorkerReady,
)  # fmt: skip

HONEST = dict(batch_size=2, seq_len=16, adapter=LoraSpec(r=4, alpha=8), lr=1e-2)
STEPS = 8
HIDDEN = 64


def _batch(seed, step):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed * 100 + step))


def _honest(endpoint, seed, out, barrier):
    with menos.connect(endpoint, seed=seed, **HONEST) as c:
        barrier.wait(120)
        out[seed] = [c.train_step(_batch(seed, s)) for s in range(STEPS)]


def _run_honest(endpoint, during=None):
    out: dict[int, list[float]] = {}
    barrier = threading.Barrier(2 + (during is not None))
    threads = [threading.Thread(target=_honest, args=(endpoint, s, out, barrier)) for s in (0, 1)]
    for t in threads:
        t.start()
    if during is not None:
        barrier.wait(120)
        during()
    for t in threads:
        t.join(300)
    return [out[0], out[1]]


def _raw(d: dict, metas=()) -> bytes:
    return msgspec.msgpack.encode({"msg": d, "tensors": [list(m) for m in metas]})


def hostile_messages(rng: random.Random, n: int):
    """n malformed or hostile multipart messages, a mix of every kind below."""
    t = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype)  # noqa: E731
    kinds = [
        lambda: [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 3))],  # random frames
        lambda: [_raw({"type": rng.choice(["forward", "backward", "nope", "", "hello"]), "step": "x"})],
        lambda: [_raw({"type": "forward", "step": 1, "train": True}, [("float32", (2, 16, HIDDEN))]),
                 bytes(rng.randint(0, 8191))],  # truncated tensor
        lambda: [_raw({"type": "forward", "step": 1, "train": True}, [("float32", (1 << 40, 1 << 40, 1 << 20))]),
                 b"\0" * 64],  # huge declared size
        lambda: wire.encode(Forward(step=1, train=True), [t(2, 16, HIDDEN, dtype=rng.choice([torch.float16, torch.int64]))]),
        lambda: wire.encode(Forward(step=1, train=True), [t(2, 16, rng.choice([1, 63, 65, 4096]))]),  # wrong hidden
        lambda: wire.encode(Forward(step=1, train=True), [t(rng.choice([3, 64]), 16, HIDDEN)]),  # batch over declared
        lambda: wire.encode(Forward(step=1, train=True), [t(2, rng.choice([17, 64]), HIDDEN)]),  # seq over declared
        lambda: wire.encode(Forward(step=1, train=True), [t(2, 16, HIDDEN).fill_(float(rng.choice(["nan", "inf"])))]),
        lambda: wire.encode(Forward(step=1, train=True), []),  # missing tensor
        lambda: wire.encode(Forward(step=1, train=True), [t(2, 16, HIDDEN), t(2, 16, HIDDEN)]),  # extra tensor
        lambda: wire.encode(Backward(step=rng.randint(-5, 5)), [t(2, 16, HIDDEN)]),  # no matching forward
        lambda: wire.encode(TokenRequest(request_id=1, nbytes=1 << 40, kind=TokenKind.BACKWARD)),  # worker messages from a client
        lambda: wire.encode(WorkerReady(persistent_bytes=0, private_params=0, m_f=0, m_b=0, t_f=0.0, t_b=0.0, profile_method="")),
        lambda: wire.encode(Activations(step=1), [t(2, 16, HIDDEN)]),
        lambda: wire.encode(Hello(head_layers=rng.choice([-1, 4, 99]), seq_len=16)),
        lambda: wire.encode(Hello(protocol=PROTOCOL_VERSION + rng.randint(1, 9), seq_len=16)),
        lambda: wire.encode(Hello(batch_size=0, seq_len=16)),
        # compressed frames (int8: values and per-row scales), against any session's codec
        lambda: wire.encode(Forward(step=1, train=True), [t(2, 16, HIDDEN, dtype=torch.int8),
                                                          t(2, 16, 1).fill_(rng.choice([0.0, -1.0, float("nan"), float("inf")]))]),
        lambda: wire.encode(Forward(step=1, train=True), [t(2, 16, HIDDEN, dtype=torch.int8), t(2, rng.choice([1, 15]), 1) + 1]),
        lambda: wire.encode(Forward(step=1, train=True), [t(2, 16, HIDDEN, dtype=torch.int8).fill_(-128), t(2, 16, 1) + 1]),
        lambda: wire.encode(Forward(step=1, train=True), [t(2, 16, HIDDEN, dtype=torch.int8)]),  # scales missing
        lambda: wire.encode(Forward(step=1, train=True), [t(rng.choice([3, 64]), 16, HIDDEN, dtype=torch.int8), t(2, 16, 1) + 1]),
        lambda: wire.encode(Backward(step=1), [t(2, 16, HIDDEN, dtype=torch.bfloat16)]),
        lambda: [_raw({"type": "hello", "seq_len": 16, "compression": rng.choice(["zip", "int4", 8])})],
    ]  # fmt: skip
    return [rng.choice(kinds)() for _ in range(n)]


@pytest.mark.timeout(900)
def test_fuzzing_does_not_disturb_honest_clients(checkpoints, start_manager):
    mgr = start_manager("--model", checkpoints("llama"), "--reject-nonfinite", "--max-message-bytes", str(1 << 20))
    undisturbed = _run_honest(mgr.endpoint)

    ctx = zmq.Context.instance()
    rng = random.Random(0)
    stats = {"sent": 0, "errors": 0, "other": []}

    def fuzz():
        # Two fuzzers hold real sessions (one compressed: int8), so tensor-level attacks reach
        # workers; one has none.
        session, compressed, anon = (ctx.socket(zmq.DEALER) for _ in range(3))
        for s in (session, compressed, anon):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(mgr.endpoint)
        try:
            for s, codec in ((session, Codec.NONE), (compressed, Codec.INT8)):
                s.send_multipart(wire.encode(Hello(batch_size=2, seq_len=16, send_sections=False, compression=codec)))
                assert s.poll(120_000)
                assert isinstance(wire.decode(s.recv_multipart())[0], Welcome)
            for frames in hostile_messages(rng, 1200):
                sock = rng.choice([session, compressed, anon])
                sock.send_multipart(frames)
                stats["sent"] += 1
                for s in (session, compressed, anon):  # collect replies as they come
                    while s.poll(0 if stats["sent"] % 50 else 20):
                        msg, _ = wire.decode(s.recv_multipart())
                        if isinstance(msg, Error):
                            stats["errors"] += 1
                        else:
                            stats["other"].append(type(msg).__name__)
            deadline = time.monotonic() + 60  # every hostile message gets its one answer
            while stats["errors"] + len(stats["other"]) < stats["sent"] and time.monotonic() < deadline:
                for s in (session, compressed, anon):
                    while s.poll(50):
                        msg, _ = wire.decode(s.recv_multipart())
                        if isinstance(msg, Error):
                            stats["errors"] += 1
                        else:
                            stats["other"].append(type(msg).__name__)
            session.send_multipart([b"\0" * (2 << 20)])  # over --max-message-bytes: zmq drops the peer
            # the fuzzer's own worker still serves a well-formed request
            probe = ctx.socket(zmq.DEALER)
            probe.setsockopt(zmq.LINGER, 0)
            probe.connect(mgr.endpoint)
            probe.send_multipart(wire.encode(Hello(batch_size=2, seq_len=16, send_sections=False)))
            assert probe.poll(120_000) and isinstance(wire.decode(probe.recv_multipart())[0], Welcome)
            probe.send_multipart(wire.encode(Forward(step=1, train=False), [torch.randn(2, 16, HIDDEN)]))
            assert probe.poll(60_000) and isinstance(wire.decode(probe.recv_multipart())[0], Activations)
            probe.close(0)
        finally:
            for s in (session, compressed, anon):
                s.close(0)

    disturbed = _run_honest(mgr.endpoint, during=fuzz)
    print(f"\nfuzz: {stats['sent']} hostile messages, {stats['errors']} error replies, others {set(stats['other'])}")
    assert stats["sent"] >= 1000
    assert stats["errors"] == stats["sent"]  # every one is answered with a clear error
    assert not stats["other"]  # and none with anything else
    assert disturbed == [pytest.approx(u, abs=1e-6) for u in undisturbed]
    assert mgr.proc.poll() is None
    assert menos.status(mgr.endpoint).clients  # the manager still answers; the probe's worker is alive
