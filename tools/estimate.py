"""menos-estimate: how much memory a Menos server needs, from the model's config alone.

Nothing is loaded and nothing runs: the numbers come from menos.estimator's analytic
model (exact parameter counts for M and A + O; M_f and M_b calibrated on CPU fp32
against the worker's start-up profiler, typically within 15%). Prints, per client and
for N clients, Menos (one shared copy of the base weights, one backward's activations
at a time) against vanilla split learning (every client its own copy of the server's
blocks and its own activations), and with --capacity how many clients fit under each.

--capacity is the server's whole memory (weights, adapters, activations), unlike the
manager's --memory-capacity, which budgets activations alone.

--json prints one object with the keys:
    estimate (true), note, model, model_type, dtype, batch_size, seq_len, lora_r,
    target_modules, head_layers, tail_layers, server_layers ([start, stop)), clients,
    memory: {M, M_server_blocks, A_plus_O, M_f, M_b}              bytes; A_plus_O, M_f, M_b per client
    tokens: {M_f, M_b}                                             scheduler tokens: with the profile's margin
    totals: {menos, preserve, vanilla}                             bytes for `clients` clients
    capacity (bytes or null), clients_that_fit: {menos, preserve, vanilla} (or null)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from menos.client_config import ClientConfig
from menos.estimator import ELEM_BYTES, MARGIN, SLACK_BYTES, estimate, with_margin
from menos.versions import transformers_problem
from menos.messages import IA3Spec, LoraSpec, PrefixSpec
from menos.sizes import format_size, parse_size

DEFAULT = ClientConfig()  # a server sized with no flags is sized for a client with connect's defaults

NOTE = (
    "ESTIMATE from the model's config alone (nothing loaded or run); M_f and M_b are calibrated on CPU fp32 "
    "against the worker's start-up profile (typically within 15%); the worker measures the real values."
)


def load_config(model: str):
    if model == "builtin":
        from menos.models import builtin_config

        return builtin_config()
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"{model} is not a checkpoint directory (no config.json); or use --model builtin")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, local_files_only=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="menos-estimate",
        description="Estimate a Menos server's memory (M, A+O, M_f, M_b) from a model's config, "
        "against vanilla split learning.",
    )
    p.add_argument("--model", default="builtin", help="local checkpoint directory with config.json, or 'builtin'")
    d = DEFAULT
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"each client's largest batch (default: {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"each client's longest sequence (default: {d.seq_len})")
    p.add_argument("--method", default="lora", choices=METHODS, help="the adapter method (default: lora)")
    p.add_argument("--lora-r", type=int, default=d.adapter.r, help=f"LoRA rank (default: {d.adapter.r})")
    p.add_argument("--num-virtual-tokens", type=int, default=PrefixSpec().num_virtual_tokens,
                   help=f"prefix tuning's virtual tokens (default: {PrefixSpec().num_virtual_tokens})")
    p.add_argument("--target-modules", default=",".join(d.adapter.target_modules),
                   help=f"comma-separated Linears the adapter targets (default: {','.join(d.adapter.target_modules)})")
    p.add_argument("--head-layers", type=int, default=d.head_layers,
                   help=f"blocks on the client before the server's (default: {d.head_layers})")
    p.add_argument("--tail-layers", type=int, default=d.tail_layers,
                   help=f"blocks on the client after the server's (default: {d.tail_layers})")
    p.add_argument("--clients", type=int, default=1, help="number of clients N (default: 1)")
    p.add_argument("--capacity", help="the server's whole memory, e.g. 80GiB: how many clients fit under each policy")
    p.add_argument("--dtype", default="float32", choices=tuple(ELEM_BYTES), help="dtype of the base weights")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


METHODS = ("lora", "dora", "rslora", "ia3", "prefix")


def _adapter(args: argparse.Namespace, targets: tuple[str, ...]):
    if args.method == "ia3":
        return IA3Spec()  # PEFT's default targets for the model type
    if args.method == "prefix":
        return PrefixSpec(num_virtual_tokens=args.num_virtual_tokens)
    return LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, target_modules=targets,
                    use_dora=args.method == "dora", use_rslora=args.method == "rslora")  # fmt: skip


def compute(args: argparse.Namespace) -> dict:
    config = load_config(args.model)
    if args.batch_size <= 0 or args.seq_len <= 0 or args.lora_r <= 0 or args.clients <= 0:
        raise ValueError("--batch-size, --seq-len, --lora-r and --clients must be positive")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and args.seq_len > max_pos:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    capacity = parse_size(args.capacity) if args.capacity else None
    est = estimate(config, args.head_layers, args.tail_layers, args.batch_size, args.seq_len,
                   ELEM_BYTES[args.dtype], _adapter(args, targets))  # fmt: skip
    n = args.clients
    start = args.head_layers
    return {
        "estimate": True,
        "note": NOTE,
        "model": "builtin" if args.model == "builtin" else os.path.abspath(args.model),
        "model_type": config.model_type,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "method": args.method,
        "lora_r": args.lora_r,
        "target_modules": list(targets),
        "head_layers": args.head_layers,
        "tail_layers": args.tail_layers,
        "server_layers": [start, start + est.server_blocks],
        "clients": n,
        "memory": {
            "M": est.weights,
            "M_server_blocks": est.server_weights,
            "A_plus_O": est.adapter,
            "M_f": est.m_f,
            "M_b": est.m_b,
        },
        "tokens": {"M_f": with_margin(est.m_f), "M_b": with_margin(est.m_b)},
        "totals": {"menos": est.menos(n), "preserve": est.preserve(n), "vanilla": est.vanilla(n)},
        "capacity": capacity,
        "clients_that_fit": est.clients_that_fit(capacity) if capacity is not None else None,
    }


def table(r: dict) -> str:
    m, t, n = r["memory"], r["totals"], r["clients"]
    s0, s1 = r["server_layers"]
    fs = format_size
    lines = [
        "menos-estimate: " + r["note"],
        "",
        (
            f"model {r['model']} ({r['model_type']}, {r['dtype']}); server blocks [{s0}, {s1}) = {s1 - s0} blocks "
            f"(head {r['head_layers']}, tail {r['tail_layers']})"
        ),
        f"LoRA r={r['lora_r']} on {','.join(r['target_modules'])}; batch {r['batch_size']} x seq {r['seq_len']}",
        "",
        f"  {'':6} {'what':48} {'bytes':>12}",
        f"  {'M':6} {'base weights, one copy shared by all clients':48} {fs(m['M']):>12}",
        f"  {'A+O':6} {'adapter + AdamW moments, per client':48} {fs(m['A_plus_O']):>12}",
        f"  {'M_f':6} {'no-grad forward peak, per client':48} {fs(m['M_f']):>12}",
        f"  {'M_b':6} {'re-forward + backward + step peak, per client':48} {fs(m['M_b']):>12}",
        f"  {'':6} (of M, the server's blocks: {fs(m['M_server_blocks'])})",
        "",
        f"for N = {n} client{'s' if n != 1 else ''}:",
        f"  {'Menos, on-demand':26} {'M + (A+O)*N + M_b':34} {fs(t['menos']):>12}",
        f"  {'Menos, preserve':26} {'M + (A+O+M_b)*N':34} {fs(t['preserve']):>12}",
        f"  {'vanilla split learning':26} {'(M_server_blocks + A+O + M_b)*N':34} {fs(t['vanilla']):>12}",
    ]
    if t["menos"] > 0:
        lines.append(f"  vanilla / Menos on-demand: {t['vanilla'] / t['menos']:.2f}x")
    if r["capacity"] is not None:
        fit = r["clients_that_fit"]
        lines += [
            "",
            f"clients that fit in {fs(r['capacity'])}:",
            f"  {'Menos, on-demand':26} {fit['menos']:>6}",
            f"  {'Menos, preserve':26} {fit['preserve']:>6}",
            f"  {'vanilla split learning':26} {fit['vanilla']:>6}",
        ]
    tok = r["tokens"]
    lines += [
        "",
        (
            f"scheduler tokens (estimate x {MARGIN} + {format_size(SLACK_BYTES)}, as the worker asks): "
            f"M_f {fs(tok['M_f'])}, M_b {fs(tok['M_b'])}; the manager's --memory-capacity must hold at least one M_b."
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = transformers_problem()
    if problem:
        parser.error(problem)
    try:
        result = compute(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
