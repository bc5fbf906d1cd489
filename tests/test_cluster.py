"""A Menos cluster on a real local Ray instance: `menos-cluster start --managers-per-node 2`.

One cluster for the module (a start costs seconds): four clients through the gateway land
on both managers; one manager is killed with SIGKILL; its clients reconnect through the
gateway with resume=True and their losses continue those of the clients that were never
interrupted (the same seed and data) to 1e-6; Ray's actor restarts the killed manager;
`menos-cluster stop` leaves no process, shared-memory segment, socket file or Ray
directory behind.
"""

from __future__ import annotations

import glob
import os
import signal
import time

import psutil
import pytest
import torch

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[cluster]' (make test installs it)")

import menos  # noqa: E402
from manager.cluster import state_file  # noqa: E402
from menos.join import carried_dir  # noqa: E402
from menos import keys  # noqa: E402
from menos.messages import ErrorCode, LoraSpec  # noqa: E402
from tools.harness import ClusterProcess, free_port  # noqa: E402

CLIENT = dict(batch_size=2, seq_len=16, adapter=LoraSpec(r=4, alpha=8), lr=1e-2, seed=7, head_layers=1, tail_layers=1)
STEPS, KILL_AT = 10, 6  # server checkpoints every 4 steps: the killed clients resume from step 4


def _batch(i):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 + i))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, checkpoints):
    """A CURVE cluster: one server key pair and the admitted client keys in its state dir
    (as `menos-manager keys init` / `keys add` make them), copied to every manager."""
    state = str(tmp_path_factory.mktemp("cluster"))
    mine = str(tmp_path_factory.mktemp("client-keys"))
    keys.new_pair(keys.server_dir(state), "server")
    for name in ("c0", "c1", "c2", "c3", "big"):
        keys.add_client(state, name, keys.new_pair(mine, name)[0])
    keys.new_pair(mine, "late0")  # admitted while the cluster runs
    keys.new_pair(mine, "late1")
    before = {"shm": set(os.listdir("/dev/shm")), "ray": set(glob.glob("/tmp/menos-ray-*"))}
    c = ClusterProcess(state, f"tcp://127.0.0.1:{free_port()}", "--managers-per-node", "2", "--model",
                       checkpoints("llama"), "--checkpoint-every", "4", "--memory-capacity", "64MiB",
                       "--log-level", "WARNING", client_key=os.path.join(mine, "c0.key_secret"),
                       server_key=os.path.join(keys.server_dir(state), "server.key"))  # fmt: skip
    c.before, c.mine = before, mine
    try:
        yield c
    finally:
        c.stop()


def _keys(cluster, name: str) -> dict:
    return dict(client_key=os.path.join(cluster.mine, f"{name}.key_secret"),
                server_key=os.path.join(keys.server_dir(cluster.state_dir), "server.key"))  # fmt: skip


def test_mistakes_in_the_cluster_command_are_one_line_each(tmp_path):
    import subprocess
    import sys

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "manager.cluster", *args], capture_output=True, text=True, timeout=60)
        return out.returncode, out.stderr.strip()

    state = ["--state-dir", str(tmp_path)]
    code, err = run("start", *state, "--model", str(tmp_path / "nope"))
    assert code == 2 and err.startswith("menos-cluster: --model") and "no such directory" in err
    code, err = run("start", *state, "--device", "cuda")
    assert code == 2 and "--device: the cluster sets it" in err and "--per-gpu" in err
    code, err = run("start", *state, "--listen", "tcp://0.0.0.0:5999")
    assert code == 2 and "plain text" in err and "keys init" in err
    code, err = run("start", *state, "--blocks", "1:3")
    assert code == 2 and "--blocks 1:3: the cluster gives each manager its range; use --stages K" in err
    code, err = run("stop", *state)
    assert code == 1 and "no cluster runs from" in err
    code, err = run("status", "--connect", f"tcp://127.0.0.1:{free_port()}")
    assert code == 1 and "nothing answered" in err


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


def test_clients_spread_survive_a_killed_manager_and_resume_elsewhere_with_the_same_losses(cluster, tmp_path):
    def connect(k, **kw):
        return menos.connect(cluster.endpoint, state_dir=str(tmp_path / f"c{k}"), **_keys(cluster, f"c{k}"), **CLIENT, **kw)

    clients = [connect(k) for k in range(4)]
    assert sorted(c.manager for c in clients) == ["m0", "m0", "m1", "m1"]  # the least loaded first
    assert all(s.carry_dir for c in clients for s in c.stages)  # through a gateway: each keeps the server's checkpoints
    losses = {k: [c.train_step(_batch(i)) for i in range(KILL_AT)] for k, c in enumerate(clients)}
    def spread():  # the gateway's status is refreshed every second: it catches up
        st = cluster.status()
        return st if [m["clients"] for m in st["managers"]] == [2, 2] else None

    st = _wait(spread, 30, "the status shows two clients on each manager")
    assert sorted(c["manager"] for c in st["clients"]) == ["m0", "m0", "m1", "m1"]
    assert all(len(c["identity"]) == 40 for c in st["clients"])  # with CURVE a client is its key (z85)
    assert {"id", "node", "device", "endpoint", "pid", "alive", "clients", "memory"} <= set(st["managers"][0])
    assert set(st["managers"][0]["memory"]) == {"capacity", "granted", "free"}

    victim = st["managers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    killed = [k for k, c in enumerate(clients) if c.manager == victim["id"]]
    survivors = [k for k in range(4) if k not in killed]
    for k in killed:
        with pytest.raises(menos.MenosError) as exc:
            clients[k].train_step(_batch(KILL_AT))
        assert exc.value.code == ErrorCode.DISCONNECTED and "resume=True" in str(exc.value)
        clients[k].close()  # does not raise: the server is gone
    for k in killed:
        r = clients[k] = connect(k, resume=True)
        # From the last step both sides saved: 4 on a manager that never ran it (its carried copy);
        # 6 back home (the killed manager's workers saved their last state as they went down).
        assert r.steps == (6 if r.manager == victim["id"] else 4)
        losses[k] = losses[k][: r.steps] + [r.train_step(_batch(i)) for i in range(r.steps, STEPS)]
    back_training_s = time.monotonic() - killed_at
    for k in survivors:
        losses[k] += [clients[k].train_step(_batch(i)) for i in range(KILL_AT, STEPS)]
    for k, got in losses.items():  # the same seed and data: as if never interrupted
        assert got == pytest.approx(losses[survivors[0]], abs=1e-6), k
    # On a manager that never ran them (the killed one was still restarting), from their copies.
    assert any(clients[k].manager != victim["id"] for k in killed)
    assert all(os.listdir(carried_dir(clients[k].cfg.state_dir)) for k in killed)
    print(f"\nkill -9 of a manager until its clients trained again on another: {back_training_s:.2f} s")
    for c in clients:
        c.close()
    cluster.victim = victim  # its restart is checked at the end (it takes seconds)


def test_a_client_that_fits_no_manager_is_refused_with_the_largest_free_capacity(cluster):
    with pytest.raises(menos.MenosError) as exc:
        menos.connect(cluster.endpoint, **_keys(cluster, "big"), **dict(CLIENT, batch_size=512, seq_len=64))
    assert exc.value.code == ErrorCode.TOO_LARGE
    assert "largest free capacity in the cluster is" in str(exc.value)


def test_the_actor_restarts_a_killed_manager(cluster):
    victim = getattr(cluster, "victim", None)
    if victim is None:
        pytest.fail("the test that kills a manager did not get that far")

    def back():  # a new process, a new endpoint, placed on again
        return next((m for m in cluster.status()["managers"] if m["id"] == victim["id"] and m["alive"]), None)

    m = _wait(back, 60, "the killed manager restarted")
    assert m["pid"] != victim["pid"] and m["endpoint"] != victim["endpoint"] and m["restarts"] == 1


def test_one_key_for_the_cluster_and_keys_admitted_while_it_runs_reach_every_manager(cluster):
    with pytest.raises(menos.MenosError) as exc:  # not admitted: refused by the gateway itself
        menos.connect(cluster.endpoint, connect_timeout_s=3, **_keys(cluster, "late0"), **CLIENT)
    assert exc.value.code == ErrorCode.UNAUTHORIZED
    for name in ("late0", "late1"):
        keys.add_client(cluster.state_dir, name, os.path.join(cluster.mine, f"{name}.key"))

    def both_train():
        """Two clients at once, one per manager: each manager honours the new keys."""
        clients = []
        try:
            for name in ("late0", "late1"):
                clients.append(menos.connect(cluster.endpoint, connect_timeout_s=3, **_keys(cluster, name), **CLIENT))
            assert {c.manager for c in clients} == {"m0", "m1"}
            return all(c.train_step(_batch(0)) > 0 for c in clients)
        except menos.MenosError as exc:
            assert exc.code == ErrorCode.UNAUTHORIZED, exc  # until the new keys have reached the managers
            return False
        finally:
            for c in clients:
                c.close()

    _wait(both_train, 30, "the newly admitted keys served on both managers")


def _left_in_shm(before: set[str], ours: set[int]) -> list[str]:
    """What appeared in /dev/shm since ``before`` and is the cluster's: its managers'
    segments (``menos_PID_...``) and anything else but other tests' (the suite runs in
    two processes: their managers' segments and torch's come and go meanwhile)."""
    left = []
    for name in set(os.listdir("/dev/shm")) - before:
        owner = name.split("_")[1] if name.startswith("menos_") else ""
        if name.startswith("torch_") or (owner.isdigit() and int(owner) not in ours):
            continue
        left.append(name)
    return left


def test_stop_leaves_nothing_behind(cluster):
    proc = cluster.proc
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= 4  # Ray's own processes, the actors, the managers and their launchers
    assert cluster.stop() == 0
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert not _left_in_shm(cluster.before["shm"], {p.pid for p in tree})
    assert set(glob.glob("/tmp/menos-ray-*")) <= cluster.before["ray"]
    state = cluster.state_dir
    assert not glob.glob(os.path.join(state, "**", "*.sock"), recursive=True)
    assert not glob.glob(os.path.join(state, "managers", "*", "run-*"))
    assert not glob.glob(os.path.join(state, "managers", "*", "manager.json"))
    assert not os.path.exists(os.path.join(state, state_file.FILENAME))
    assert not glob.glob(os.path.join(state, "gateway-keys", "*"))  # the gateway's pair lives as long as it does
    assert glob.glob(os.path.join(state, "managers", "*", "checkpoints", "*", "step-*"))  # what was trained stays
