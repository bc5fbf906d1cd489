"""What an honest-but-curious server recovers at the cut, and what each defence costs
(issue #30): ``menos-audit``'s three attacks against cut depth, the cut layer's codec and
Gaussian noise, with the victim's held-out loss after its training beside each.

    python -m benchmarks.privacy                                # 3 models, 60 steps (about 30 min on 2 cores)
    python -m benchmarks.privacy --models-list builtin --steps 2 --inversion-steps 20  # CI smoke size

Models: the built-in one (Llama, hidden 256, vocab 256), a Llama-shaped checkpoint (hidden
256, vocab 512, GQA) and an OPT-shaped one (hidden 256, learned positions), all with seeded
random weights. Sweeps, each against the undefended cut of one block and no tail: head
layers 1, 2, 4; tail layers 1, 2 (the client's blocks after the server, which the label
attack stands the public blocks in for); codecs none, bf16, int8; noise sigma 0.5, 1, 2
(x each position's RMS); noise on the gradient sent back, sigma 4 and 16. Writes privacy.csv
and privacy.png under --out.
"""

from __future__ import annotations

import os
import sys
import tempfile

from benchmarks.common import base_args, model_path, pyplot, write_csv

MODELS = {"builtin": None, "llama": "privacy-llama", "opt": "privacy-opt", "mistral": "privacy-mistral",
          "qwen2": "privacy-qwen2"}
DEFAULT_MODELS = ["builtin", "llama", "opt"]  # the plot's; mistral and qwen2 on request
# (head_layers, tail_layers, codec, defence): the cut sweep, the tail sweep, the codec sweep, the noise sweep
RUNS = [(1, 0, "none", "none"), (2, 0, "none", "none"), (4, 0, "none", "none"),
        (1, 1, "none", "none"), (1, 2, "none", "none"),
        (1, 0, "bf16", "none"), (1, 0, "int8", "none"),
        (1, 0, "none", "noise:0.5"), (1, 0, "none", "noise:1"), (1, 0, "none", "noise:2"),
        (1, 0, "none", "gradnoise:4"), (1, 0, "none", "gradnoise:16")]  # fmt: skip


def run_model(name: str, models_root: str, steps: int, batch: int, seq: int, runs,
              inversion_steps: int = 200) -> list[dict]:  # fmt: skip
    import torch

    from menos.models import load_base
    from tools.audit import audit_one
    from tools.harness import ManagerProcess

    model_dir = None if MODELS[name] is None else model_path(MODELS[name], "float32", models_root)
    _, base = load_base(model_dir, torch.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="menos-privacy-") as state:
        with ManagerProcess(state, *(["--model", model_dir] if model_dir else [])) as manager:
            for h, t, codec, defence in runs:
                for r in audit_one(manager.endpoint, base, model_dir, h, t, codec, defence, steps, batch, seq,
                                   inversion_steps):  # fmt: skip
                    rows.append({"model": name, **r})
                    rec = "n/a" if r["recovery"] is None else f"{r['recovery']:.3f}"
                    print(f"{name:8} H={h} T={t} {codec:5} {defence:10} {r['attack']:18} recovery {rec}"
                          f"  victim loss {r['victim_loss']:.3f}", flush=True)  # fmt: skip
    return rows


def _first_block_and(defence):
    """Rows at H=1, T=0, no codec, whose defence passes ``defence``."""
    return lambda r: r["head_layers"] == 1 and r["tail_layers"] == 0 and r["codec"] == "none" and defence(r["defence"])


def _sigma(r) -> float:
    return 0.0 if r["defence"] == "none" else float(r["defence"].split(":")[1])


def plot(rows: list[dict], path: str) -> None:
    """One panel per sweep; a line per model and attack."""
    plt = pyplot()
    plain = lambda r: r["codec"] == "none" and r["defence"] == "none"  # noqa: E731
    sweeps = [("head layers (T=0)", lambda r: plain(r) and r["tail_layers"] == 0, lambda r: r["head_layers"]),
              ("tail layers (H=1)", lambda r: plain(r) and r["head_layers"] == 1, lambda r: r["tail_layers"]),
              ("codec (H=1, T=0)", lambda r: r["head_layers"] == 1 and r["tail_layers"] == 0 and r["defence"] == "none",
               lambda r: r["codec"]),
              ("noise sigma (H=1, T=0)", _first_block_and(lambda d: d == "none" or d.startswith("noise:")), _sigma),
              ("gradient noise sigma (H=1, T=0)", _first_block_and(lambda d: d == "none" or d.startswith("gradnoise:")),
               _sigma)]  # fmt: skip
    fig, axes = plt.subplots(1, 5, figsize=(23, 4.5), sharey=True)
    for ax, (title, keep, x) in zip(axes, sweeps):
        for model in dict.fromkeys(r["model"] for r in rows):
            for attack, style in (("nearest_neighbour", "o-"), ("learned_inversion", "s--"), ("label_recovery", "^:")):
                pts = [(x(r), r["recovery"]) for r in rows if r["model"] == model and r["attack"] == attack and keep(r)
                       and r["recovery"] is not None]  # fmt: skip
                if pts:
                    ax.plot([str(p[0]) for p in pts], [p[1] for p in pts], style, label=f"{model} {attack}")
        ax.set_title(title)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("recovery (exact tokens; labels)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle("what the server recovers at the cut (random-weight models, 60 victim steps)")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = base_args("Token and label recovery at the cut against cut, codec and noise.")
    p.add_argument("--models-list", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--inversion-steps", type=int, default=200, help="the learned inverter's training steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=len(RUNS), help="the first N of the runs (smoke tests)")
    args = p.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    rows = []
    for name in args.models_list:
        rows += run_model(name, args.models, args.steps, args.batch_size, args.seq_len, RUNS[: args.runs],
                          args.inversion_steps)  # fmt: skip
    csv = write_csv(os.path.join(args.out, "privacy.csv"), rows)
    plot(rows, os.path.join(args.out, "privacy.png"))
    print(f"wrote {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
