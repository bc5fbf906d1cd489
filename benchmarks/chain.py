"""A chain of managers (``--blocks A:B`` each): memory and seconds per iteration against the
number of stages, one manager serving the whole server range being the chain of one.

    python -m benchmarks.chain                                  # defaults below
    python -m benchmarks.chain --shape tiny --stages 1,2 --clients 1 --links none --steps 2 --threads   # CI smoke

Every stage runs on this machine, so a chain computes what one manager does; what it adds is
the client's relaying: each extra stage is one more round trip in the forward and one more in
the backward, and its input and output activations cross the client's link in each.

- Memory: the stages' shared blocks (``status``: shared_bytes) add up to one copy of the server
  range; so does the PSS of the shared-memory segments over every server process (each page
  counted once, wherever mapped); and the servers' whole PSS (managers, launchers, workers) is
  measured with every client connected, each having trained a step.
- Time: per client, the median seconds per iteration after the warm-up, its communication
  share, and the bytes it sent and received, on loopback and on each client's emulated link
  (every stage's channel gets the link: the client is far from every manager).

The model per extra stage is checked against the measured difference: 2 round trips (4 link
latencies) and 4 activations of batch x seq x hidden x 4 bytes (2 out, 2 in) at the link's
bandwidth. Writes chain.csv, chain_memory.csv and chain.png under --out.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack

from benchmarks.common import base_args, counts, describe, mean, model_path, pyplot, table, train_client, write_csv
from menos.chain import split_range
from menos.link import Link
from tools.harness import ManagerProcess, run_clients


def per_stage_model(link: Link | None, batch: int, seq: int, hidden: int, elem: int = 4) -> dict:
    """What one more stage should add to an iteration on ``link``: round trips, bytes, seconds."""
    activation = batch * seq * hidden * elem
    out = {"round_trips": 2, "bytes": 4 * activation}
    if link is not None:
        wire_s = out["bytes"] * 8 / link.bandwidth_bps
        out["seconds"] = 4 * link.latency_s + wire_s
    return out


def run_chain(path: str, ranges: list[tuple[int, int]], clients: list[int], links: list[str], connect: dict,
              steps: int, warmup: int, vocab: int, threads: bool) -> tuple[list[dict], dict]:  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="menos-chain-") as tmp, ExitStack() as stack:
        mgrs = [stack.enter_context(ManagerProcess(os.path.join(tmp, f"stage{i}"), "--model", path,
                                                   "--blocks", f"{a}:{b}"))
                for i, (a, b) in enumerate(ranges)]  # fmt: skip
        endpoints = [m.endpoint for m in mgrs]
        memory = servers_memory(mgrs, endpoints, connect, max(clients), vocab)
        for link in links:
            for n in clients:
                opts = {**connect, "link": None if link == "none" else link}
                res = run_clients(train_client, [(endpoints, opts, steps, warmup, vocab, 100 * n + i) for i in range(n)],
                                  threads=threads)  # fmt: skip
                row = {"stages": len(ranges), "clients": n, "link": link, "s_per_iter": mean(res, "s_per_step"),
                       "communication_s": mean(res, "communication_s"),
                       "server_s": mean(res, "server_compute_s") + mean(res, "server_queue_s"),
                       "bytes_per_iter": mean(res, "bytes_sent") + mean(res, "bytes_received")}  # fmt: skip
                rows.append(row)
                print(f"  {len(ranges)} stages, {n} clients, link {link}: {row['s_per_iter']:.3f} s/iter "
                      f"(communication {row['communication_s']:.3f}), {row['bytes_per_iter'] / 1e6:.2f} MB", flush=True)
    return rows, memory


def servers_memory(mgrs, endpoints: list[str], connect: dict, n: int, vocab: int) -> dict:
    """The stages' shared blocks and the servers' PSS with ``n`` clients connected, each after a step."""
    import torch

    import menos

    clients = []
    try:
        for i in range(n):
            clients.append(menos.connect(endpoints, seed=i, **connect))
            clients[-1].train_step(torch.randint(0, vocab, (connect["batch_size"], connect["seq_len"])))
        return {"clients": n, "shared_bytes": sum(menos.status(m.endpoint).shared_bytes for m in mgrs),
                "segments_pss_bytes": sum(segments_pss(m) for m in mgrs),
                "pss_bytes": sum(sum(m.pss().values()) for m in mgrs)}  # fmt: skip
    finally:
        for c in clients:
            c.close()


def segments_pss(mgr) -> int:
    """PSS of the shared-memory segments (the shared blocks) mapped by a manager and every process it
    spawned: a block mapped by several processes is counted once, in parts."""
    import psutil

    total = 0
    for p in [psutil.Process(mgr.pid), *mgr.children()]:
        try:
            total += sum(m.pss for m in p.memory_maps(grouped=True) if m.path.startswith("/dev/shm/"))
        except psutil.Error:
            pass
    return total


def plot(rows: list[dict], title: str, png: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for link in dict.fromkeys(r["link"] for r in rows):
        for n in dict.fromkeys(r["clients"] for r in rows):
            mine = [r for r in rows if r["link"] == link and r["clients"] == n]
            ax.plot([r["stages"] for r in mine], [r["s_per_iter"] for r in mine], marker="o",
                    label=f"{n} client{'s' * (n > 1)}, link {link}")  # fmt: skip
    ax.set_xlabel("stages (managers in the chain)")
    ax.set_ylabel("seconds per iteration (median)")
    ax.set_xticks(sorted({r["stages"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--shape", default="opt-350m-blocks")
    p.add_argument("--stages", default="1,2,4", help="chain lengths")
    p.add_argument("--clients", default="1,4", help="client counts")
    p.add_argument("--links", default="none;50ms,100Mbit", help="';'-separated: none (loopback) or an emulated link "
                   "LATENCY,BANDWIDTH")  # fmt: skip
    p.add_argument("--head-layers", type=int, default=1)
    p.add_argument("--tail-layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--name", default="chain")
    args = p.parse_args(argv)

    links = [link.strip() for link in args.links.split(";") if link.strip()]
    path = model_path(args.shape, "float32", args.models)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    connect = {"model": path, "head_layers": args.head_layers, "tail_layers": args.tail_layers,
               "batch_size": args.batch_size, "seq_len": args.seq_len}  # fmt: skip
    server = (args.head_layers, cfg.num_hidden_layers - args.tail_layers)
    title = (f"{args.shape}-shaped ({describe(path)}), float32;\nserver blocks {server[0]}..{server[1] - 1}, "
             f"batch {args.batch_size} x {args.seq_len}; every stage on this machine; client processes relay")
    print(title, flush=True)
    rows, mem_rows = [], []
    for k in counts(args.stages):
        ranges = split_range(*server, k)
        found, memory = run_chain(path, ranges, counts(args.clients), links, connect, args.steps, args.warmup,
                                  cfg.vocab_size, args.threads)  # fmt: skip
        rows += found
        mem_rows.append({"stages": k, "ranges": " ".join(f"{a}:{b}" for a, b in ranges), **memory})
    for r in rows:  # against the chain of one, same clients and link
        one = next((q for q in rows if q["stages"] == 1 and (q["clients"], q["link"]) == (r["clients"], r["link"])), None)
        extra = r["stages"] - 1
        model = per_stage_model(None if r["link"] == "none" else Link.parse(r["link"]), args.batch_size, args.seq_len,
                                cfg.hidden_size)  # fmt: skip
        r["extra_s_per_stage"] = round((r["s_per_iter"] - one["s_per_iter"]) / extra, 4) if one and extra else ""
        r["extra_bytes_per_stage"] = round((r["bytes_per_iter"] - one["bytes_per_iter"]) / extra) if one and extra else ""
        r["model_bytes_per_stage"] = model["bytes"]
        r["model_s_per_stage"] = round(model["seconds"], 4) if "seconds" in model else ""
    csv_path = write_csv(os.path.join(args.out, f"{args.name}.csv"), rows)
    mem_path = write_csv(os.path.join(args.out, f"{args.name}_memory.csv"), mem_rows)
    png = os.path.join(args.out, f"{args.name}.png")
    plot(rows, title, png)
    print(table(rows, ["stages", "clients", "link", "s_per_iter", "communication_s", "bytes_per_iter",
                       "extra_s_per_stage", "model_s_per_stage", "extra_bytes_per_stage", "model_bytes_per_stage"]))
    print(table(mem_rows, ["stages", "ranges", "clients", "shared_bytes", "segments_pss_bytes", "pss_bytes"]))
    print(f"wrote {csv_path}, {mem_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
