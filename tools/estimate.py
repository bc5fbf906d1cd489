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
    (lora_r: null for a method without a rank; target_modules: the Linears the method targets,
    [] for prefix tuning)
    memory: {M, M_server_blocks, A_plus_O, M_f, M_b}              bytes; A_plus_O, M_f, M_b per client
    tokens: {M_f, M_b}                                             scheduler tokens: with the profile's margin
    totals: {menos, preserve, vanilla}                             bytes for `clients` clients
    capacity (bytes or null), clients_that_fit: {menos, preserve, vanilla} (or null)
    parking (with a capacity, else null): {max_workers, worker_bytes, parked_bytes, live_workers_that_fit,
             sessions_that_fit (-1: parked sessions do not touch this capacity)}
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tools.cli_args import OneLineParser, raw_config

from menos.client_config import ClientConfig
from menos.arch import arch_of, spec_for
from menos.estimator import (ELEM_BYTES, MARGIN, PARKED_RECORD_BYTES, SLACK_BYTES, WORKER_PROCESS_BYTES, estimate,
                             with_margin)  # fmt: skip
from menos.quantization import CHOICES as QUANTIZATIONS
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
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, local_files_only=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
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
    p.add_argument("--max-workers", type=int, default=4,
                   help="with --capacity: sessions that fit when at most this many workers are live and the rest "
                        "park (the manager's --max-workers; default: 4)")
    p.add_argument("--worker-bytes", default=format_size(WORKER_PROCESS_BYTES).replace(" ", ""),
                   help="memory of one live worker's process besides its A+O (default: as measured on CPU; on a "
                        "GPU, its CUDA context, e.g. 500MiB)")
    p.add_argument("--parked-bytes", default=None,
                   help="memory of one parked session (default: its A+O park file plus the manager's record, as "
                        "measured on CPU; 0: the capacity is a GPU's, which a parked session does not touch)")
    p.add_argument("--dtype", default="float32", choices=tuple(ELEM_BYTES), help="dtype of the base weights")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="the server's block Linears stored quantized, as menos-manager start --quantization (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


METHODS = ("lora", "dora", "rslora", "ia3", "prefix")
LORA_METHODS = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA"}  # the methods with a rank, as the table names them


def _adapter(args: argparse.Namespace, targets: tuple[str, ...]):
    if args.method == "ia3":
        return IA3Spec()  # PEFT's default targets for the model type
    if args.method == "prefix":
        return PrefixSpec(num_virtual_tokens=args.num_virtual_tokens)
    return LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, target_modules=targets,
                    use_dora=args.method == "dora", use_rslora=args.method == "rslora")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag, for a mistake the estimate could only fail on later."""
    for flag in ("batch_size", "seq_len", "lora_r", "num_virtual_tokens", "clients"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    for flag in ("head_layers", "tail_layers"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be 0 or more")
    if args.method in LORA_METHODS and not _targets(args):
        raise ValueError("--target-modules is empty: name the Linears to adapt, e.g. q_proj,v_proj")
    for flag in ("capacity", "worker_bytes", "parked_bytes"):
        if getattr(args, flag):
            try:
                parse_size(getattr(args, flag))
            except ValueError as exc:
                raise ValueError(f"--{flag.replace('_', '-')}: {exc}") from None
    if args.max_workers <= 0:
        raise ValueError(f"--max-workers {args.max_workers}: must be positive")
    raw = raw_config(args.model)
    _check_positions(args, raw.get("max_position_embeddings"))
    layers = raw.get("num_hidden_layers")
    if isinstance(layers, int) and args.head_layers + args.tail_layers >= layers:
        raise ValueError(f"--head-layers {args.head_layers} + --tail-layers {args.tail_layers} leave no block of the "
                         f"model's {layers} for the server: keep their sum under {layers}")  # fmt: skip


def _check_positions(args: argparse.Namespace, max_pos) -> None:
    """Prefix tuning's virtual tokens take positions before the real ones (as the client library counts)."""
    if not isinstance(max_pos, int):
        return
    if args.method == "prefix" and args.seq_len + args.num_virtual_tokens > max_pos:
        raise ValueError(f"--seq-len {args.seq_len} + --num-virtual-tokens {args.num_virtual_tokens} = "
                         f"{args.seq_len + args.num_virtual_tokens} positions exceed the model's "
                         f"max_position_embeddings ({max_pos}): lower one of them")  # fmt: skip
    if args.seq_len > max_pos:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings ({max_pos}): lower it")


def _targets(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(t.strip() for t in args.target_modules.split(",") if t.strip())


def compute(args: argparse.Namespace) -> dict:
    check_args(args)
    config = load_config(args.model)
    targets = _targets(args)
    capacity = parse_size(args.capacity) if args.capacity else None
    spec = _adapter(args, targets)
    est = estimate(config, args.head_layers, args.tail_layers, args.batch_size, args.seq_len,
                   ELEM_BYTES[args.dtype], spec, args.quantization)  # fmt: skip
    spec = spec_for(arch_of(config), spec)  # IA3's targets: PEFT's defaults for the model type
    n = args.clients
    start = args.head_layers
    return {
        "estimate": True,
        "note": NOTE,
        "model": "builtin" if args.model == "builtin" else os.path.abspath(args.model),
        "model_type": config.model_type,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "method": args.method,
        "lora_r": args.lora_r if args.method in LORA_METHODS else None,
        "target_modules": [] if args.method == "prefix" else list(spec.target_modules),
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
        "parking": None if capacity is None else _parking(est, capacity, args),
    }


def _parking(est, capacity: int, args: argparse.Namespace) -> dict:
    """With parking: the live workers that fit, and the sessions with at most --max-workers live."""
    worker = parse_size(args.worker_bytes)
    parked = est.adapter + PARKED_RECORD_BYTES if args.parked_bytes is None else parse_size(args.parked_bytes)
    return {"max_workers": args.max_workers, "worker_bytes": worker, "parked_bytes": parked,
            "live_workers_that_fit": est.live_workers_that_fit(capacity, worker),
            "sessions_that_fit": est.sessions_that_fit(capacity, args.max_workers, worker, parked)}  # fmt: skip


def adapter_line(r: dict, num_virtual_tokens: int) -> str:
    """The table's words for the method estimated."""
    if r["method"] in LORA_METHODS:
        return f"{LORA_METHODS[r['method']]} r={r['lora_r']} on {','.join(r['target_modules'])}"
    if r["method"] == "ia3":
        return f"IA3 on {','.join(r['target_modules'])} (PEFT's defaults for {r['model_type']})"
    return f"prefix tuning, {num_virtual_tokens} virtual tokens"


def table(r: dict, adapter: str) -> str:
    m, t, n = r["memory"], r["totals"], r["clients"]
    s0, s1 = r["server_layers"]
    fs = format_size
    lines = [
        "menos-estimate: " + r["note"],
        "",
        (
            f"model {r['model']} ({r['model_type']}, {r['dtype']}"
            f"{'' if r['quantization'] == 'none' else ', ' + r['quantization'] + ' blocks'}); server blocks [{s0}, {s1}) = {s1 - s0} blocks "
            f"(head {r['head_layers']}, tail {r['tail_layers']})"
        ),
        f"{adapter}; batch {r['batch_size']} x seq {r['seq_len']}",
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
        pk = r["parking"]
        sessions = "any number (a parked session holds none of it)" if pk["sessions_that_fit"] < 0 else \
            f"{pk['sessions_that_fit']}"
        lines += [
            "",
            f"with parking (menos-manager --max-workers {pk['max_workers']}; a live worker {fs(pk['worker_bytes'])} "
            f"besides its A+O, a parked session {fs(pk['parked_bytes'])}):",
            f"  {'live workers that fit':26} {pk['live_workers_that_fit']:>6}",
            f"  {'sessions that fit':26} {sessions:>6}",
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
    try:
        check_args(args)  # before transformers' import (seconds): a mistake is answered at once
    except ValueError as exc:
        parser.error(str(exc))
    problem = transformers_problem()
    if problem:
        parser.error(problem)
    try:
        result = compute(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(json.dumps(result) if args.json else table(result, adapter_line(result, args.num_virtual_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
