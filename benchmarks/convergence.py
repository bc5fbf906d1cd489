"""Loss per step: three clients fine-tuning through Menos at the same time vs local
fine-tuning of the full model (paper Figs. 8-9).

    python -m benchmarks.convergence                      # built-in model and texts, 60 steps
    python -m benchmarks.convergence --steps 2 --threads   # CI smoke size

Client i trains a LoRA adapter on its own built-in text (menos.data) with seed i; the
local run trains the same adapter (same initial weights, same batches, same
optimizer) on the whole model in one process. Split learning changes where the
blocks run, not the arithmetic, so the curves should coincide up to float rounding.
Writes convergence.csv and .png under --out.
"""

from __future__ import annotations

import os
import sys
import tempfile

from benchmarks.common import base_args, pyplot, write_csv
from tools.harness import ManagerProcess, run_clients

CLIENTS = 3
SPEC = dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"))


def menos_client(endpoint: str, index: int, steps: int, batch: int, seq: int, lr: float, barrier) -> list[float]:
    import torch

    import menos
    from menos.data import BUILTIN_TEXTS, byte_batches

    torch.set_num_threads(1)
    batches = byte_batches(BUILTIN_TEXTS[index], batch, seq, seed=index)
    with menos.connect(endpoint, head_layers=1, tail_layers=0, adapter=menos.LoraSpec(**SPEC), batch_size=batch,
                       seq_len=seq, lr=lr, seed=index) as client:  # fmt: skip
        barrier.wait()
        return [client.train_step(next(batches)) for _ in range(steps)]


def local_losses(index: int, steps: int, batch: int, seq: int, lr: float) -> list[float]:
    """The same fine-tuning, without split learning: the whole model in this process."""
    import torch

    from menos.adapters import inject
    from menos.data import BUILTIN_TEXTS, byte_batches
    from menos.messages import LoraSpec
    from menos.models import load_base

    _, model = load_base(None, torch.float32)
    opt = torch.optim.AdamW(inject(model, LoraSpec(**SPEC), seed=index), lr=lr, weight_decay=0.0)
    batches = byte_batches(BUILTIN_TEXTS[index], batch, seq, seed=index)
    losses = []
    for _ in range(steps):
        ids = next(batches)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    print(f"menos-builtin-llama, float32; {CLIENTS} clients, batch {args.batch_size} x {args.seq_len}, "
          f"lr {args.lr}, LoRA r=8 on q_proj, v_proj; head 1 block", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="menos-bench-") as state, ManagerProcess(state) as mgr:
        split = run_clients(menos_client, [(mgr.endpoint, i, args.steps, args.batch_size, args.seq_len, args.lr)
                                           for i in range(CLIENTS)], threads=args.threads)  # fmt: skip
    local = [local_losses(i, args.steps, args.batch_size, args.seq_len, args.lr) for i in range(CLIENTS)]
    rows = [{"client": i, "step": s + 1, "menos_loss": split[i][s], "local_loss": local[i][s],
             "abs_diff": abs(split[i][s] - local[i][s])} for i in range(CLIENTS) for s in range(args.steps)]  # fmt: skip
    csv_path = write_csv(os.path.join(args.out, "convergence.csv"), rows)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i in range(CLIENTS):
        line, = ax.plot(range(1, args.steps + 1), split[i], label=f"client {i}, Menos")
        ax.plot(range(1, args.steps + 1), local[i], "--", color=line.get_color(), label=f"client {i}, local")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("3 clients through Menos vs local fine-tuning", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(args.out, "convergence.png")
    fig.savefig(png, dpi=120)
    worst = max(r["abs_diff"] for r in rows)
    for i in range(CLIENTS):
        print(f"client {i}: loss {split[i][0]:.3f} -> {split[i][-1]:.3f} (local {local[i][0]:.3f} -> {local[i][-1]:.3f})")
    print(f"largest |Menos - local| over all steps: {worst:.2e}")
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
