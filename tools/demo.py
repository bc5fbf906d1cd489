"""menos-demo: a manager and three concurrent clients on the built-in model and data.

Each client fine-tunes its own adapter, with its own method (LoRA, DoRA, prefix tuning)
and recipe, on its own private text (menos.data), with its own cut point, in its own
process; the manager holds one copy of the base weights. Ends with a summary table: per client steps, first/last loss and seconds
per iteration, and the server's memory (shared base weights vs per-client memory).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import tempfile

from menos.adapter_spec import position_offset
from menos.messages import LoraSpec, PrefixSpec  # light: no torch
from menos.quantization import CHOICES as QUANTIZATIONS
from tools.cli_args import OneLineParser
from tools.cli_args import BUILTIN_SHAPE
from tools.harness import ManagerExited, ManagerProcess, run_clients

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
CLIENTS = (  # (head_layers, tail_layers, adapter, recipe): different cuts, methods and recipes
    (1, 0, LoraSpec(r=8, alpha=16, target_modules=QKVO), dict(lr=3e-3)),
    (2, 1, LoraSpec(r=4, alpha=8, target_modules=QKVO, use_dora=True),
     dict(lr=3e-3, weight_decay=0.01, lr_schedule="cosine", warmup_steps=3, max_grad_norm=1.0, grad_accum_steps=2)),
    (1, 1, PrefixSpec(num_virtual_tokens=16), dict(lr=1e-2, lr_schedule="linear", warmup_steps=2)),
)  # fmt: skip


def _recipe(recipe: dict, steps: int) -> dict:
    """A client's recipe for a run of ``steps`` micro-batches (a schedule decays over all of them)."""
    if recipe.get("lr_schedule", "constant") != "constant":
        recipe = dict(recipe, total_steps=steps // recipe.get("grad_accum_steps", 1))
    return recipe


def client_spec(index: int, quantization: str):
    """Client ``index``'s adapter; on a base where PEFT cannot put it (DoRA on int8), rsLoRA."""
    import msgspec

    from menos.quantization import Quantization, adapter_problem

    spec = CLIENTS[index][2]
    if adapter_problem(Quantization.parse(quantization), spec):
        return msgspec.structs.replace(spec, use_dora=False, use_rslora=True)
    return spec


def run_client(endpoint: str, index: int, steps: int, batch: int, seq: int, quantization: str, barrier) -> dict:
    import msgspec
    import torch

    import menos
    from menos.adapter_spec import describe
    from menos.data import BUILTIN_TEXTS, byte_batches

    torch.set_num_threads(1)
    head, tail, _, recipe = CLIENTS[index]
    spec = client_spec(index, quantization)
    batches = byte_batches(BUILTIN_TEXTS[index], batch, seq, seed=index)
    recipe = _recipe(recipe, steps)
    with menos.connect(endpoint, head_layers=head, tail_layers=tail, adapter=spec, batch_size=batch,
                       seq_len=seq, seed=index, **recipe) as client:  # fmt: skip
        barrier.wait()  # train at the same time: all workers are up
        losses = []
        for step in range(steps):
            losses.append(client.train_step(next(batches)))
            if step % 10 == 0 or step == steps - 1:
                print(f"  client {index}: step {step + 1:3d}/{steps} loss {losses[-1]:.3f}", flush=True)
        barrier.wait()  # everyone done; the first one reads the server's memory
        status = menos.status(endpoint) if index == 0 else None
        barrier.wait()
        said = None
        if index == 0:  # what the fine-tuned split model now says (the base stays on the server)
            prompt = BUILTIN_TEXTS[0][: min(24, seq)]  # a prompt is at most seq_len tokens
            out = client.generate([list(prompt.encode())], max_new_tokens=32, eos_token_id=[], do_sample=True,
                                  top_k=20, seed=0)  # greedy says only spaces after 30 steps on bytes
            said = (prompt, bytes(out[0, len(prompt.encode()):].tolist()).decode("utf-8", "replace"))
        return {
            "index": index, "head": head, "tail": tail, "adapter": describe(client.adapter),
            "server_layers": client.server_layers,
            "steps": steps, "first": losses[0], "last": losses[-1], **client.times.summary(),
            "status": msgspec.to_builtins(status) if status else None, "said": said,
        }  # fmt: skip


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary(results: list[dict]) -> str:
    lines = [
        "",
        "client  cut (head/server/tail)  adapter         steps  first loss  last loss  s/iter  server compute  queue   comm",
    ]
    for r in results:
        s0, s1 = r["server_layers"]
        cut = f"{r['head']} / {s0}..{s1 - 1} / {r['tail']}"
        lines.append(
            f"{r['index']:>6}  {cut:<21}  {r['adapter']:<15} {r['steps']:>5} {r['first']:>11.3f} {r['last']:>10.3f}"
            f" {r['s_per_step']:>7.3f} {r['server_compute_s']:>15.3f} {r['server_queue_s']:>6.3f} {r['communication_s']:>6.3f}"
        )
    st = next(r["status"] for r in results if r["status"])
    worker_pss = [v for k, v in st["pss"].items() if k.startswith("worker")]
    stored = "" if st.get("quantization", "none") == "none" else f" (the blocks' Linears in {st['quantization']})"
    lines += [
        "",
        f"server memory ({st['model']}, {st['dtype']}, {st['device']}):",
        f"  shared base weights, one copy for all clients{stored}: {_mb(st['shared_bytes'])}",
    ]
    for c in st["clients"]:
        lines.append(
            f"  client session {c['session'][:8]}: adapter + optimizer {_mb(c['persistent_bytes'])}, "
            f"profiled tokens M_f {_mb(c['m_f'])} / M_b {_mb(c['m_b'])} (granted only while computing)"
        )
    lines += [
        f"  processes (PSS): manager {_mb(st['pss']['manager'])}, launcher {_mb(st['pss'].get('launcher', 0))}, "
        + "workers " + ", ".join(_mb(p) for p in worker_pss)
        + f"; total {_mb(sum(st['pss'].values()))}",
        f"  vanilla split learning would hold {len(worker_pss)} copies of the server's blocks instead of 1",
    ]
    said = next((r["said"] for r in results if r.get("said")), None)
    if said:
        lines += ["", f"client 0 generates through the split (32 bytes, sampled, seed 0): {said[0]!r} -> {said[1]!r}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = OneLineParser(prog="menos-demo", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--device", default="cpu", help="where the manager keeps the base weights: cpu, cuda, cuda:N")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="the manager's --quantization: one quantized copy of the server's blocks (QLoRA; menos[qlora])")
    args = p.parse_args(argv)
    problem = check_args(args)  # before anything starts: no manager, no client, nothing to clean up
    if problem:
        p.error(problem)
    with tempfile.TemporaryDirectory(prefix="menos-demo-") as state_dir:
        flags = ["--device", args.device] + (["--quantization", args.quantization] if args.quantization != "none" else [])
        print(f"$ menos-manager start --listen tcp://127.0.0.1:* {' '.join(flags)} (built-in model)", flush=True)
        try:
            with ManagerProcess(state_dir, *flags) as manager:
                print(f"manager up at {manager.endpoint}; starting {len(CLIENTS)} clients", flush=True)
                try:
                    results = run_clients(run_client, [(manager.endpoint, i, args.steps, args.batch_size, args.seq_len,
                                                        args.quantization)
                                                       for i in range(len(CLIENTS))])  # fmt: skip
                except Exception as exc:  # a client's own message, not pages of RemoteTraceback
                    print(f"menos-demo: a client failed: {exc}", file=sys.stderr)
                    return 1
        except ManagerExited as exc:  # the manager's own line on stderr says why
            return exc.returncode or 1
    print(summary(results))
    return 0


def check_args(args: argparse.Namespace) -> str | None:
    """The first argument the demo could only fail on later (in its clients), as one line."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        return f"--device {args.device!r}: use cpu, cuda or cuda:N"
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size}: must be at least 1"
    virtual = max(position_offset(spec) for _, _, spec, _ in CLIENTS)  # prefix tuning's tokens take positions too
    longest = BUILTIN_SHAPE["max_position_embeddings"] - virtual
    if not 2 <= args.seq_len <= longest:
        return (f"--seq-len {args.seq_len}: the built-in model takes 2 to {longest} here "
                f"({BUILTIN_SHAPE['max_position_embeddings']} positions, {virtual} of them a client's prefix)")  # fmt: skip
    problem = _schedule_problem(args.steps)
    if problem:
        least = next(s for s in itertools.count(1) if _schedule_problem(s) is None)
        return f"--steps {args.steps}: {problem if args.steps > 0 else 'too few'}; use --steps {least} or more"
    return None


def _schedule_problem(steps: int) -> str | None:
    """Why a run of ``steps`` is too short for some client's schedule, or None."""
    from menos.client_config import ClientConfig

    for _, _, spec, recipe in CLIENTS:
        try:
            ClientConfig(adapter=spec, **_recipe(recipe, steps))
        except ValueError as exc:
            return str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
