"""Memory the scheduler does not own, through real processes: the manager samples the
device's free memory on a timer and never grants more than a reading allows. Outside
use is an injected free-memory source (``--free-memory-file``: the bytes free, as a
file the test rewrites), since the 24 GiB test machine cannot be filled for real."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import menos
from manager.metrics import Metrics
from manager.scheduler import Scheduler
from manager.sessions import Session
from manager.tokens import TokenDesk
from menos.cut import Cut
from menos.messages import Hello, LoraSpec, TokenGrant, TokenKind, TokenRelease, TokenRequest

CLIENT = dict(batch_size=4, seq_len=128, adapter=LoraSpec(r=4, alpha=8), lr=1e-2)


def _batch(i):
    return torch.randint(0, 128, (4, 128), generator=torch.Generator().manual_seed(i))


def test_bursts_stay_within_readings_and_a_blocked_head_wakes_when_outside_use_drops(
    checkpoints, start_manager, tmp_path
):
    free_file = tmp_path / "free"
    free_file.write_text("8GiB")
    trace = tmp_path / "trace.jsonl"
    mgr = start_manager("--model", checkpoints("small"), "--memory-capacity", "8GiB",
                        "--free-memory-file", str(free_file), "--trace", str(trace))  # fmt: skip
    clients = [menos.connect(mgr.endpoint, seed=i, **CLIENT) for i in range(3)]
    try:
        m_b = max(c.m_b for c in menos.status(mgr.endpoint).clients)
        # (a) the device has room for 1.5 backwards: three clients at once must take turns
        free_file.write_text(str(int(1.5 * m_b)))
        time.sleep(1.5)  # the idle sampler (every 1 s) takes the new reading
        errors, threads = [], []
        start = threading.Barrier(3)  # all three at once: under a loaded suite, staggered starts took no turns

        def train(c, i):
            try:
                start.wait(60)
                for step in range(3):
                    c.train_step(_batch(10 * i + step))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        for i, c in enumerate(clients):
            threads.append(threading.Thread(target=train, args=(c, i)))
            threads[-1].start()
        for t in threads:
            t.join(300)
        assert not errors, errors

        # (b) outside use takes all but a forward's worth; a backward waits, then wakes
        # on the reading alone, within a second of the use dropping
        free_file.write_text("1MiB")
        time.sleep(1.5)
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (clients[0].train_step(_batch(99)), done.set()))
        waiter.start()
        assert not done.wait(2.0), "granted although the device had no room"
        assert menos.status(mgr.endpoint).queued == 1
        free_file.write_text("8GiB")
        dropped = time.monotonic()
        assert done.wait(30)
        woke = time.monotonic() - dropped
        waiter.join(10)
    finally:
        for c in clients:
            c.close()
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    reading = held_at = None
    turns = 0
    for e in events:
        if e["event"] == "reading":
            reading, held_at = e["nbytes"], e["used"]
        elif reading is not None:
            assert e["used"] <= reading + held_at, e
        turns += e["event"] == "request" and e["waiting"] > 0
    assert turns > 0  # (a) clients did wait for each other under the reading
    print(f"\nM_b {m_b / 2**20:.1f} MiB; the blocked backward was granted {woke:.2f} s after outside use dropped")
    assert woke < 1.0 + 0.5  # sampled every 0.1 s while anyone waits; the step's compute comes on top


class _Failing:
    def free(self):
        raise RuntimeError("NVML: GPU is lost")


class _Handle:
    pid = 0


def test_a_failed_reading_costs_no_request_and_no_release():
    """The old code read NVML inside the token handler: an exception there dropped the
    TokenRelease and leaked its grant."""
    sched = Scheduler(100)
    s = Session("s1", b"c", Hello(), Cut(4, 1, 0), 10, 40, _Handle())
    desk = TokenDesk(sched, {"s1": s}, Metrics(), _Failing())
    assert desk.tick(0.0) == []  # logged, skipped
    (out,) = desk.request(s, TokenRequest(request_id=1, nbytes=40, kind=TokenKind.BACKWARD), 0.1)
    assert isinstance(out[1], TokenGrant)
    assert desk.tick(5.0) == []
    assert desk.release(s, TokenRelease(request_id=1), 0.2) == []
    assert sched.used == 0 and not sched.granted


@pytest.mark.parametrize("waiting, expected", [(False, (1, 2)), (True, (9, 11))])
def test_the_sampler_runs_on_a_timer(waiting, expected):
    readings = []

    class Source:
        def free(self):
            readings.append(1)
            return 0  # nothing is ever granted: only the sampling is counted

    sched = Scheduler(100)
    if waiting:
        sched.device_free(0)
        sched.request("x", 1, 50)
    desk = TokenDesk(sched, {}, Metrics(), Source())
    for i in range(101):
        desk.tick(i * 0.01)  # one second: every 1 s when idle, every 0.1 s while anyone waits
    assert expected[0] <= len(readings) <= expected[1]


def test_a_client_whose_standing_memory_does_not_fit_is_refused_at_connect(checkpoints, start_manager):
    """(f) Each session's standing memory (adapter, optimizer state, kept input) is held for its
    life: room for two such clients and one backward admits two, and refuses the third at
    connect, before any worker starts, naming the standing memory."""
    from transformers import AutoConfig

    from menos.estimator import estimate, with_margin

    big = dict(CLIENT, adapter=LoraSpec(r=256, alpha=256, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj")))  # fmt: skip
    est = estimate(AutoConfig.from_pretrained(checkpoints("small")), 1, 0, 4, 128, 4, big["adapter"])
    assert est.standing > 0.3 * est.m_b  # standing memory this large makes the test's margins wide
    capacity = with_margin(est.m_b) + int(2.6 * est.standing)
    mgr = start_manager("--model", checkpoints("small"), "--memory-capacity", str(capacity))
    admitted = [menos.connect(mgr.endpoint, seed=i, **big) for i in range(2)]
    try:
        with pytest.raises(menos.MenosError) as exc:
            menos.connect(mgr.endpoint, seed=2, **big)
        assert exc.value.code == menos.ErrorCode.TOO_LARGE and "standing memory" in exc.value.message
        st = menos.status(mgr.endpoint)
        assert len(st.clients) == 2 and st.standing == sum(c.standing_bytes for c in st.clients)
        assert admitted[0].train_step(_batch(0)) > 0  # the admitted ones still have room for a backward
    finally:
        for c in admitted:
            c.close()
