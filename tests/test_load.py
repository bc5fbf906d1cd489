"""Load: 16 clients x 20 steps against one manager whose capacity fits 4 backwards."""

from __future__ import annotations

import json
import statistics
import threading

import pytest
import torch

import menos
from menos.messages import LoraSpec

CLIENT = dict(batch_size=2, seq_len=16, adapter=LoraSpec(r=4, alpha=8), lr=1e-2)
N, STEPS = 16, 20


@pytest.mark.timeout(900)
def test_sixteen_clients_share_a_capacity_of_four_backwards(checkpoints, shared_manager, start_manager, tmp_path):
    probe = shared_manager("llama")
    with menos.connect(probe.endpoint, **CLIENT) as c:
        m_b = next(s.m_b for s in menos.status(probe.endpoint).clients if s.session == c.session)
    capacity = int(4.5 * m_b)
    trace = tmp_path / "trace.jsonl"
    mgr = start_manager("--model", checkpoints("llama"), "--memory-capacity", str(capacity), "--trace", str(trace),
                        "--max-clients", str(N))  # fmt: skip
    done, errors = {}, []

    def run(i):
        try:
            with menos.connect(mgr.endpoint, seed=i, **CLIENT) as c:
                ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))
                done[i] = [c.train_step(ids) for _ in range(STEPS)]
        except Exception as exc:  # noqa: BLE001
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert sorted(done) == list(range(N)) and all(len(v) == STEPS for v in done.values())  # none starved

    asked, waits = {}, []
    with open(trace) as f:
        for line in f:
            e = json.loads(line)
            key = (e["session"], e["request_id"])
            assert e["used"] <= capacity
            if e["kind"] == "load":
                continue  # each worker's start-up grant (loading and profiling)
            if e["event"] == "request":
                asked[key] = e["t"]
            elif e["event"] == "grant":
                waits.append(e["t"] - asked.pop(key))
    assert len(waits) == N * STEPS * 2 and not asked
    waits.sort()
    p50, p99 = statistics.median(waits), waits[int(0.99 * (len(waits) - 1))]
    print(f"\n{N} clients x {STEPS} steps, capacity {capacity / 2**20:.1f} MiB (4.5 x M_b {m_b / 2**20:.2f} MiB): "
          f"queue time p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {waits[-1] * 1e3:.1f} ms "
          f"over {len(waits)} grants")  # fmt: skip
