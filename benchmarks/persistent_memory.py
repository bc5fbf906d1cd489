"""Persistent server memory vs number of clients, Menos vs vanilla split learning (paper Fig. 5).

    python -m benchmarks.persistent_memory                 # OPT-1.3B-shaped, bf16, 1..6 clients
    python -m benchmarks.persistent_memory --clients 4 --dtype float32 --name persistent_memory_float32
    python -m benchmarks.persistent_memory --shape tiny --clients 2 --threads  # CI smoke size
    python -m benchmarks.persistent_memory --clients 4 --systems menos-nf4 vanilla-nf4 menos vanilla \
        --name persistent_memory_nf4                       # QLoRA: one NF4 copy against one per task

For each system, one manager; clients join one at a time, each trains one step and
stays connected; after each join the server's memory is read as the sum of PSS over
the manager and every process it spawned (launcher, workers), which counts pages
shared between them once. Activations are freed after the step in both systems, so
what remains is persistent: base weights, adapters, optimizer states, and each
process's own overhead. The capacity is set far above need, so vanilla never swaps.
With ``--device cuda`` the figure is NVML's device memory per process instead.
Writes NAME.csv and NAME.png under --out (--name, default persistent_memory).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time

from benchmarks.common import base_args, describe, model_path, pyplot, table, write_csv
from tools.harness import ManagerProcess

SYSTEMS = {"menos": (), "vanilla": ("--baseline", "vanilla")}
for _q in ("nf4", "int8"):  # QLoRA: the blocks' Linears quantized (vanilla: each task's own quantized copy)
    SYSTEMS[f"menos-{_q}"] = ("--quantization", _q)
    SYSTEMS[f"vanilla-{_q}"] = ("--quantization", _q, "--baseline", "vanilla")


def hold_client(endpoint: str, connect: dict, vocab: int, seed: int, ready, stop) -> None:
    """Join, train one step, report, and stay connected until told to leave."""
    import torch

    import menos

    torch.set_num_threads(1)
    ids = torch.randint(0, vocab, (connect["batch_size"], connect["seq_len"]), generator=torch.Generator().manual_seed(seed))
    with menos.connect(endpoint, seed=seed, **connect) as client:
        ready.put(client.train_step(ids))
        stop.wait()


def measure(system: str, path: str, dtype: str, device: str, clients: int, connect: dict, vocab: int,
            threads: bool) -> list[dict]:  # fmt: skip
    rows = []
    ctx = _Threads() if threads else mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="menos-bench-") as state:
        with ManagerProcess(state, "--model", path, "--dtype", dtype, "--memory-capacity", "1TB", "--device", device,
                            *SYSTEMS[system]) as mgr:  # fmt: skip
            ready, stop, procs = ctx.Queue(), ctx.Event(), []
            try:
                for k in range(1, clients + 1):
                    p = ctx.Process(target=hold_client, args=(mgr.endpoint, connect, vocab, k, ready, stop))
                    p.start()
                    procs.append(p)
                    ready.get(timeout=1800)
                    time.sleep(0.5)  # let the worker finish freeing the step's activations
                    pss = mgr.pss() if device == "cpu" else mgr.gpu_bytes()
                    workers = {w.pid for w in mgr.workers()}
                    rows.append({"system": system, "clients": k, "server_pss_bytes": sum(pss.values()),
                                 "manager_pss_bytes": pss.get(mgr.pid, 0),
                                 "launcher_pss_bytes": sum(v for q, v in pss.items() if q != mgr.pid and q not in workers),
                                 "workers_pss_bytes": sum(v for q, v in pss.items() if q in workers),
                                 "processes": len(pss)})  # fmt: skip
                    print(f"  {system:8s} {k} clients: {sum(pss.values()) / 1e9:.2f} GB over {len(pss)} processes", flush=True)
            finally:
                stop.set()
                for p in procs:
                    p.join(120)
                    if p.is_alive():
                        p.kill()
                        p.join()
    return rows


class _Threads:
    """multiprocessing's Queue/Event/Process, as threads (--threads)."""

    Queue, Event = queue.Queue, threading.Event

    @staticmethod
    def Process(target, args):  # noqa: N802
        t = threading.Thread(target=target, args=args, daemon=True)
        t.kill = lambda: None  # a thread cannot be killed; the daemon flag lets the run end
        return t


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--shape", default="opt-1.3b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu: sum of PSS; cuda: NVML device memory per process")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--name", default="persistent_memory", help="the CSV's and PNG's file name, without extension")
    p.add_argument("--systems", nargs="+", default=["menos", "vanilla"], choices=list(SYSTEMS),
                   help="what to measure (default: menos vanilla); -nf4 / -int8: a quantized base")
    args = p.parse_args(argv)

    path = model_path(args.shape, args.dtype, args.models)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    print(f"model: {args.shape}-shaped ({describe(path)}), {args.dtype}; batch {args.batch_size} x {args.seq_len}; "
          "LoRA r=8 on q_proj, v_proj; head 1 block, tail 0 (paper's split)", flush=True)  # fmt: skip
    connect = {"head_layers": 1, "tail_layers": 0, "batch_size": args.batch_size, "seq_len": args.seq_len}
    rows = [r for system in args.systems
            for r in measure(system, path, args.dtype, args.device, args.clients, connect, vocab, args.threads)]
    for r in rows:
        r["server_pss_gb"] = round(r["server_pss_bytes"] / 1e9, 3)
        before = next((q["server_pss_bytes"] for q in rows if q["system"] == r["system"] and q["clients"] == r["clients"] - 1),
                      None)  # fmt: skip
        r["increment_mb"] = "" if before is None else round((r["server_pss_bytes"] - before) / 1e6, 1)
        for part in ("manager", "launcher", "workers"):
            r[f"{part}_mb"] = round(r[f"{part}_pss_bytes"] / 1e6, 1)
    by = {(r["system"], r["clients"]): r["server_pss_bytes"] for r in rows}
    for r in rows:  # Menos against the vanilla baseline of the same quantization, where both ran
        twin = by.get((r["system"].replace("menos", "vanilla"), r["clients"])) if r["system"].startswith("menos") else None
        # 0 bytes: the reading found none of our processes (NVML, another pid namespace)
        r["reduction"] = round(1 - by[r["system"], r["clients"]] / twin, 4) if twin else ""
    csv_path = write_csv(os.path.join(args.out, f"{args.name}.csv"), rows)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for system in args.systems:
        xs = [r["clients"] for r in rows if r["system"] == system]
        ax.plot(xs, [r["server_pss_gb"] for r in rows if r["system"] == system], marker="o", label=system)
    ax.set_xlabel("clients")
    ax.set_ylabel("server memory, GB " + ("(sum of PSS)" if args.device == "cpu" else "(NVML, device)"))
    ax.set_title(f"persistent memory, {args.shape}-shaped, {args.dtype}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = os.path.join(args.out, f"{args.name}.png")
    fig.savefig(png, dpi=120)
    cols = ["clients", "server_pss_gb", "increment_mb", "manager_mb", "launcher_mb", "workers_mb"]
    for system in args.systems:
        print(system)
        print(table([r for r in rows if r["system"] == system], [*cols, "reduction"] if system.startswith("menos") else cols))
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
