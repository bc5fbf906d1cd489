"""Seconds per iteration vs number of clients, Menos vs vanilla split learning, in a
memory that fits 3 vanilla tasks (paper Fig. 6, broken down as in Tables 1-3).

    python -m benchmarks.iteration_time                      # defaults below, 1..6 clients
    python -m benchmarks.iteration_time --link 50ms,100Mbit  # another link
    python -m benchmarks.iteration_time --shape tiny --clients 2 --steps 2 --threads   # CI smoke size
    python -m benchmarks.iteration_time --systems menos,menos-nf4,menos-int8 --dtype bfloat16 --clients 1,4 \
        --link 0ms,10Gbit --name iteration_time_qlora           # QLoRA: the cost of dequantizing

The memory D is sized from the config (menos.estimator.estimate) to hold ``--fit``
vanilla tasks (a task: the server's blocks + its activations, M_b) and half a task to
spare. Vanilla gets all of D for tasks; Menos gets D minus its one shared copy of the
whole model, for activations. Adapters and optimizer states (the same in both) sit
outside D. Every client has its own emulated link (menos.link) and trains on random
tokens; the first ``--warmup`` steps are not counted. Per client, the median of each
part of an iteration; the table shows their mean over clients:

- communication: round trips minus the server's share (link, serialization, queues);
- compute: the server's forward + backward (Menos: + the re-forward);
- queue: waiting for a memory grant;
- swap: vanilla only, swapping its task back in (to the weights file on CPU, host
  memory on CUDA). The paper's "scheduling time" is queue + swap.

Writes iteration_time.csv and .png under --out.
"""

from __future__ import annotations

import os
import sys
import tempfile

from benchmarks.common import base_args, counts, describe, mean, model_path, pyplot, table, train_client, write_csv
from tools.harness import ManagerProcess, run_clients

# system -> manager flags. "menos" is the paper's Menos (on-demand); "menos-adaptive"
# keeps activations while memory is plentiful, so it skips the re-forward that a
# memory-bound CPU pays dearly for (a whole extra pass over the weights).
SYSTEMS = {"vanilla": ("--baseline", "vanilla"), "menos": (), "menos-adaptive": ("--policy", "adaptive"),
           # QLoRA: the blocks' Linears stored quantized; each compute dequantizes the weights it uses
           "menos-nf4": ("--quantization", "nf4"), "menos-int8": ("--quantization", "int8")}
PARTS = ("communication_s", "server_compute_s", "server_queue_s", "server_swap_s")


def capacities(path: str, dtype: str, connect: dict, fit: float) -> tuple[int, int, dict]:
    """(vanilla capacity, Menos capacity, sizes) for a memory that holds ``fit`` vanilla tasks."""
    from transformers import AutoConfig

    from menos.estimator import ELEM_BYTES, estimate, with_margin

    est = estimate(AutoConfig.from_pretrained(path), connect["head_layers"], connect["tail_layers"],
                   connect["batch_size"], connect["seq_len"], ELEM_BYTES[dtype])  # fmt: skip
    task = est.server_weights + with_margin(est.m_b)
    memory = int((fit + 0.5) * task)
    menos = memory - est.weights
    if menos < with_margin(est.m_b):
        raise SystemExit(f"a memory of {fit} vanilla tasks leaves Menos no room for one backward")
    return memory, menos, {"task_bytes": task, "memory_bytes": memory, "model_bytes": est.weights}


def run_system(system: str, path: str, dtype: str, device: str, capacity: int, clients: list[int], connect: dict,
               steps: int, warmup: int, vocab: int, threads: bool) -> list[dict]:  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="menos-bench-") as state:
        with ManagerProcess(state, "--model", path, "--dtype", dtype, "--memory-capacity", str(capacity), "--device", device,
                            *SYSTEMS[system]) as mgr:  # fmt: skip
            for n in clients:
                res = run_clients(train_client, [(mgr.endpoint, connect, steps, warmup, vocab, 100 * n + i)
                                                 for i in range(n)], threads=threads)  # fmt: skip
                row = {"system": system, "clients": n, "s_per_iter": mean(res, "s_per_step")}
                row.update({part: mean(res, part) for part in PARTS})
                rows.append(row)
                print(f"  {system:8s} {n} clients: {row['s_per_iter']:.3f} s/iter  ("
                      + ", ".join(f"{k.replace('server_', '')[:-2]} {row[k]:.3f}" for k in PARTS) + ")", flush=True)
    return rows


def swap_tier(device: str) -> str:
    """Where vanilla tasks go when swapped out (worker.swap)."""
    return "host memory" if device.startswith("cuda") else "the weights file (disk)"


def plot(rows: list[dict], systems: list[str], title: str, png: str) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for system in systems:
        mine = [r for r in rows if r["system"] == system]
        a.plot([r["clients"] for r in mine], [r["s_per_iter"] for r in mine], marker="o", label=system)
    a.set_xlabel("clients")
    a.set_ylabel("seconds per iteration")
    a.grid(alpha=0.3)
    a.legend()
    n = max(r["clients"] for r in rows)
    last = [next(r for r in rows if r["system"] == s and r["clients"] == n) for s in systems]
    names = [s.replace("-", "\n") for s in systems]
    bottom = [0.0] * len(last)
    for part in PARTS:
        vals = [r[part] for r in last]
        b.bar(names, vals, bottom=bottom, label=part.replace("server_", "")[:-2])
        bottom = [x + y for x, y in zip(bottom, vals)]
    b.set_title(f"{n} clients: median parts of an iteration")
    b.set_ylabel("seconds")
    b.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room for the three-line title
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--shape", default="opt-350m-v4k")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="the managers' --device (cuda: swaps go to host memory)")
    p.add_argument("--clients", default="1-6", help="client counts, e.g. 1-6 or 2,4")
    p.add_argument("--fit", type=float, default=3, help="vanilla tasks the memory holds")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--link", default="100ms,10Mbit", help="each client's emulated link: one-way latency, bandwidth")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which of " + ", ".join(SYSTEMS))
    p.add_argument("--name", default="iteration_time", help="CSV/PNG file name")
    args = p.parse_args(argv)

    path = model_path(args.shape, args.dtype, args.models)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    # Clients load their sections from their own copy of the checkpoint (as the paper's
    # clients do): over a slow link, receiving them in the Welcome would take minutes.
    connect = {"model": path, "head_layers": 1, "tail_layers": 0, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "link": args.link}  # fmt: skip
    vanilla_cap, menos_cap, sizes = capacities(path, args.dtype, connect, args.fit)
    title = (f"{args.shape}-shaped ({describe(path)}), {args.dtype};\nbatch {args.batch_size} x {args.seq_len}; "
             f"link {args.link};\nmemory {sizes['memory_bytes'] / 1e9:.2f} GB = {args.fit + 0.5:g} vanilla tasks "
             f"of {sizes['task_bytes'] / 1e9:.2f} GB; vanilla swaps to {swap_tier(args.device)}")  # fmt: skip
    print(title, flush=True)
    clients = counts(args.clients)
    rows = []
    systems = args.systems.split(",")
    for system in systems:
        cap = vanilla_cap if system == "vanilla" else menos_cap
        rows += run_system(system, path, args.dtype, args.device, cap, clients, connect, args.steps, args.warmup,
                           vocab, args.threads)  # fmt: skip
    for r in rows:
        r["link"] = args.link
        r["swap_tier"] = swap_tier(args.device)
        for ref in ("vanilla", "menos"):  # each against the run of the same clients, where it ran
            base = next((q["s_per_iter"] for q in rows if q["system"] == ref and q["clients"] == r["clients"]), None)
            r[f"vs_{ref}"] = round(r["s_per_iter"] / base, 3) if base else ""
    csv_path = write_csv(os.path.join(args.out, f"{args.name}.csv"), rows)
    png = os.path.join(args.out, f"{args.name}.png")
    plot(rows, systems, title, png)
    print(table(rows, ["system", "clients", "s_per_iter", *PARTS, "vs_vanilla", "vs_menos"]))
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
