"""A new user's second hour, on the operator's side: each mistake with the server and cluster
commands is one line naming the flag and the fix, exit status 2, within seconds (the checks
come before torch is imported); a state directory belongs to one live manager or cluster."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from manager import runinfo
from menos import wire
from menos.messages import ClusterStatus, StatusRequest
from tools.harness import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_S = 2.0  # the rule: an argument's mistake is answered within 2 s


def _run(module, *args, **kw):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120, **kw)  # fmt: skip
    out.seconds = time.monotonic() - t0
    return out


def _manager(*args, **kw):
    return _run("manager", *args, **kw)


def _cluster(*args, **kw):
    return _run("manager.cluster", *args, **kw)


def _one_line(out, words, fast=True):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert words in out.stderr, out.stderr
    if fast:
        assert out.seconds < FAST_S, (out.args, out.seconds)


ANY_PORT = ("--listen", "tcp://127.0.0.1:*")  # not the default 5555, which another program may hold


def test_flag_values_out_of_range_are_one_line_each_before_anything_starts(tmp_path):
    state = ["--state-dir", str(tmp_path / "state"), *ANY_PORT]
    (tmp_path / "a-file").write_text("")
    port = free_port()
    for args, words in [
        (["--metrics-port", "99999"], "--metrics-port 99999: a TCP port, 1..65535 (0: no metrics)"),
        (["--metrics-port", "-1"], "--metrics-port -1: a TCP port"),
        (["--metrics-port", str(port), "--listen", f"tcp://127.0.0.1:{port}"], f"--metrics-port {port}: --listen"),
        (["--memory-share", "2"], "--memory-share 2: a fraction in (0, 1]"),
        (["--heartbeat", "0"], "--heartbeat 0: seconds, more than 0"),
        (["--max-clients", "0"], "--max-clients 0: 1 or more"),
        (["--memory-capacity", "lots"], "--memory-capacity: not a size: 'lots'"),
        (["--memory-capacity", "0"], "--memory-capacity 0: a size above 0"),
        (["--min-head-layers", "6"], "--min-head-layers 6: the model has 6 blocks, and the server runs at least one: "
                                     "at most 5"),
        (["--blocks", "3:9"], "--blocks 3:9: the model has 6 blocks (0..5); at most 3:6"),
        (["--blocks", "4:2"], "--blocks 4:2: A:B with 0 <= A < B"),
        (["--blocks", "1-3"], "--blocks 1-3: A:B with 0 <= A < B"),
        (["--state-dir", str(tmp_path / "a-file")], "a file, not a directory"),
        (["--state-dir", str(tmp_path / "a-file" / "below")], "--state-dir"),
    ]:
        _one_line(_manager("start", *state, *args), words)
    assert not (tmp_path / "state").exists()  # nothing left behind


def test_a_metrics_port_in_use_is_named_before_the_model_loads(tmp_path):
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _manager("start", "--metrics-port", str(port), "--state-dir", str(tmp_path / "s"), *ANY_PORT)
    _one_line(out, f"--metrics-port {port}: Address already in use on 127.0.0.1; pick another port")


def test_the_metrics_port_taken_after_the_check_still_names_the_flag():
    from manager.metrics import Metrics
    from manager.preflight import StartupError

    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(StartupError, match=r"--metrics-port \d+: Address already in use"):
            Metrics().serve(taken.getsockname()[1])


def test_a_state_dir_belongs_to_one_live_manager(start_manager, tmp_path):
    """A second manager is refused at once, naming the first's pid and endpoint; it touches
    nothing of the first's; the first's children do not hold the lock; a stop leaves no lock.
    ``--model builtin`` is the built-in model, as for menos-estimate."""
    first = start_manager("--model", "builtin")
    info = json.load(open(os.path.join(first.state_dir, runinfo.FILENAME)))
    assert info["model"] == "menos-builtin-llama"
    out = _manager("start", "--state-dir", first.state_dir, *ANY_PORT)
    _one_line(out, f"a running manager holds it (pid {first.pid}, {first.endpoint}); stop it first (kill {first.pid})")
    assert json.load(open(os.path.join(first.state_dir, runinfo.FILENAME))) == info
    lock = os.path.join(first.state_dir, runinfo.LOCKNAME)
    for child in first.children():  # the forked launcher and loader closed their copies
        assert lock not in [f.path for f in child.open_files()], child.cmdline()
    first.stop()
    assert not os.path.exists(lock) and not os.path.exists(os.path.join(first.state_dir, runinfo.FILENAME))


def _holder(state_dir, kind):
    """A process that claims ``state_dir`` as ``kind`` would, then waits to be killed."""
    code = (f"import sys, time; from manager import runinfo; runinfo.claim({state_dir!r}, {kind!r}, "
            "'tcp://127.0.0.1:5999', 'cluster.json'); print('held', flush=True); time.sleep(600)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_cluster_state_dir_is_one_clusters_and_a_dead_holders_lock_is_taken_over(tmp_path):
    state = str(tmp_path / "cluster")
    holder = _holder(state, "cluster")
    try:
        out = _cluster("start", "--state-dir", state, "--listen", f"tcp://127.0.0.1:{free_port()}")
        _one_line(out, f"a running menos-cluster holds it (pid {holder.pid}, gateway starting on tcp://127.0.0.1:5999); "
                  "menos-cluster stop --state-dir")  # fmt: skip
        _one_line(_manager("start", "--state-dir", state, *ANY_PORT), "a running menos-cluster holds it")
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel releases the lock
        holder.wait()
        holder.stdout.close()
    lock = runinfo.claim(state, "manager", "tcp://127.0.0.1:*", runinfo.FILENAME)
    try:
        assert json.load(open(os.path.join(state, runinfo.LOCKNAME)))["pid"] == os.getpid()
        with pytest.raises(runinfo.Busy):  # a second claim, even from this process, is refused
            runinfo.claim(state, "manager", "tcp://127.0.0.1:*", runinfo.FILENAME)
    finally:
        lock.release()
    assert os.listdir(state) == []


def test_status_watch_must_be_positive_and_a_closed_pipe_is_quiet(shared_manager):
    for value in ("-1", "0"):
        _one_line(_manager("status", "--watch", value), f"--watch {value}: give the seconds between refreshes")
    mgr = shared_manager("llama")
    for module in ("manager", "manager.cluster"):  # `status | head`: the reader went away before the table came
        proc = subprocess.Popen([sys.executable, "-m", module, "status", "--connect", mgr.endpoint], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        if module == "manager":
            assert proc.wait(60) == 0 and err == "", err
        else:  # a manager is not a gateway: said in one line, with the command to use
            assert proc.wait(60) == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert f"is a manager, not a cluster's gateway; use menos-manager status --connect {mgr.endpoint}" in err


@pytest.fixture
def fake_gateway():
    """An endpoint that answers every status request as a cluster's gateway does."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            if sock.poll(50):
                rid, *frames = sock.recv_multipart()
                assert isinstance(wire.decode_header(frames[0]).msg, StatusRequest)
                sock.send_multipart([rid, *wire.encode(ClusterStatus(json=json.dumps({"managers": [], "clients": []})))])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join()
    sock.close(0)


def test_manager_status_at_a_gateway_points_to_menos_cluster_status(fake_gateway):
    out = _manager("status", "--connect", fake_gateway)
    _one_line(out, f"is a cluster's gateway, not a manager; use menos-cluster status --connect {fake_gateway}")
    assert _cluster("status", "--connect", fake_gateway).returncode == 0


def test_keys_made_a_second_time_are_refused_in_one_line(tmp_path):
    state = str(tmp_path / "state")
    assert _manager("keys", "init", "--state-dir", state).returncode == 0
    _one_line(_manager("keys", "init", "--state-dir", state), "server.key exists, not overwriting a key; this state "
              "dir has its pair already")  # fmt: skip
    assert _manager("keys", "new", "alice", "--out", str(tmp_path)).returncode == 0
    _one_line(_manager("keys", "new", "alice", "--out", str(tmp_path)), "alice.key exists, not overwriting a key; "
              "pick another NAME or --out")  # fmt: skip
    _one_line(_manager("keys", "new", "a b", "--out", str(tmp_path)), "key name 'a b': use letters")
    (tmp_path / "a-file").write_text("")
    _one_line(_manager("keys", "init", "--state-dir", str(tmp_path / "a-file")), "a file, not a directory")


def test_cluster_layout_mistakes_are_one_line_before_ray_starts(tmp_path):
    state = ["--state-dir", str(tmp_path / "cluster")]
    _one_line(_cluster("start", *state, "--managers-per-node", "0"), "--managers-per-node 0: 1 or more")
    _one_line(_cluster("start", *state, "--managers-per-node", "2", "--metrics-port", str(free_port())),
              "managers of a node would all serve on it")  # fmt: skip
    _one_line(_cluster("start", *state, "--memory-share", "0.5"), "--memory-share: the cluster sets it")
    _one_line(_cluster("start", *state, "--metrics-port", "99999"), "--metrics-port 99999: a TCP port")
    assert not (tmp_path / "cluster").exists()


def test_managers_sharing_a_node_split_its_memory_and_the_status_says_so(tmp_path):
    import torch

    from manager.capacity import DeviceMemory
    from manager.cluster.cli import table
    from manager.cluster.fleet import share_flags

    assert share_flags(2, per_gpu=False) == ["--memory-share", "0.5"]
    assert share_flags(1, per_gpu=False) == [] and share_flags(4, per_gpu=True) == []  # a GPU is one manager's
    free = tmp_path / "free"
    free.write_text("8GiB")
    mem = DeviceMemory(torch.device("cpu"), str(free))
    assert mem.default_capacity(0.5) * 2 == mem.default_capacity() == 4 << 30
    memory = {"capacity": 2 << 30, "granted": 0, "free": 2 << 30}
    st = {"managers": [dict(id=f"m{i}", node="n1", device="cpu", endpoint="", pid=1, alive=True, clients=0,
                            memory=memory) for i in range(2)], "clients": []}  # fmt: skip
    assert "node n1: 2 managers share its memory (each one's default capacity: 1/2 of it)" in table(st)
    st["managers"][1]["node"] = "n2"
    assert "share its memory" not in table(st)
