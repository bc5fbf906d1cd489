"""The cut layer's codecs over a slow link: bytes and seconds per iteration, and convergence.

    python -m benchmarks.compression                       # the defaults below
    python -m benchmarks.compression --shape tiny --sizes 1x16 --clients 1 --steps 1 --warmup 0 --conv-steps 2 \
        --conv-clients 1 --codecs none,int8 --threads        # CI smoke size

Speed: the fp32 model of the iteration-time benchmark (``--shape``), one Menos manager
(on-demand), every client on its own emulated ``--link`` (default 100 ms / 10 Mbit/s),
per codec (none, bf16, fp16, int8), at each batch size of ``--sizes`` and each client
count of ``--clients``: the medians after ``--warmup`` steps of bytes per iteration
(sent + received, headers included) and seconds per iteration with its communication
share. The first size is the iteration-time benchmark's own (1 x 16 tokens: 64 KB a
message, latency dominates); the second has activations of 1 MB a message (1 x 256
tokens of hidden 1024), where bandwidth dominates as in the paper's Table 1.

Convergence: the convergence benchmark's setting (the built-in model, 3 clients on
their built-in texts, batch 4 x 64, LoRA r8 on q, v, lr 3e-3), ``--conv-steps`` steps
per codec on one manager; per client the largest relative loss difference from no
compression over the run and at the last step.

Writes compression.csv, compression_convergence.csv and compression.png under --out.
"""

from __future__ import annotations

import os
import sys
import tempfile

from benchmarks.common import base_args, counts, describe, mean, model_path, pyplot, table, train_client, write_csv
from benchmarks.convergence import SPEC
from tools.harness import ManagerProcess, run_clients

CODECS = ("none", "bf16", "fp16", "int8")


def conv_client(endpoint: str, index: int, steps: int, codec: str, barrier) -> list[float]:
    import torch

    import menos
    from menos.data import BUILTIN_TEXTS, byte_batches

    torch.set_num_threads(1)
    batches = byte_batches(BUILTIN_TEXTS[index], 4, 64, seed=index)
    with menos.connect(endpoint, head_layers=1, tail_layers=0, adapter=menos.LoraSpec(**SPEC), batch_size=4,
                       seq_len=64, lr=3e-3, seed=index, compression=None if codec == "none" else codec) as client:  # fmt: skip
        barrier.wait()
        return [client.train_step(next(batches)) for _ in range(steps)]


def speed(args, path: str, vocab: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="menos-bench-") as state:
        with ManagerProcess(state, "--model", path) as mgr:
            for size in args.sizes.split(","):
                batch, seq = (int(x) for x in size.split("x"))
                for n in counts(args.clients):
                    for codec in args.codecs:
                        connect = {"model": path, "head_layers": 1, "tail_layers": 0, "batch_size": batch,
                                   "seq_len": seq, "link": args.link, "compression": None if codec == "none" else codec}  # fmt: skip
                        res = run_clients(train_client, [(mgr.endpoint, connect, args.steps, args.warmup, vocab, 100 * n + i)
                                                         for i in range(n)], threads=args.threads)  # fmt: skip
                        row = {"tokens": f"{batch}x{seq}", "clients": n, "codec": codec,
                               "bytes_per_iter": int(mean(res, "bytes_sent") + mean(res, "bytes_received")),
                               "s_per_iter": mean(res, "s_per_step"), "communication_s": mean(res, "communication_s"),
                               "server_compute_s": mean(res, "server_compute_s")}  # fmt: skip
                        rows.append(row)
                        print(f"  {row['tokens']:>6} {n} clients {codec:>4}: {row['bytes_per_iter'] / 1e6:7.3f} MB/iter, "
                              f"{row['s_per_iter']:.3f} s/iter (communication {row['communication_s']:.3f})", flush=True)
    for r in rows:
        ref = next(x for x in rows if x["tokens"] == r["tokens"] and x["clients"] == r["clients"] and x["codec"] == "none")
        r["bytes_vs_none"] = round(ref["bytes_per_iter"] / r["bytes_per_iter"], 2)
        r["s_per_iter_cut"] = round(1 - r["s_per_iter"] / ref["s_per_iter"], 3)
    return rows


def convergence(args) -> list[dict]:
    losses = {}
    with tempfile.TemporaryDirectory(prefix="menos-bench-") as state:
        with ManagerProcess(state) as mgr:  # the built-in model
            for codec in args.codecs:
                losses[codec] = run_clients(conv_client, [(mgr.endpoint, i, args.conv_steps, codec)
                                                          for i in range(args.conv_clients)], threads=args.threads)  # fmt: skip
    rows = []
    for codec in args.codecs:
        for i in range(args.conv_clients):
            ref, got = losses["none"][i], losses[codec][i]
            rel = [abs(g - r) / r for g, r in zip(got, ref)]
            rows.append({"codec": codec, "client": i, "final_loss": got[-1], "final_loss_none": ref[-1],
                         "final_rel_diff": rel[-1], "max_rel_diff": max(rel)})  # fmt: skip
    return rows


def plot(rows: list[dict], codecs: list[str], title: str, png: str) -> None:
    plt = pyplot()
    sizes = sorted({r["tokens"] for r in rows}, key=lambda t: int(t.split("x")[0]) * int(t.split("x")[1]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        sub = [r for r in rows if r["tokens"] == size]
        ns = sorted({r["clients"] for r in sub})
        width = 0.8 / len(ns)
        for j, n in enumerate(ns):
            vals = [next(r["s_per_iter"] for r in sub if r["clients"] == n and r["codec"] == c) for c in codecs]
            ax.bar([k + j * width for k in range(len(codecs))], vals, width, label=f"{n} client(s)")
        ax.set_xticks([k + width * (len(ns) - 1) / 2 for k in range(len(codecs))], codecs)
        ax.set_title(f"{size} tokens")
        ax.set_ylabel("s / iteration")
        ax.legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--shape", default="opt-350m-v4k")
    p.add_argument("--sizes", default="1x16,1x256", help="batch x seq, comma-separated")
    p.add_argument("--clients", default="1,6")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--link", default="100ms,10Mbit")
    p.add_argument("--conv-steps", type=int, default=60, help="0: no convergence run")
    p.add_argument("--conv-clients", type=int, default=3)
    p.add_argument("--codecs", default=",".join(CODECS), help="which codecs (none first: the reference)")
    args = p.parse_args(argv)
    args.codecs = args.codecs.split(",")
    if args.codecs[0] != "none":
        p.error("--codecs: none comes first (the reference of every comparison)")

    path = model_path(args.shape, "float32", args.models)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    title = f"{args.shape}-shaped ({describe(path)}), float32; link {args.link}; one Menos manager (on-demand)"
    print(title, flush=True)
    rows = speed(args, path, vocab)
    conv = convergence(args) if args.conv_steps else []
    csv_path = write_csv(os.path.join(args.out, "compression.csv"), rows)
    if conv:
        write_csv(os.path.join(args.out, "compression_convergence.csv"), conv)
    png = os.path.join(args.out, "compression.png")
    plot(rows, args.codecs, title, png)
    print(table(rows, ["tokens", "clients", "codec", "bytes_per_iter", "bytes_vs_none", "s_per_iter", "s_per_iter_cut",
                       "communication_s", "server_compute_s"]))  # fmt: skip
    if conv:
        print(table(conv, ["codec", "client", "final_loss", "final_loss_none", "final_rel_diff", "max_rel_diff"]))
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
