"""How `menos-manager status` shows a Status: one JSON object, or a table for people."""

from __future__ import annotations

import msgspec

from menos.memory import format_size
from menos.messages import Status


def as_dict(st: Status) -> dict:
    """The status as one JSON-able object with keys model, memory, queue, clients."""
    return {
        "model": {"name": st.model, "type": st.model_type, "dtype": st.dtype, "device": st.device,
                  "bytes": st.shared_bytes},
        "memory": {"capacity": st.capacity, "shared": st.shared_bytes, "granted": st.granted,
                   "free": st.capacity - st.granted, "pss": st.pss},
        "queue": {"length": st.queued, "policy": st.policy},
        "clients": [msgspec.to_builtins(c) for c in st.clients],
    }  # fmt: skip


def table(st: Status) -> str:
    lines = [
        f"model   {st.model} ({st.model_type}, {st.dtype}, {st.device}), {format_size(st.shared_bytes)} shared",
        f"memory  capacity {format_size(st.capacity)}, granted {format_size(st.granted)}, "
        f"free {format_size(st.capacity - st.granted)}; policy {st.policy}; queue {st.queued}",
        f"PSS     total {format_size(sum(st.pss.values()))} over {len(st.pss)} processes",
        "",
    ]
    head = (f"{'session':<17}{'identity':<14}{'cut h/server/t':<16}{'LoRA':<14}{'A+O':>10}{'M_f':>11}{'M_b':>11}"
            f"{'steps':>7}  {'state':<10}{'queue ms':>9}{'compute ms':>11}")  # fmt: skip
    lines.append(head)
    for c in st.clients:
        cut = f"{c.head_layers}/{c.server_layers[0]}..{c.server_layers[1] - 1}/{c.tail_layers}"
        lora = f"r{c.adapter.r} {'+'.join(m.removesuffix('_proj') for m in c.adapter.target_modules)}"
        ident = (c.identity[:11] + "...") if len(c.identity) > 13 else c.identity or "-"
        lines.append(
            f"{c.session:<17}{ident:<14}{cut:<16}{lora:<14}{format_size(c.persistent_bytes):>10}"
            f"{format_size(c.m_f):>11}{format_size(c.m_b):>11}{c.steps:>7}  {c.state:<10}"
            f"{c.mean_queue_s * 1e3:>9.1f}{c.mean_compute_s * 1e3:>11.1f}"
        )
    if not st.clients:
        lines.append("(no clients)")
    return "\n".join(lines)
