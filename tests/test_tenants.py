"""Many tenants per manager, through real processes: sessions park their worker and wake it on
their next request (manager.parking), with the losses they would have had."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest
import torch

import menos
from manager.sessions import checkpoint_dir, park_dir
from menos import checkpoint
from menos.messages import LoraSpec, PrefixSpec

BASE = dict(batch_size=2, seq_len=16, lr=1e-2, head_layers=1, tail_layers=1)
LORA = dict(BASE, adapter=LoraSpec(r=4, alpha=8), seed=7)


def _batch(i):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 + i))


def _mine(endpoint, *clients):
    """Each client's session status, in order."""
    by_sid = {c.session: c for c in menos.status(endpoint).clients}
    return [by_sid[c.session] for c in clients]


def _wait(what, timeout_s: float = 20.0, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)


@pytest.fixture(scope="module")
def one_worker(checkpoints, tmp_path_factory):
    """A manager with a single worker process for all its sessions."""
    from tools.harness import ManagerProcess

    from tools.harness import free_port

    port = free_port()
    with ManagerProcess(str(tmp_path_factory.mktemp("one-worker")), "--model", checkpoints("llama"),
                        "--max-workers", "1", "--metrics-port", str(port)) as mgr:  # fmt: skip
        mgr.metrics_port = port
        yield mgr


def _metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}


def _reference(endpoint, cfg, steps):
    with menos.connect(endpoint, **cfg) as c:
        return [c.train_step(_batch(i)) for i in range(steps)]


@pytest.mark.parametrize("name,cfg", [
    ("lora, accumulation 2, clipping", dict(LORA, grad_accum_steps=2, max_grad_norm=0.5)),
    ("dora", dict(BASE, adapter=LoraSpec(r=4, alpha=8, use_dora=True), seed=3)),
    ("prefix", dict(BASE, adapter=PrefixSpec(num_virtual_tokens=4), seed=5)),
])  # fmt: skip
def test_two_sessions_taking_turns_on_one_worker_wake_at_every_step_with_exact_losses(name, cfg, one_worker,
                                                                                     shared_manager):  # fmt: skip
    """Each request of one session parks the other (accumulated gradients and all) and wakes
    its own: the losses are those of an uninterrupted session."""
    reference = _reference(shared_manager("llama").endpoint, cfg, 6)
    before = _metrics(one_worker.metrics_port)
    with menos.connect(one_worker.endpoint, **cfg) as a, menos.connect(one_worker.endpoint, **cfg) as b:
        losses_a, losses_b = [], []
        for i in range(6):
            losses_a.append(a.train_step(_batch(i)))
            losses_b.append(b.train_step(_batch(i)))
        states = {s.state.value for s in _mine(one_worker.endpoint, a, b)}
        assert states == {"idle", "parked"}
        assert len(one_worker.workers()) == 1
        after = _metrics(one_worker.metrics_port)
        grew = {k: after[k] - before.get(k, 0) for k in ("menos_parks_total", "menos_wakes_total",
                                                          "menos_wake_seconds_count")}  # fmt: skip
        assert grew["menos_parks_total"] >= 12 and grew["menos_wakes_total"] == grew["menos_wake_seconds_count"] >= 11
        assert after["menos_workers_live"] == 1
        parked = [park_dir(checkpoint_dir(one_worker.state_dir, f"anonymous-{c.session}")) for c in (a, b)]
        assert any(checkpoint.steps(d) for d in parked)  # the one parked now
    _wait(lambda: not [d for d in parked if os.path.exists(d)])  # anonymous: nobody can resume it, nothing kept
    assert losses_a == pytest.approx(reference, abs=1e-6)
    assert losses_b == pytest.approx(reference, abs=1e-6)


class _Hold:
    """A streamer that holds its generation open after the first new token, until released."""

    def __init__(self):
        self.open, self.release, self.calls = threading.Event(), threading.Event(), 0

    def put(self, ids):
        self.calls += 1
        if self.calls == 2:  # the prompt went through the server: its cache grant is held
            self.open.set()
            assert self.release.wait(60)
            raise KeyboardInterrupt  # stop there: the client ends the generation on the server

    def end(self):
        pass


def _generate_held(client, hold: _Hold, length: int = 8):
    prompt = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    try:
        client.generate(prompt, max_new_tokens=length, streamer=hold)
    except KeyboardInterrupt:
        pass


@contextlib.contextmanager
def _generation_held(client, length: int = 8):
    """``client``'s generation of ``length`` positions, held open (its cache grant too) inside the block."""
    hold = _Hold()
    generating = threading.Thread(target=_generate_held, args=(client, hold, length))
    generating.start()
    try:
        assert hold.open.wait(30)
        yield
    finally:
        hold.release.set()
        generating.join(30)


def _train_in_background(client, batch) -> tuple[threading.Thread, list]:
    """A train step in a thread of its own: the thread, and the list its loss goes into."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(client.train_step(batch)))
    thread.start()
    return thread, result


def test_a_wake_waits_while_the_only_worker_is_busy_and_goes_in_once_it_is_idle(one_worker, shared_manager):
    """Under --max-workers 1, a parked session's request waits while the live one holds a
    generation (it cannot park then), and is served, as queue time, once that ends."""
    reference = _reference(shared_manager("llama").endpoint, LORA, 2)
    with menos.connect(one_worker.endpoint, **LORA) as busy, menos.connect(one_worker.endpoint, **LORA) as parked:
        assert parked.train_step(_batch(0)) == pytest.approx(reference[0], abs=1e-6)
        with _generation_held(busy):
            waker, result = _train_in_background(parked, _batch(1))
            _wait(lambda: _mine(one_worker.endpoint, parked)[0].state.value == "waking")
            time.sleep(0.5)
            assert waker.is_alive() and _mine(one_worker.endpoint, busy)[0].state.value == "generating"
        waker.join(30)
        assert result == pytest.approx(reference[1:], abs=1e-6)
        assert parked.times.server_queue[-1] >= 0.5  # the wait for the worker slot is queue time
        assert len(one_worker.workers()) == 1


@pytest.fixture(scope="module")
def two_workers(checkpoints, tmp_path_factory):
    """A manager with two worker processes for all its sessions, and 24 MiB to grant."""
    from tools.harness import ManagerProcess

    with ManagerProcess(str(tmp_path_factory.mktemp("two-workers")), "--model", checkpoints("llama"),
                        "--max-workers", "2", "--memory-capacity", str(24 << 20)) as mgr:  # fmt: skip
        yield mgr


def test_the_least_recently_used_idle_session_parks_for_a_newcomer(two_workers):
    mgr = two_workers
    with menos.connect(mgr.endpoint, **LORA) as a, menos.connect(mgr.endpoint, **LORA) as b:
        a.train_step(_batch(0))
        b.train_step(_batch(0))
        a.train_step(_batch(1))  # b is now the least recently used
        with menos.connect(mgr.endpoint, **LORA) as c:
            states = [s.state.value for s in _mine(mgr.endpoint, a, b, c)]
            assert states == ["idle", "parked", "idle"]
            st = menos.status(mgr.endpoint)
            assert (st.live_workers, st.max_workers) == (2, 2)
            assert len(mgr.workers()) == 2
            b.train_step(_batch(1))  # wakes b: a is the least recently used now
            assert [s.state.value for s in _mine(mgr.endpoint, a, b, c)] == ["parked", "idle", "idle"]


def test_a_worker_killed_while_waking_is_replaced_from_the_parked_state(checkpoints, two_workers, shared_manager):
    """kill -9 of a worker mid-wake (here: waiting for the memory to load in, while another
    session's generation holds it): the manager wakes the session again from its parked state,
    and the client sees only latency."""
    from menos.estimator import kv_cache_bytes
    from menos.surgery import config_from_json

    mgr = two_workers
    reference = _reference(shared_manager("llama").endpoint, LORA, 3)
    with menos.connect(mgr.endpoint, **LORA) as sleeper:
        losses = [sleeper.train_step(_batch(0))]
        # A newcomer parks the least recently used: the sleeper, which trained before the hog came.
        with menos.connect(mgr.endpoint, **LORA) as hog, menos.connect(mgr.endpoint, **LORA) as third:
            me, other = _mine(mgr.endpoint, sleeper, hog)
            assert me.state.value == "parked"
            st = menos.status(mgr.endpoint)
            # A generation whose cache leaves less free than the sleeper's wake needs (its M_b).
            room = st.capacity - st.standing - other.m_f
            with open(os.path.join(checkpoints("llama"), "config.json")) as f:
                per_position = kv_cache_bytes(config_from_json(f.read()), 2, 1, 1, 4)
            with _generation_held(hog, (room - me.m_b // 2) // per_position):
                waker, result = _train_in_background(sleeper, _batch(1))
                _wait(lambda: _mine(mgr.endpoint, sleeper)[0].pid > 0)  # the third parked for it
                pid = _mine(mgr.endpoint, sleeper)[0].pid
                time.sleep(0.3)
                assert _mine(mgr.endpoint, sleeper)[0].state.value == "waking"  # waits for memory to load in
                os.kill(pid, signal.SIGKILL)
                _wait(lambda: _mine(mgr.endpoint, sleeper)[0].pid not in (0, pid))
            waker.join(60)
            losses += result + [sleeper.train_step(_batch(2))]
            assert third.train_step(_batch(0)) == pytest.approx(reference[0], abs=1e-6)
    assert losses == pytest.approx(reference, abs=1e-6)


def test_idle_sessions_park_and_resume_after_the_manager_is_killed(checkpoints, start_manager, shared_manager,
                                                                   tmp_path):  # fmt: skip
    """Sessions idle for --park-after park; kill -9 of the manager while they are parked: a new
    manager on the same state directory resumes each from the latest step both sides have (a
    parked state is one: it is kept beside the session's checkpoints), and training goes on
    exactly, nothing trained lost."""
    state = str(tmp_path / "manager")
    args = ("--model", checkpoints("llama"), "--park-after", "0.2", "--checkpoint-every", "2", "--client-timeout", "2")
    mgr = start_manager(*args, state_dir=state)
    reference = _reference(shared_manager("llama").endpoint, LORA, 6)
    clients = [menos.connect(mgr.endpoint, identity=f"tenant-{i}", state_dir=str(tmp_path / f"t{i}"), **LORA)
               for i in range(3)]  # fmt: skip
    losses = [[c.train_step(_batch(i)) for i in range(4)] for c in clients]
    parked = lambda: {s.state.value for s in _mine(mgr.endpoint, *clients)} == {"parked"}  # noqa: E731
    _wait(parked)
    _wait(lambda: not [p for p in mgr.workers() if p.status() != psutil.STATUS_ZOMBIE])
    assert clients[0].train_step(_batch(4)) == pytest.approx(reference[4], abs=1e-6)  # woken, and parks again
    _wait(parked)
    assert checkpoint.steps(park_dir(checkpoint_dir(state, "tenant-0"))) == [4, 5]  # kept through the wake
    # A parked session whose client goes silent ends after --client-timeout, its state kept as a checkpoint.
    with menos.connect(mgr.endpoint, identity="quiet", **LORA) as quiet:
        [quiet.train_step(_batch(i)) for i in range(3)]
        _wait(lambda: _mine(mgr.endpoint, quiet)[0].state.value == "parked")
        quiet.stages[0].heartbeat.stop()
        _wait(lambda: quiet.session not in {s.session for s in menos.status(mgr.endpoint).clients})
    assert checkpoint.steps(checkpoint_dir(state, "quiet")) == [2]
    assert checkpoint.steps(park_dir(checkpoint_dir(state, "quiet"))) == [3]  # to resume from
    children = mgr.children()
    os.kill(mgr.pid, signal.SIGKILL)
    mgr.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"{alive} outlived the manager by 10 s"
    for c in clients:
        c.close()  # saves the client's step (4; 5 for the first); the server parked each at that step
    mgr2 = start_manager(*args, state_dir=state)
    losses[0].append(reference[4])
    for i, got in enumerate(losses):
        with menos.connect(mgr2.endpoint, identity=f"tenant-{i}", state_dir=str(tmp_path / f"t{i}"), resume=True,
                           timeout_s=10, **LORA) as c:  # fmt: skip
            assert c.steps == len(got)  # from the parked state (the server's last checkpoint is step 4)
            got += [c.train_step(_batch(j)) for j in range(c.steps, 6)]
        assert got == pytest.approx(reference, abs=1e-6)
    assert not os.path.exists(os.path.join(state, f"run-{mgr.pid}"))  # the parked files went with the dead run


def test_a_session_of_a_shape_already_profiled_takes_that_profile(one_worker):
    """A second session alike in cut, adapter, batch, sequence and recipe (seed and identity
    aside) is not profiled again: its tokens are the first's to the byte (two measurements
    differ by some KiB); another batch size is profiled anew."""
    shape = dict(LORA, seq_len=12)
    with menos.connect(one_worker.endpoint, **shape) as a, \
            menos.connect(one_worker.endpoint, **dict(shape, seed=99), identity="same-shape") as b, \
            menos.connect(one_worker.endpoint, **dict(shape, batch_size=1)) as c:  # fmt: skip
        sa, sb, sc = _mine(one_worker.endpoint, a, b, c)
        assert (sb.m_f, sb.m_b, sb.standing_bytes) == (sa.m_f, sa.m_b, sa.standing_bytes)
        assert sc.m_b != sa.m_b
        assert b.train_step(_batch(0)[:, :12]) > 0


def test_a_trainers_session_parked_between_and_inside_its_optimizer_steps_takes_the_same_steps(
        one_worker, shared_manager, checkpoints, tmp_path):  # fmt: skip
    """A driven session (hf_model() under SFTTrainer, accumulation 2) on one worker with another
    session training after every micro-batch: it parks with its held gradients and its stepped
    weights, and wakes for the next, with the losses of a session that never parked."""
    from transformers import TrainerCallback

    from tests.test_trainers import LORA as TRAINER_LORA
    from tests.test_trainers import _losses, _trainer

    path = checkpoints("llama")
    cfg = dict(model=path, batch_size=2, seq_len=32, head_layers=1, tail_layers=1, adapter=TRAINER_LORA)
    with menos.connect(shared_manager("llama").endpoint, **cfg) as c:
        reference = _trainer("sft", c.hf_model(), tmp_path / "reference", 128, max_steps=4)
        reference.train()

    with menos.connect(one_worker.endpoint, **cfg) as c, menos.connect(one_worker.endpoint, **LORA) as other:
        class Interleave(TrainerCallback):
            def on_substep_end(self, args, state, control, **kw):
                other.train_step(_batch(0))  # parks the trainer's session mid-accumulation

            def on_step_end(self, args, state, control, **kw):
                other.train_step(_batch(1))  # ... and after its optimizer step

        parked = _trainer("sft", c.hf_model(), tmp_path / "parked", 128, max_steps=4)
        parked.add_callback(Interleave())
        before = _metrics(one_worker.metrics_port)["menos_wakes_total"]
        parked.train()
        assert _metrics(one_worker.metrics_port)["menos_wakes_total"] - before >= 14
    assert len(_losses(parked)) == 4
    assert _losses(parked) == pytest.approx(_losses(reference), abs=1e-6)
