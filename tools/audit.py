"""menos-audit: how much of a client's data an honest-but-curious server could read at the cut.

For each cut (head and tail layers), codec and defence asked for, a victim client trains for N steps
on the built-in victim text through a recording relay (``menos.privacy.tap``) in front of a
real manager; the attacks (``menos.privacy.attacks``) then get only that traffic and the
public base, and this driver, which alone holds the victim's tokens, scores them. One row
per attack: head_layers, tail_layers, codec, defence, attack, recovery (exact-token rate, 0..1), chance
(1 / vocabulary) and victim_loss (the victim's loss on a held-out batch after the N steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

from tools.cli_args import OneLineParser, raw_config

ATTACKS = ("nearest_neighbour", "learned_inversion", "label_recovery")
KEYS = ("head_layers", "tail_layers", "codec", "defence", "attack", "recovery", "chance", "victim_loss")
CODECS = ("none", "bf16", "fp16", "int8")
VICTIM_LR = 3e-3  # the demo's first client: fast enough that N steps move the loss


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="menos-audit", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin", help="a checkpoint directory, or builtin (default)")
    p.add_argument("--head-layers", type=int, nargs="+", default=[1], metavar="H", help="cuts to audit (default 1)")
    p.add_argument("--tail-layers", type=int, nargs="+", default=[0], metavar="T",
                   help="the victim's blocks after the server (default 0, as menos.connect's)")
    p.add_argument("--codec", nargs="+", default=["none"], choices=CODECS, help="cut-layer codecs (default none)")
    p.add_argument("--defence", nargs="+", default=["none"], metavar="SPEC",
                   help="client defences: none, noise:SIGMA, clip:C+noise:SIGMA, nopeek:W, gradnoise:SIGMA (default none)")  # fmt: skip
    p.add_argument("--steps", type=int, default=60, help="victim training steps (default 60)")
    p.add_argument("--inversion-steps", type=int, default=200,
                   help="the learned inverter's training steps on the attacker's public text (default 200)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--json", action="store_true", help="a JSON list of rows (keys: " + ", ".join(KEYS) + ")")
    p.add_argument("--plot", metavar="FILE", help="draw the recovery rates into FILE (png, svg, pdf)")
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """The first argument the audit could only fail on later, as one line (before torch loads)."""
    try:
        cfg = raw_config(args.model)
    except ValueError as exc:
        return str(exc)
    layers = cfg.get("num_hidden_layers")
    for t in args.tail_layers:
        if t < 0:
            return f"--tail-layers {t}: must be at least 0"
        for h in args.head_layers:
            if h < 0:
                return f"--head-layers {h}: must be at least 0"
            if isinstance(layers, int) and h + t >= layers:
                return (f"--head-layers {h}: with --tail-layers {t}, the server needs a block of the "
                        f"model's {layers}: use 0 to {layers - 1 - t}")  # fmt: skip
    for spec in args.defence:
        problem = _defence_problem(spec)
        if problem:
            return problem
    if args.steps < 1:
        return f"--steps {args.steps}: must be at least 1"
    if args.inversion_steps < 1:
        return f"--inversion-steps {args.inversion_steps}: must be at least 1"
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size}: must be at least 1"
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        return f"--plot {args.plot}: no such directory"
    longest = cfg.get("max_position_embeddings")
    if args.seq_len < 2 or (isinstance(longest, int) and args.seq_len > longest):
        return f"--seq-len {args.seq_len}: the model takes 2 to {longest}"
    return None


def _defence_problem(spec: str) -> str | None:
    """Why ``spec`` is no defence a client takes (menos.defences parses without torch), or None."""
    if spec == "none":
        return None
    if importlib.util.find_spec("menos.defences") is None:
        return f"--defence {spec}: this Menos has no client defences (menos.defences); use --defence none"
    from menos.defences import parse

    try:
        parse(spec)
    except ValueError as exc:
        return f"--{exc}"  # "--defence='...': ..."
    return None


# --------------------------------------------------------------------------- the victim


def tokenize(text: str, model_dir: str | None, vocab: int):
    """``text``'s token ids, as the victim's data is tokenized (byte ids folded into a vocabulary under 256)."""
    import torch

    from menos.data import ByteTokenizer, tokenizer_for

    tok = tokenizer_for(model_dir)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    return ids % vocab if isinstance(tok, ByteTokenizer) else ids


def victim_batches(model_dir: str | None, vocab: int, batch: int, seq: int, seed: int):
    """Endless (B, T) batches of the built-in victim text (the recipes corpus)."""
    import torch

    from menos.data import BUILTIN_TEXTS

    ids = tokenize(BUILTIN_TEXTS[0], model_dir, vocab)
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seq, (batch,), generator=gen)
        yield torch.stack([ids[s : s + seq] for s in starts.tolist()])  # (B, T)


def run_victim(endpoint: str, model_dir: str | None, vocab: int, head_layers: int, tail_layers: int, codec: str,
               defence: str, steps: int, batch: int, seq: int, seed: int = 0) -> dict:  # fmt: skip
    """Train a victim client for ``steps`` at ``endpoint``: its losses, its inputs (the truth,
    which stays with the driver) and its loss on a held-out batch afterwards."""
    import menos

    batches = victim_batches(model_dir, vocab, batch, seq, seed)
    held_out = next(victim_batches(model_dir, vocab, batch, seq, seed + 1_000_003))
    inputs, losses = [], []
    with menos.connect(endpoint, head_layers=head_layers, tail_layers=tail_layers, batch_size=batch, seq_len=seq,
                       seed=seed, lr=VICTIM_LR, compression=codec, defence=defence) as client:  # fmt: skip
        for _ in range(steps):
            ids = next(batches)
            inputs.append(ids)
            losses.append(client.train_step(ids))
        victim_loss = client.eval_step(held_out)
    return {"inputs": inputs, "losses": losses, "victim_loss": victim_loss}


# --------------------------------------------------------------------------- scoring (the driver holds the truth)


def recovery(predicted, truth) -> float | None:
    """Exact-token rate of ``predicted`` against ``truth``, step by step (None: not applicable)."""
    if predicted is None:
        return None
    hits = total = 0
    for p, t in zip(predicted, truth, strict=True):
        hits += int((p == t).sum())
        total += t.numel()
    return hits / total if total else None


def public_text() -> str:
    """The attacker's own text: the docstrings of Menos' modules, never the victim's."""
    import menos.client, menos.codecs, menos.models, menos.surgery, menos.wire  # noqa: E401
    import menos.privacy.attacks, menos.privacy.tap  # noqa: E401

    mods = (menos.client, menos.codecs, menos.models, menos.surgery, menos.wire, menos.privacy.attacks,
            menos.privacy.tap, sys.modules[__name__])  # fmt: skip
    return "\n".join(m.__doc__ or "" for m in mods)


def audit_one(endpoint: str, base, model_dir: str | None, head_layers: int, tail_layers: int, codec: str,
              defence: str, steps: int, batch: int, seq: int, inversion_steps: int = 200) -> list[dict]:  # fmt: skip
    """One cut, codec and defence: the victim through the tap, the attacks, their rows."""
    from menos.privacy import attacks
    from menos.privacy.tap import Tap

    vocab = base.config.vocab_size
    with Tap(endpoint) as tap:
        victim = run_victim(tap.endpoint, model_dir, vocab, head_layers, tail_layers, codec, defence, steps, batch, seq)
    if tap.error is not None:
        raise RuntimeError(f"the tap stopped relaying: {tap.error!r}")
    traffic = tap.traffic
    truth = victim["inputs"]
    predictions = {
        "nearest_neighbour": attacks.nearest_neighbour(traffic, base),
        "learned_inversion": attacks.learned_inversion(traffic, base, tokenize(public_text(), model_dir, vocab),
                                                       steps=inversion_steps),
        "label_recovery": attacks.label_recovery(traffic, base),
    }
    truths = {"nearest_neighbour": truth, "learned_inversion": truth, "label_recovery": [t[:, 1:] for t in truth]}
    return [dict(head_layers=head_layers, tail_layers=tail_layers, codec=codec, defence=defence, attack=name,
                 recovery=recovery(predictions[name], truths[name]), chance=1 / vocab,
                 victim_loss=victim["victim_loss"]) for name in ATTACKS]  # fmt: skip


def audit(args: argparse.Namespace) -> list[dict]:
    """Every combination asked for, on one manager (stopped and reaped however this ends)."""
    import torch

    from menos.models import load_base
    from tools.harness import ManagerProcess

    model_dir = None if args.model == "builtin" else args.model
    _, base = load_base(model_dir, torch.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="menos-audit-") as state_dir:
        with ManagerProcess(state_dir, *(["--model", model_dir] if model_dir else [])) as manager:
            for t in args.tail_layers:
                for h in args.head_layers:
                    for codec in args.codec:
                        for defence in args.defence:
                            rows += audit_one(manager.endpoint, base, model_dir, h, t, codec, defence,
                                              args.steps, args.batch_size, args.seq_len, args.inversion_steps)  # fmt: skip
    return rows


# --------------------------------------------------------------------------- output


def table(rows: list[dict]) -> str:
    lines = [f"{'head':>4}  {'tail':>4}  {'codec':<5}  {'defence':<16}  {'attack':<18}  {'recovery':>8}  {'chance':>6}"
             f"  {'victim_loss':>11}"]  # fmt: skip
    for r in rows:
        rec = "n/a" if r["recovery"] is None else f"{r['recovery']:.3f}"
        lines.append(f"{r['head_layers']:>4}  {r['tail_layers']:>4}  {r['codec']:<5}  {r['defence']:<16}  {r['attack']:<18}  {rec:>8}"
                     f"  {r['chance']:>6.4f}  {r['victim_loss']:>11.3f}")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Grouped bars: recovery per attack for each (cut, codec, defence), chance as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = lambda r: (r["head_layers"], r["tail_layers"], r["codec"], r["defence"])  # noqa: E731  one run of the victim
    groups = list(dict.fromkeys(key(r) for r in rows))
    loss = {key(r): r["victim_loss"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(ATTACKS)
    for i, name in enumerate(ATTACKS):
        by = {key(r): r["recovery"] for r in rows if r["attack"] == name}
        ax.bar([g + i * width for g in range(len(groups))], [by.get(k) or 0.0 for k in groups], width, label=name)
    ax.axhline(rows[0]["chance"], color="grey", linestyle="--", label="chance")
    ax.set_xticks([g + width for g in range(len(groups))])
    ax.set_xticklabels([f"H={g[0]} T={g[1]}\n{g[2]}\n{g[3]}\nloss {loss[g]:.2f}" for g in groups], fontsize=8)
    ax.set_ylabel("recovery (exact tokens / labels)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    problem = check_args(args)  # before torch, a manager or a client: nothing to clean up
    if problem:
        p.error(problem)
    from tools.harness import ManagerExited

    try:
        rows = audit(args)
    except ManagerExited as exc:  # the manager said why on stderr
        return exc.returncode or 1
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
