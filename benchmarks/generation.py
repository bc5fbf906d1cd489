"""Generation through the split: tokens per second, against the whole model generating locally.

    python -m benchmarks.generation                                    # the defaults below
    python -m benchmarks.generation --shape tiny --clients 1 --new-tokens 4 --repeats 1 --threads   # CI smoke size

The iteration-time benchmark's fp32 model (``--shape``), batch 1, a prompt of
``--prompt`` random tokens and ``--new-tokens`` new ones (greedy; no eos, so every run
makes all of them). Three settings, each the median over ``--repeats`` generations
per client, timed around ``client.generate`` (the prompt's round trip included):

- local: ``transformers``' ``generate`` of the whole model in this process, with the
  worker's thread count (``--worker-threads``), at the same size;
- Menos on loopback: one manager, ``--clients`` clients at once (head 1 block, tail 0),
  each its own process; tokens/s per client and all together;
- Menos over ``--link`` (default 100 ms / 10 Mbit/s), 1 client, beside its bound: one
  round trip a token (2 x latency + both messages' bytes over the bandwidth).

Writes generation.csv and generation.png under --out.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from benchmarks.common import base_args, counts, describe, model_path, pyplot, table, write_csv
from tools.harness import ManagerProcess, run_clients


def gen_client(endpoint: str, path: str, prompt: int, new: int, repeats: int, link, seed: int, barrier) -> dict:
    import torch

    import menos

    torch.set_num_threads(1)
    ids = torch.randint(1, 256, (1, prompt), generator=torch.Generator().manual_seed(seed))
    with menos.connect(endpoint, model=path, head_layers=1, tail_layers=0, batch_size=1, seq_len=prompt,
                       link=link) as client:  # fmt: skip
        client.generate(ids, max_new_tokens=2, eos_token_id=[])  # warm-up: first calls allocate
        barrier.wait()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = client.generate(ids, max_new_tokens=new, eos_token_id=[])
            times.append(time.perf_counter() - t0)
            assert out.shape[1] == prompt + new
        barrier.wait()
    return {"tokens_per_s": new / statistics.median(times)}


def local(path: str, prompt: int, new: int, repeats: int, threads: int) -> float:
    import torch

    from menos.models import load_base

    torch.set_num_threads(threads)
    _, model = load_base(path, torch.float32)
    ids = torch.randint(1, 256, (1, prompt), generator=torch.Generator().manual_seed(0))
    opts = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**opts, "max_new_tokens": 2, "min_new_tokens": 2})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(ids, **opts)
            times.append(time.perf_counter() - t0)
    return new / statistics.median(times)


def link_bound(link: str, hidden: int) -> float:
    """Tokens/s if a token cost nothing but its round trip: 2 x latency + both fp32 messages' bytes."""
    from menos.link import Link

    lk = Link.parse(link)
    return 1.0 / (2 * lk.delay_s(hidden * 4))  # one position's activations, fp32, each way


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--shape", default="opt-350m-v4k")
    p.add_argument("--clients", default="1,4")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker-threads", type=int, default=2, help="the worker's torch threads, and the local model's")
    p.add_argument("--link", default="100ms,10Mbit")
    args = p.parse_args(argv)

    path = model_path(args.shape, "float32", args.models)
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(path).hidden_size
    title = (f"{args.shape}-shaped ({describe(path)}), float32, batch 1, prompt {args.prompt}, "
             f"{args.new_tokens} new tokens (greedy), {args.worker_threads} threads")  # fmt: skip
    print(title, flush=True)
    rows = [{"setting": "local generate (whole model)", "clients": 1,
             "tokens_per_s": local(path, args.prompt, args.new_tokens, args.repeats, args.worker_threads)}]  # fmt: skip
    print(f"  local: {rows[0]['tokens_per_s']:.2f} tokens/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="menos-bench-") as state:
        with ManagerProcess(state, "--model", path, worker_threads=args.worker_threads) as mgr:
            runs = [("menos, loopback", n, None) for n in counts(args.clients)] + [(f"menos, {args.link}", 1, args.link)]
            for setting, n, link in runs:
                res = run_clients(gen_client, [(mgr.endpoint, path, args.prompt, args.new_tokens, args.repeats, link, i)
                                               for i in range(n)], threads=args.threads)  # fmt: skip
                per = statistics.fmean(r["tokens_per_s"] for r in res)
                row = {"setting": setting, "clients": n, "tokens_per_s": per, "all_clients_tokens_per_s": per * n}
                if link:
                    row["bound_tokens_per_s"] = link_bound(link, hidden)
                rows.append(row)
                print(f"  {setting}, {n} client(s): {per:.2f} tokens/s each", flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r.setdefault("all_clients_tokens_per_s", r["tokens_per_s"])
        r.setdefault("bound_tokens_per_s", "")
        r["vs_local"] = round(r["tokens_per_s"] / base, 3)
    csv_path = write_csv(os.path.join(args.out, "generation.csv"), rows)
    png = os.path.join(args.out, "generation.png")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['setting']}\n{r['clients']} client(s)" for r in rows]
    ax.bar(labels, [r["tokens_per_s"] for r in rows], label="per client")
    ax.bar(labels, [r["all_clients_tokens_per_s"] - r["tokens_per_s"] for r in rows],
           bottom=[r["tokens_per_s"] for r in rows], alpha=0.4, label="all clients")  # fmt: skip
    for i, r in enumerate(rows):
        if r["bound_tokens_per_s"]:
            ax.hlines(r["bound_tokens_per_s"], i - 0.4, i + 0.4, colors="k", linestyles="dashed", label="link bound")
    ax.set_ylabel("tokens / s")
    ax.legend()
    ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(table(rows, ["setting", "clients", "tokens_per_s", "all_clients_tokens_per_s", "vs_local", "bound_tokens_per_s"]))
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
