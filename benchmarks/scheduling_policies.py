"""Scheduling time vs number of clients under Menos's three memory policies (paper Fig. 7).

    python -m benchmarks.scheduling_policies                 # built-in model, 2/4/8/16 clients
    python -m benchmarks.scheduling_policies --shape tiny --clients 2 --steps 2 --threads   # CI smoke size

- on-demand (the paper's Menos): a forward holds M_f only while it computes; the
  backward asks for M_b and recomputes;
- preserve: a forward takes M_b and keeps it, and the activations, until its backward
  (through the client's round trip);
- adaptive: keeps them while memory is plentiful, and gives them back (to recompute
  later) when someone waits.

The activation memory holds ``--fit`` backwards (M_b, estimated from the config) and
half of one to spare. Each
client has its own emulated link; the scheduling time of an iteration is the time its
forward and backward waited for grants (median per client, mean over clients).
Writes scheduling_policies.csv and .png under --out.
"""

from __future__ import annotations

import os
import sys
import tempfile

from benchmarks.common import base_args, counts, describe, mean, model_path, pyplot, table, train_client, write_csv
from tools.harness import ManagerProcess, run_clients

POLICIES = ("on-demand", "preserve", "adaptive")


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--shape", default="builtin", help="builtin (menos's small Llama) or a benchmarks.common shape")
    p.add_argument("--clients", default="2,4,8,16")
    p.add_argument("--fit", type=int, default=4, help="backwards (M_b) the activation memory holds")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--link", default="100ms,10Mbit")
    p.add_argument("--policies", default=",".join(POLICIES))
    args = p.parse_args(argv)

    from transformers import AutoConfig

    from menos.estimator import estimate, with_margin
    from menos.models import builtin_config

    if args.shape == "builtin":
        path, config, model_flags, name = None, builtin_config(), (), "menos-builtin-llama"
    else:
        path = model_path(args.shape, "float32", args.models)
        config, model_flags, name = AutoConfig.from_pretrained(path), ("--model", path), describe(path)
    connect = {"head_layers": 1, "tail_layers": 0, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "link": args.link}  # fmt: skip
    est = estimate(config, 1, 0, args.batch_size, args.seq_len)
    capacity = int((args.fit + 0.5) * with_margin(est.m_b))  # half a backward spare: estimates err

    title = (f"{name}, float32; batch {args.batch_size} x {args.seq_len}; link {args.link}; activation memory "
             f"{capacity / 2**20:.0f} MiB = {args.fit + 0.5:g} backwards")  # fmt: skip
    print(title, flush=True)
    rows = []
    policies = args.policies.split(",")
    for policy in policies:
        with tempfile.TemporaryDirectory(prefix="menos-bench-") as state:
            with ManagerProcess(state, *model_flags, "--policy", policy, "--memory-capacity", str(capacity)) as mgr:
                for n in counts(args.clients):
                    res = run_clients(train_client, [(mgr.endpoint, connect, args.steps, args.warmup,
                                                      config.vocab_size, 100 * n + i) for i in range(n)],
                                      threads=args.threads)  # fmt: skip
                    row = {"policy": policy, "clients": n, "schedule_s": mean(res, "server_queue_s"),
                           "s_per_iter": mean(res, "s_per_step"), "link": args.link}  # fmt: skip
                    rows.append(row)
                    print(f"  {policy:9s} {n:2d} clients: scheduling {row['schedule_s']:.4f} s/iter, "
                          f"{row['s_per_iter']:.3f} s/iter", flush=True)  # fmt: skip
    csv_path = write_csv(os.path.join(args.out, "scheduling_policies.csv"), rows)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for policy in policies:
        mine = [r for r in rows if r["policy"] == policy]
        ax.plot([r["clients"] for r in mine], [max(r["schedule_s"], 1e-5) for r in mine], marker="o", label=policy)
    ax.set_yscale("log")
    ax.set_xlabel("clients")
    ax.set_ylabel("scheduling time per iteration, s")
    ax.set_title(title, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = os.path.join(args.out, "scheduling_policies.png")
    fig.savefig(png, dpi=120)
    print(table(rows, ["policy", "clients", "schedule_s", "s_per_iter"]))
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
