"""CI-sized runs of every benchmark script (tiny model, 2 clients, 2 steps), so none rots.

Clients run as threads (--threads) to spare an interpreter start per client; the
scripts' real runs use a process per client. The figures themselves are in
benchmarks/README.md; here only what must hold at any size is checked.
"""

from __future__ import annotations

import csv

import pytest

from benchmarks import (compression, convergence, generation, iteration_time, persistent_memory, scheduler_latency,
                        scheduling_policies, trainers)  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Generated checkpoints, made once for the module."""
    return str(tmp_path_factory.mktemp("models"))


def _run(module, tmp_path, models, *args) -> list[dict]:
    out = tmp_path / "out"
    assert module.main([*args, "--threads", "--out", str(out), "--models", models]) == 0
    name = module.__name__.rsplit(".", 1)[1]
    assert (out / f"{name}.png").stat().st_size > 0
    with open(out / f"{name}.csv") as f:
        return list(csv.DictReader(f))


def test_persistent_memory_of_menos_is_below_vanillas(tmp_path, models):
    rows = _run(persistent_memory, tmp_path, models, "--shape", "small", "--dtype", "float32", "--clients", "2")
    pss = {(r["system"], int(r["clients"])): int(r["server_pss_bytes"]) for r in rows}
    assert set(pss) == {(s, k) for s in ("menos", "vanilla") for k in (1, 2)}
    for system in ("menos", "vanilla"):
        assert pss[system, 2] > pss[system, 1] > 0  # the second client's worker costs memory
    # the whole server group (manager, launcher, workers): one shared copy of 100 MB of
    # weights against two private copies of the server's 88 MB of blocks
    assert pss["menos", 2] < pss["vanilla", 2] - 40e6, pss
    # and vanilla's second client costs about one more copy of the blocks; Menos's does not
    assert pss["vanilla", 2] - pss["vanilla", 1] > pss["menos", 2] - pss["menos", 1] + 40e6, pss


def test_scheduler_latency_script(tmp_path):
    assert scheduler_latency.main(["--reps", "5", "--sizes", "4,64", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "scheduler_latency.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["backfill"], int(r["waiting"])) for r in rows] == [(b, n) for b in ("fcfs", "easy") for n in (4, 64)]
    for r in rows:
        for event in ("arrival", "release", "scan_all"):
            assert 0 < float(r[f"{event}_median_us"]) <= float(r[f"{event}_p99_us"])


def test_iteration_time_swaps_vanilla_tasks_and_not_menos(tmp_path, models):
    # memory for 1.5 vanilla tasks and 2 clients: vanilla must swap every iteration
    rows = _run(iteration_time, tmp_path, models, "--shape", "tiny", "--clients", "2", "--steps", "2", "--fit", "1",
                "--systems", "vanilla,menos")
    by = {r["system"]: r for r in rows}
    assert float(by["vanilla"]["server_swap_s"]) > 0  # (that Menos holds one shared copy: test_memory_sharing)
    for r in rows:
        # the emulated link (100 ms one way, 4 messages) dominates a tiny model's iteration
        assert float(r["communication_s"]) >= 0.4
        assert float(r["s_per_iter"]) >= float(r["communication_s"])


def test_scheduling_policies_preserve_waits_longer(tmp_path, models):
    # activation memory for 1.5 backwards: a preserving forward holds one through the
    # client's round trip, so the other client waits; on-demand holds it only to compute
    # (adaptive is the same script path with another --policy; tests/test_scheduling.py covers it).
    # The 100 MB model: its M_b (tens of MB) dwarfs the tokens' 1 MiB slack, so two never fit.
    rows = _run(scheduling_policies, tmp_path, models, "--shape", "small", "--batch-size", "2", "--seq-len", "32",
                "--clients", "2", "--steps", "1", "--fit", "1", "--link", "50ms,100Mbit",
                "--policies", "on-demand,preserve")
    wait = {r["policy"]: float(r["schedule_s"]) for r in rows}
    assert set(wait) == {"on-demand", "preserve"}
    assert wait["preserve"] > wait["on-demand"]


def test_convergence_matches_local_fine_tuning(tmp_path, models):
    rows = _run(convergence, tmp_path, models, "--steps", "2")
    assert len(rows) == 3 * 2
    for r in rows:
        assert float(r["menos_loss"]) == pytest.approx(float(r["local_loss"]), abs=1e-4)


def test_compression_cuts_bytes_and_keeps_the_losses(tmp_path, models):
    rows = _run(compression, tmp_path, models, "--shape", "tiny", "--sizes", "1x16", "--clients", "1", "--steps", "1",
                "--warmup", "0", "--conv-steps", "2", "--conv-clients", "1", "--codecs", "none,int8",
                "--link", "1ms,1000Mbit")  # fmt: skip
    by = {r["codec"]: int(r["bytes_per_iter"]) for r in rows}
    assert set(by) == {"none", "int8"}  # (each codec's bytes: tests/test_codecs.py)
    assert by["int8"] < 0.35 * by["none"]
    with open(tmp_path / "out" / "compression_convergence.csv") as f:
        conv = list(csv.DictReader(f))
    assert len(conv) == 2 and all(float(r["max_rel_diff"]) < 0.01 for r in conv)


def test_gpu_check_says_there_is_no_gpu_and_fails(capsys):
    import torch

    from tools import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run make gpu-check itself")
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_generation_script_times_local_loopback_and_a_slow_link(tmp_path, models):
    rows = _run(generation, tmp_path, models, "--shape", "tiny", "--clients", "1", "--new-tokens", "3",
                "--repeats", "1", "--worker-threads", "1", "--link", "50ms,100Mbit")  # fmt: skip
    assert [r["setting"] for r in rows] == ["local generate (whole model)", "menos, loopback", "menos, 50ms,100Mbit"]
    slow = rows[2]
    # one round trip a token: never faster than the link allows
    assert 0 < float(slow["tokens_per_s"]) <= float(slow["bound_tokens_per_s"]) <= 10.0
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)


def test_trainers_script_times_fit_and_both_trainers(tmp_path, models):
    rows = _run(trainers, tmp_path, models, "--shape", "tiny", "--steps", "2", "--warmup", "1", "--seq", "32")
    assert [r["loop"] for r in rows] == ["client.fit", "Trainer", "SFTTrainer"]
    mb = {r["loop"]: float(r["mb_per_step"]) for r in rows}
    # the trainers also move the server adapter's gradients and stepped weights
    assert mb["Trainer"] > mb["client.fit"] > 0 and all(float(r["s_per_step"]) > 0 for r in rows)


def test_tenants_script_parks_and_matches_the_all_live_losses(tmp_path, models):
    from benchmarks import tenants

    out = tmp_path / "out"
    assert tenants.main(["--shape", "tiny", "--sessions", "4", "--max-workers", "1", "--procs", "1", "--turns", "2",
                         "--steps", "1", "--wave", "4", "--threads", "--out", str(out), "--models", models]) == 0  # fmt: skip
    with open(out / "tenants_summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["max_live_workers"]) == 1 and int(row["wakes"]) >= 4 and float(row["max_loss_diff"]) <= 1e-6
    assert (out / "tenants.png").stat().st_size > 0
