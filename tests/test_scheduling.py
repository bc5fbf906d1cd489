"""Temporal sharing across real processes: tight capacity, policies, telemetry."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import menos
from manager.scheduler import PLENTIFUL_RESERVE
from menos.messages import LoraSpec

SPEC = LoraSpec(r=4, alpha=8)
STEPS = 3
CLIENT = dict(batch_size=4, seq_len=128, adapter=SPEC, lr=1e-2)
MODEL = "small"  # activations, not the fixed token slack, dominate its memory


def _batch(i):
    return torch.randint(0, 128, (4, 128), generator=torch.Generator().manual_seed(i))


def _train_concurrently(endpoint, n=4):
    """n clients (seeds 0..n-1, own data) train STEPS steps at once; returns their losses."""
    losses, errors = {}, []
    start = threading.Barrier(n)

    def run(i):
        try:
            with menos.connect(endpoint, seed=i, **CLIENT) as c:
                start.wait(120)
                losses[i] = [c.train_step(_batch(i)) for _ in range(STEPS)]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return [losses[i] for i in range(n)]


def _trace(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(shared_manager):
    """Losses of 4 clients with plenty of memory, and one client's profiled M_b."""
    mgr = shared_manager(MODEL)
    losses = _train_concurrently(mgr.endpoint)
    with menos.connect(mgr.endpoint, **CLIENT) as c:
        m_b = next(s.m_b for s in menos.status(mgr.endpoint).clients if s.session == c.session)
    return losses, m_b


def test_capacity_for_one_backward_serves_four_clients_exactly(reference, checkpoints, start_manager, tmp_path):
    ref_losses, m_b = reference
    capacity = int(1.5 * m_b)  # one backward at a time
    trace = tmp_path / "trace.jsonl"
    mgr = start_manager("--model", checkpoints(MODEL), "--memory-capacity", str(capacity), "--trace", str(trace))
    losses = _train_concurrently(mgr.endpoint)
    for mine, ref in zip(losses, ref_losses):
        assert mine == pytest.approx(ref, abs=1e-6)
    events = _trace(trace)
    grants = [e for e in events if e["event"] == "grant" and e["kind"] != "load"]  # not the start-up grants
    assert len(grants) == 4 * STEPS * 2  # a forward and a backward per step
    assert all(e["used"] <= capacity for e in events)
    big = [e for e in grants if e["nbytes"] > capacity / 2]
    assert len(big) == 4 * STEPS  # the backwards: at most one of them fits at a time
    assert any(e["waiting"] > 0 for e in events)  # and clients did queue for memory
    status = menos.status(mgr.endpoint)
    assert status.granted == 0 and status.queued == 0


def test_adaptive_reclaims_kept_activations_and_matches_on_demand(reference, checkpoints, start_manager, tmp_path):
    """Client A's forward keeps its activations (memory is plentiful); B's backward then
    cannot fit, so the scheduler reclaims A's; A recomputes. Losses equal on-demand's."""
    ref_losses, m_b = reference
    trace = tmp_path / "trace.jsonl"
    # The scenario needs A's M_b to leave PLENTIFUL_RESERVE of the capacity free beside the
    # sessions' standing memory (plentiful: A keeps its activations) and B's M_b not to fit
    # beside A's (B must wait for them): about +-20% around 1.6 x M_b.
    # Profiles differ between processes by up to ~25%, so check the sizes this manager
    # measured, and recentre the capacity on them if noise broke the scenario.
    for _attempt in range(3):
        capacity = int(1.6 * m_b)
        mgr = start_manager("--model", checkpoints(MODEL), "--policy", "adaptive",
                            "--memory-capacity", str(capacity), "--trace", str(trace))  # fmt: skip
        a = menos.connect(mgr.endpoint, seed=0, **CLIENT)
        b = menos.connect(mgr.endpoint, seed=1, **CLIENT)
        st = menos.status(mgr.endpoint)
        status = {c.session: c for c in st.clients}
        ma, mb = status[a.session].m_b, status[b.session].m_b
        sizes = f"capacity {capacity}, M_b reference {m_b}, A {ma}, B {mb}, standing {st.standing}"
        print(f"\n{sizes}")
        free = capacity - st.standing  # the scheduler's rule (Scheduler.plentiful): A keeps, B waits
        if free - ma >= PLENTIFUL_RESERVE * capacity and mb > free - ma:
            break
        a.close()
        b.close()
        mgr.stop()
        trace.unlink(missing_ok=True)
        m_b = (ma + mb) // 2
    else:
        pytest.fail(f"memory profiles too noisy to set up the scenario: {sizes}")
    with a, b:
        a_losses, b_losses = [], []
        for _ in range(STEPS):
            pending_a = a.forward_step(_batch(0))  # kept: plentiful
            b_losses.append(b.train_step(_batch(1)))  # B's backward needs A's memory
            a_losses.append(a.backward_step(pending_a))
        status = {c.session: c for c in menos.status(mgr.endpoint).clients}
    assert a_losses == pytest.approx(ref_losses[0], abs=1e-6)
    assert b_losses == pytest.approx(ref_losses[1], abs=1e-6)
    assert status[a.session].reclaims == STEPS, sizes
    events = _trace(trace)
    assert [e["session"] for e in events if e["event"] == "reclaim"] == [a.session] * STEPS
    assert all(e["used"] <= e["capacity"] for e in events)


def test_preserve_policy_gives_identical_results(reference, checkpoints, start_manager):
    """(adaptive is held to the same losses by the reclaim test above)"""
    ref_losses, _ = reference
    mgr = start_manager("--model", checkpoints(MODEL), "--policy", "preserve")
    losses = _train_concurrently(mgr.endpoint, n=2)
    assert losses == [pytest.approx(r, abs=1e-6) for r in ref_losses[:2]]


LINK_S = 0.025  # one way: a train step's four messages spend 0.1 s in transit


def test_telemetry_from_manager_and_client(checkpoints, start_manager):
    mgr = start_manager("--model", checkpoints(MODEL), "--backfill", "easy")
    with menos.connect(mgr.endpoint, link=f"{LINK_S * 1e3:g}ms,inf", **CLIENT) as c:
        for i in range(3):
            c.train_step(_batch(i))
        summary = c.times.summary()
        (st,) = menos.status(mgr.endpoint).clients
    assert summary["steps"] == 3
    for key in ("s_per_step", "server_compute_s", "communication_s"):
        assert summary[key] > 0, key
    # alone on the server, a client never waits behind anyone: a grant is a round trip to the manager
    assert summary["server_queue_s"] < 0.5 * summary["server_compute_s"]
    for total, comp, queue, comm in zip(c.times.total, c.times.server_compute, c.times.server_queue,
                                        c.times.communication):  # fmt: skip
        # communication is the round trips less the server's share: it holds the link's 4 transits,
        # and little else (serialization, routing) if the server's share is counted right
        assert 4 * LINK_S <= comm < 4 * LINK_S + 0.2, (comm, comp, queue)
        assert comp + queue + comm < total  # the client's own sections take time too
    assert st.requests == 1 + 6 and st.steps == 3 and st.state == "idle"  # the start-up grant, then 2 a step
    assert 0 <= st.mean_queue_s < st.mean_compute_s  # 0 when every request is granted on arrival
    assert 0 < st.m_f < st.m_b and st.persistent_bytes > 0


def test_vanilla_baseline_swaps_tasks_and_matches_menos(reference, checkpoints, start_manager, tmp_path):
    """--baseline vanilla with memory for 1.5 tasks: two clients take turns, each task
    swapped out when the other needs the memory, and the losses are Menos's."""
    import glob

    from transformers import AutoConfig

    from menos.estimator import estimate, with_margin

    ref_losses, _ = reference
    est = estimate(AutoConfig.from_pretrained(checkpoints(MODEL)), 1, 0, 4, 128, adapter=SPEC)
    capacity = int(1.5 * (est.server_weights + with_margin(est.m_b)))
    trace = tmp_path / "trace.jsonl"
    mgr = start_manager("--model", checkpoints(MODEL), "--baseline", "vanilla",
                        "--memory-capacity", str(capacity), "--trace", str(trace))  # fmt: skip
    assert not glob.glob(f"/dev/shm/menos_{mgr.pid}_*")  # nothing shared: every worker its own copy
    losses = _train_concurrently(mgr.endpoint, n=2)
    assert losses == [pytest.approx(r, abs=1e-6) for r in ref_losses[:2]]
    events = _trace(trace)
    tasks = {e["nbytes"] for e in events if e["event"] == "grant"}
    assert all(capacity / 2 < t <= capacity for t in tasks), (tasks, capacity)  # one task fits, not two
    assert all(e["used"] <= capacity for e in events)
    reclaims = [e for e in events if e["event"] == "reclaim"]
    assert len(reclaims) >= STEPS  # tasks were swapped out for each other
    assert menos.status(mgr.endpoint).policy == "vanilla"
    with menos.connect(mgr.endpoint, batch_size=4, seq_len=128, adapter=SPEC) as c:
        with pytest.raises(menos.MenosError, match="vanilla baseline does not generate") as err:
            c.generate([[1, 2, 3]], max_new_tokens=2)
        assert err.value.code == "bad_request"
