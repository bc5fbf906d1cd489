"""Hundreds of tenants on one manager: sessions park their worker and wake it on their next request.

Two runs of the same sessions (each its own adapter seed and data), OPT-350M's block shape
with a small vocabulary, every block on the server (the clients' ends are the embeddings
and the head: 256 of them fit this machine; they are not what is measured):

- parked: all ``--sessions`` connected to one manager with ``--max-workers``; the clients
  (spread over ``--procs`` processes, one session training at a time in each) take
  turns in a seeded random order, ``--steps`` steps a turn, ``--turns`` turns each. A
  monitor samples the manager's status: live workers, parked sessions and the PSS of
  every server process. Wake latencies come from the manager's ``--trace``.
- live: the same sessions with every worker live (no cap, nothing parks), in waves of
  ``--wave`` sessions (256 live workers would not fit this machine's memory: that is
  the point): the losses to compare, and the s/iteration of the same turns unparked.

    python -m benchmarks.tenants [--sessions 256] [--max-workers 4] [--procs 4]
    python -m benchmarks.tenants --probe-files 128 --shape tiny

The second asks what breaks first as sessions grow: a manager under a small open-file
limit takes tiny sessions until one is refused (tenants_files.csv).

Writes benchmarks/results/tenants.csv (one row per sample of the parked run),
tenants_summary.csv and tenants.png, and prints a Markdown summary.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import base_args, describe, model_path, pyplot, table, write_csv  # noqa: E402
from tools.harness import ManagerProcess, run_clients  # noqa: E402

SHAPE = "opt-350m-blocks"
PSS_PER_PARKED_GOAL = 5 << 20


def tenant_client(endpoint: str, ids: list[int], connect: dict, turns: int, steps: int, vocab: int, order_seed: int,
                  go, barrier) -> dict:  # fmt: skip
    """One client process: its sessions connect (the first, then ``go``, then the rest),
    then take turns in a seeded random order, one at a time."""
    import torch
    import transformers

    import menos

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    clients, connect_s = {}, []
    for n, i in enumerate(ids):
        t0 = time.perf_counter()
        clients[i] = menos.connect(endpoint, seed=1000 + i, identity=f"tenant-{i}", **connect)
        connect_s.append(time.perf_counter() - t0)
        if n == 0 and go is not None:
            go.wait()  # the monitor measures the server with one live session per process first
    data = {i: torch.Generator().manual_seed(i) for i in ids}
    rng = random.Random(order_seed)
    order = [i for _ in range(turns) for i in rng.sample(ids, len(ids))]
    barrier.wait()
    losses: dict[int, list[float]] = {i: [] for i in ids}
    first_s, later_s, queue_first = [], [], []
    t_start = time.perf_counter()
    for i in order:
        for k in range(steps):
            batch = torch.randint(0, vocab, (connect["batch_size"], connect["seq_len"]), generator=data[i])
            t0 = time.perf_counter()
            losses[i].append(clients[i].train_step(batch))
            (first_s if k == 0 else later_s).append(time.perf_counter() - t0)
            if k == 0:
                queue_first.append(clients[i].times.server_queue[-1])
    wall = time.perf_counter() - t_start
    barrier.wait()
    for c in clients.values():
        c.close()
    return {"losses": losses, "first_s": first_s, "later_s": later_s, "queue_first_s": queue_first, "wall_s": wall,
            "connect_s": connect_s}  # fmt: skip


class Monitor(threading.Thread):
    """Samples the manager's status: live workers, parked sessions, the PSS of its processes."""

    def __init__(self, endpoint: str, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.endpoint, self.every_s = endpoint, every_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict:
        import menos

        st = menos.status(self.endpoint)
        row = {"t_s": round(time.monotonic() - self.t0, 2), "sessions": len(st.clients), "live_workers": st.live_workers,
               "parked": sum(c.state.value == "parked" for c in st.clients), "pss_mib": sum(st.pss.values()) / 2**20}
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sample()


def _manager(state: str, path: str, sessions: int, *extra: str) -> ManagerProcess:
    return ManagerProcess(state, "--model", path, "--min-head-layers", "0", "--max-clients", str(sessions + 8),
                          "--checkpoint-every", "0", *extra)  # fmt: skip


def _split(ids: list[int], procs: int) -> list[list[int]]:
    return [ids[p::procs] for p in range(procs)]


def parked_run(path: str, args, connect: dict, vocab: int, tmp: str) -> dict:
    import multiprocessing as mp

    trace = os.path.join(tmp, "trace.jsonl")
    mgr = _manager(os.path.join(tmp, "parked"), path, args.sessions, "--max-workers", str(args.max_workers),
                   "--trace", trace)  # fmt: skip
    with mgr, mp.get_context("spawn").Manager() as sync:
        go = threading.Event() if args.threads else sync.Event()
        mon = Monitor(mgr.endpoint)
        jobs = [(mgr.endpoint, ids, connect, args.turns, args.steps, vocab, 7 + p, go)
                for p, ids in enumerate(_split(list(range(args.sessions)), args.procs))]  # fmt: skip
        baseline: list[float] = []

        def measure_baseline():
            while mon.sample()["sessions"] < args.procs:
                time.sleep(0.2)
            time.sleep(1.0)
            baseline.extend(mon.sample()["pss_mib"] for _ in range(5))
            go.set()
            mon.start()

        waiter = threading.Thread(target=measure_baseline, daemon=True)
        waiter.start()
        results = run_clients(tenant_client, jobs, threads=args.threads)
        mon.stop.set()
        with open(trace) as f:
            events = [json.loads(line) for line in f]
    wakes = sorted(e["seconds"] for e in events if e["event"] == "wake")
    return {"results": results, "samples": mon.samples, "baseline_pss_mib": statistics.median(baseline),
            "wakes": wakes, "parks": sum(e["event"] == "park" for e in events)}  # fmt: skip


def live_run(path: str, args, connect: dict, vocab: int, tmp: str) -> list[dict]:
    results = []
    for w in range(0, args.sessions, args.wave):
        ids = list(range(w, min(w + args.wave, args.sessions)))
        with _manager(os.path.join(tmp, f"live{w}"), path, args.wave) as mgr:
            jobs = [(mgr.endpoint, part, connect, args.turns, args.steps, vocab, 7 + p, None)
                    for p, part in enumerate(_split(ids, args.procs))]  # fmt: skip
            results += run_clients(tenant_client, jobs, threads=args.threads)
        print(f"  live wave of sessions {ids[0]}..{ids[-1]} done", flush=True)
    return results


def probe_files(path_model: str, limit: int, tmp: str) -> dict:
    """How many sessions a manager holds under ``limit`` open files, and what fails then:
    tiny sessions connect one by one until one is refused."""
    import resource
    import subprocess

    import menos
    from manager import runinfo
    from menos.messages import LoraSpec

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds the clients' sockets
    state = os.path.join(tmp, "probe")
    cmd = ["bash", "-c", f"ulimit -n {limit} && exec {sys.executable} -m manager start --state-dir {state} "
           f"--listen tcp://127.0.0.1:* --model {path_model} --min-head-layers 0 --max-workers 2 "
           f"--max-clients 100000 --log-level ERROR"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    clients, files, failure = [], [], ""
    try:
        endpoint = runinfo.wait_endpoint(state, proc)
        while proc.poll() is None:
            try:
                clients.append(menos.connect(endpoint, batch_size=1, seq_len=8, head_layers=0, tail_layers=0,
                                             adapter=LoraSpec(r=2, alpha=4), connect_timeout_s=30, timeout_s=30))
            except menos.MenosError as exc:
                failure = str(exc)
                break
            files.append(len(os.listdir(f"/proc/{proc.pid}/fd")))
        alive = proc.poll() is None
        try:
            answers = alive and len(menos.status(endpoint, timeout_s=10).clients) >= len(clients)
        except menos.MenosError as exc:
            answers = f"no: {exc}"
        import torch

        try:
            trains = alive and clients[0].train_step(torch.randint(0, 100, (1, 8))) > 0
        except menos.MenosError as exc:
            trains = f"no: {exc}"
    finally:
        for c in clients:  # the manager goes first: no goodbyes to wait on
            for stage in c.stages:
                stage.close(goodbye=False, linger_ms=0)
            c._closed = True  # noqa: SLF001
        proc.terminate()
        proc.wait(60)
    half = len(files) // 2
    return {"limit": limit, "sessions_held": len(clients), "failure": failure, "manager_alive": alive,
            "status_answers": answers, "a_session_trains": trains,
            "files_per_session": (files[-1] - files[half]) / max(1, len(files) - 1 - half)}  # fmt: skip


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=256)
    p.add_argument("--max-workers", type=int, default=4)
    p.add_argument("--procs", type=int, default=4, help="client processes (each trains one session at a time)")
    p.add_argument("--turns", type=int, default=2, help="turns per session")
    p.add_argument("--steps", type=int, default=2, help="training steps per turn")
    p.add_argument("--wave", type=int, default=32, help="sessions per wave of the all-live run")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--shape", default=SHAPE, help=f"the model's shape, from benchmarks.common (default: {SHAPE})")
    p.add_argument("--probe-files", type=int, default=0, metavar="LIMIT",
                   help="instead: how many sessions a manager under this open-file limit holds, and what fails then")
    args = p.parse_args(argv)
    from menos.messages import LoraSpec

    path = model_path(args.shape, "float32", args.models)
    if args.probe_files:
        with tempfile.TemporaryDirectory(prefix="menos-tenants-") as tmp:
            r = probe_files(path, args.probe_files, tmp)
        write_csv(os.path.join(args.out, "tenants_files.csv"), [r])
        print(table([r], list(r)))
        return 0 if r["manager_alive"] and r["status_answers"] is True and r["a_session_trains"] is True else 1
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    connect = dict(batch_size=args.batch_size, seq_len=args.seq_len, head_layers=0, tail_layers=0, lr=1e-3,
                   adapter=LoraSpec(r=8, alpha=16), timeout_s=600, connect_timeout_s=600)  # fmt: skip
    print(f"{describe(path)}; {args.sessions} sessions over {args.procs} client processes, --max-workers "
          f"{args.max_workers}; {args.turns} turns x {args.steps} steps each; batch {args.batch_size} x {args.seq_len}, "
          f"LoRA r8 q,v; {platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="menos-tenants-") as tmp:
        t0 = time.perf_counter()
        parked = parked_run(path, args, connect, vocab, tmp)
        print(f"  parked run: {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        live = live_run(path, args, connect, vocab, tmp)
        print(f"  live run: {time.perf_counter() - t0:.0f} s", flush=True)

    def merged(results, key):
        return [x for r in results for x in r[key]]

    got = {i: ls for r in parked["results"] for i, ls in r["losses"].items()}
    want = {i: ls for r in live for i, ls in r["losses"].items()}
    worst = max(abs(a - b) for i in want for a, b in zip(got[i], want[i], strict=True))
    samples = parked["samples"]
    peak_pss = max(s["pss_mib"] for s in samples)
    goal = parked["baseline_pss_mib"] + (args.sessions - args.procs) * PSS_PER_PARKED_GOAL / 2**20
    steps_parked = merged(parked["results"], "first_s") + merged(parked["results"], "later_s")
    steps_live = merged(live, "first_s") + merged(live, "later_s")
    summary = {
        "sessions": args.sessions, "max_workers": args.max_workers, "client_procs": args.procs,
        "max_live_workers": max(s["live_workers"] for s in samples), "samples": len(samples),
        "parks": parked["parks"], "wakes": len(parked["wakes"]),
        "wake_p50_s": _pct(parked["wakes"], 0.5), "wake_p99_s": _pct(parked["wakes"], 0.99),
        "pss_live_only_mib": parked["baseline_pss_mib"], "peak_pss_mib": peak_pss, "pss_goal_mib": goal,
        "pss_per_parked_mib": (peak_pss - parked["baseline_pss_mib"]) / (args.sessions - args.procs),
        "s_per_iter_parked_mean": statistics.fmean(steps_parked), "s_per_iter_live_mean": statistics.fmean(steps_live),
        "s_per_iter_parked_median": statistics.median(steps_parked),
        "s_per_iter_live_median": statistics.median(steps_live),
        "first_step_parked_median_s": statistics.median(merged(parked["results"], "first_s")),
        "first_step_live_median_s": statistics.median(merged(live, "first_s")),
        "connect_parked_median_s": statistics.median(merged(parked["results"], "connect_s")),
        "max_loss_diff": worst,
    }  # fmt: skip
    write_csv(os.path.join(args.out, "tenants.csv"), samples)
    write_csv(os.path.join(args.out, "tenants_summary.csv"), [summary])
    print(table([summary], list(summary)[:9]))
    print(table([summary], list(summary)[9:]))
    ok = summary["max_live_workers"] <= args.max_workers and worst <= 1e-6
    print(f"live workers never above {args.max_workers}: {summary['max_live_workers'] <= args.max_workers}; "
          f"losses equal the all-live run's to 1e-6: {worst <= 1e-6} (worst {worst:.2e}); peak PSS {peak_pss:.0f} MiB "
          f"vs goal {goal:.0f} MiB: {peak_pss <= goal}; wake p50 {summary['wake_p50_s']:.3f} s (goal < 0.5 s)")

    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    t = [s["t_s"] for s in samples]
    ax[0].plot(t, [s["pss_mib"] for s in samples], label="PSS of the server's processes")
    ax[0].axhline(goal, color="grey", ls="--", label=f"goal: 4 live + 5 MB x {args.sessions - args.procs} parked")
    ax[0].set_xlabel("s")
    ax[0].set_ylabel("MiB")
    ax2 = ax[0].twinx()
    ax2.plot(t, [s["live_workers"] for s in samples], color="C1", label="live workers")
    ax2.set_ylabel("live workers")
    ax2.set_ylim(0, args.max_workers * 2)
    ax[0].legend(loc="lower right", fontsize=8)
    ax[0].set_title(f"{args.sessions} sessions, --max-workers {args.max_workers}")
    ax[1].hist(parked["wakes"], bins=40)
    ax[1].set_xlabel("wake latency, s (slot wait + worker start)")
    ax[1].set_title(f"{len(parked['wakes'])} wakes: p50 {summary['wake_p50_s']:.3f} s, p99 {summary['wake_p99_s']:.3f} s")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "tenants.png"), dpi=110)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
