"""CI-sized runs of every benchmark script (tiny model, 2 clients, 2 steps), so none rots.

Clients run as threads (--threads) to spare an interpreter start per client; the
scripts' real runs use a process per client. The figures themselves are in
benchmarks/README.md; here only what must hold at any size is checked.
"""

from __future__ import annotations

import csv

import pytest

from benchmarks import convergence, iteration_time, persistent_memory, scheduling_policies


def _run(module, tmp_path, *args) -> list[dict]:
    out = tmp_path / "out"
    assert module.main([*args, "--threads", "--out", str(out), "--models", str(tmp_path / "models")]) == 0
    name = module.__name__.rsplit(".", 1)[1]
    assert (out / f"{name}.png").stat().st_size > 0
    with open(out / f"{name}.csv") as f:
        return list(csv.DictReader(f))


def test_persistent_memory(tmp_path):
    rows = _run(persistent_memory, tmp_path, "--shape", "tiny", "--clients", "2")
    pss = {(r["system"], int(r["clients"])): int(r["server_pss_bytes"]) for r in rows}
    assert set(pss) == {(s, k) for s in ("menos", "vanilla") for k in (1, 2)}
    for system in ("menos", "vanilla"):
        assert pss[system, 2] > pss[system, 1] > 0  # the second client's worker costs memory


def test_iteration_time_swaps_vanilla_tasks_and_not_menos(tmp_path):
    # memory for 1.5 vanilla tasks and 2 clients: vanilla must swap every iteration
    rows = _run(iteration_time, tmp_path, "--shape", "tiny", "--clients", "2", "--steps", "2", "--fit", "1",
                "--systems", "vanilla,menos")
    by = {r["system"]: r for r in rows}
    assert float(by["vanilla"]["server_swap_s"]) > 0
    assert float(by["menos"]["server_swap_s"]) == 0
    for r in rows:
        # the emulated link (100 ms one way, 4 messages) dominates a tiny model's iteration
        assert float(r["communication_s"]) >= 0.4
        assert float(r["s_per_iter"]) >= float(r["communication_s"])


def test_scheduling_policies_preserve_waits_longer(tmp_path):
    # activation memory for one backward: a preserving forward holds it through the
    # client's round trip, so the other client waits; on-demand holds it only to compute
    # (adaptive is the same script path with another --policy; tests/test_scheduling.py covers it)
    rows = _run(scheduling_policies, tmp_path, "--shape", "tiny", "--clients", "2", "--steps", "2", "--fit", "1",
                "--policies", "on-demand,preserve")
    wait = {r["policy"]: float(r["schedule_s"]) for r in rows}
    assert set(wait) == {"on-demand", "preserve"}
    assert wait["preserve"] > wait["on-demand"]


def test_convergence_matches_local_fine_tuning(tmp_path):
    rows = _run(convergence, tmp_path, "--steps", "2")
    assert len(rows) == 3 * 2
    for r in rows:
        assert float(r["menos_loss"]) == pytest.approx(float(r["local_loss"]), abs=1e-4)
