"""The manager's status: assembled from its sessions and scheduler, shown by
`menos-manager status` as one JSON object or a table for people."""

from __future__ import annotations

import os
from typing import Iterable

import msgspec
import psutil

from manager.sessions import Session
from menos.adapter_spec import describe
from menos.chain import blocks_text
from menos.messages import ClientStatus, Policy, Status
from menos.sizes import format_size


def read_pss(pids: dict[str, int]) -> dict[str, int]:
    """label -> proportional set size of each process (0 if it is gone): shared pages counted once."""
    out = {}
    for label, pid in pids.items():
        try:
            out[label] = psutil.Process(pid).memory_full_info().pss
        except (psutil.Error, AttributeError):
            out[label] = 0
    return out


def client_status(s: Session) -> ClientStatus:
    n = max(s.requests, 1)
    return ClientStatus(
        session=s.sid, pid=s.proc.pid if s.proc else 0, identity=s.identity, head_layers=s.cut.head, tail_layers=s.cut.tail,
        server_layers=s.cut.server_layers, adapter=s.hello.adapter, compression=s.hello.compression,
        persistent_bytes=s.persistent_bytes,
        m_f=s.m_f, m_b=s.m_b, standing_bytes=s.standing_bytes, cache_bytes=s.cache[1] if s.cache else 0, steps=s.steps, state=s.state, requests=s.requests, mean_queue_s=s.queue_s / n,
        mean_compute_s=s.compute_s / n, reclaims=s.reclaims, oom_retries=s.oom_retries,
    )  # fmt: skip


def build_status(*, model: str, model_type: str, dtype: str, device: str, shared_bytes: int, capacity: int,
                 granted: int, queued: int, standing: int, policy: Policy, sessions: Iterable[Session],
                 pss: dict[str, int], quantization: str = "none", max_workers: int = 0, layers: int = 0,
                 blocks: tuple[int, int] = (0, 0), base_digest: str = "") -> Status:  # fmt: skip
    sessions = list(sessions)
    return Status(model=model, model_type=model_type, dtype=dtype, device=device, shared_bytes=shared_bytes,
                  capacity=capacity, granted=granted, queued=queued, standing=standing, policy=policy,
                  clients=tuple(client_status(s) for s in sessions), pss=pss, quantization=quantization,
                  live_workers=sum(s.proc is not None for s in sessions), max_workers=max_workers,
                  layers=layers, blocks=blocks, base_digest=base_digest)  # fmt: skip


def status_of(mgr) -> Status:
    """A running manager's (``manager.server.Manager``) status, its processes' PSS included."""
    pids = {"manager": os.getpid()}
    if mgr.spawner is not None and mgr.spawner.launcher is not None:
        pids["launcher"] = mgr.spawner.launcher.pid  # the workers' shared library pages
    pids.update({f"worker {s.sid}": s.proc.pid for s in mgr.sessions.values() if s.proc is not None})
    return build_status(
        model=mgr.model_name, model_type=mgr.config.model_type, dtype=mgr.cfg.dtype, device=str(mgr.device),
        shared_bytes=mgr.shared.size, capacity=mgr.capacity, granted=mgr.scheduler.used,
        queued=len(mgr.scheduler.waiting), standing=mgr.scheduler.standing_total, policy=mgr.policy,
        sessions=mgr.sessions.values(), pss=read_pss(pids), quantization=mgr.cfg.quantization,
        max_workers=mgr.cfg.max_workers, layers=mgr.config.num_hidden_layers, blocks=mgr.base.served,
        base_digest=mgr.base.digest,
    )  # fmt: skip


def as_dict(st: Status) -> dict:
    """The status as one JSON-able object with keys model, memory, queue, clients."""
    return {
        "model": {"name": st.model, "type": st.model_type, "dtype": st.dtype, "device": st.device,
                  "bytes": st.shared_bytes, "quantization": st.quantization, "layers": st.layers,
                  "blocks": list(st.blocks), "digest": st.base_digest},
        "memory": {"capacity": st.capacity, "shared": st.shared_bytes, "granted": st.granted,
                   "standing": st.standing, "free": st.capacity - st.standing - st.granted, "pss": st.pss},
        "queue": {"length": st.queued, "policy": st.policy.value},
        "workers": {"live": st.live_workers, "max": st.max_workers,
                    "parked": sum(c.state.value == "parked" for c in st.clients)},
        "clients": [msgspec.to_builtins(c) for c in st.clients],
    }  # fmt: skip


def table(st: Status) -> str:
    weights = (f"{format_size(st.shared_bytes)} in a file, one private copy per worker (vanilla baseline)"
               if st.policy is Policy.VANILLA else f"{format_size(st.shared_bytes)} shared")  # fmt: skip
    dtype = st.dtype if st.quantization == "none" else f"{st.quantization} blocks, {st.dtype} compute"
    lines = [
        f"model   {st.model} ({st.model_type}, {dtype}, {st.device}), {weights}",
        f"blocks  {blocks_text(st.blocks)} of {st.layers} (the server's range: at most these)",
        f"memory  capacity {format_size(st.capacity)}, standing {format_size(st.standing)}, granted "
        f"{format_size(st.granted)}, free {format_size(st.capacity - st.standing - st.granted)}; "
        f"policy {st.policy.value}; queue {st.queued}",
        f"PSS     total {format_size(sum(st.pss.values()))} over {len(st.pss)} processes",
        f"workers {st.live_workers} live" + (f" of at most {st.max_workers}" if st.max_workers else "")
        + f", {sum(c.state.value == 'parked' for c in st.clients)} sessions parked",
        "",
    ]
    head = (f"{'session':<17}{'identity':<14}{'cut h/server/t':<16}{'adapter / codec':<24}{'A+O':>10}{'M_f':>11}{'M_b':>11}"
            f"{'steps':>7}  {'state':<11}{'queue ms':>9}{'compute ms':>11}")  # fmt: skip
    lines.append(head)
    for c in st.clients:
        cut = f"{c.head_layers}/{c.server_layers[0]}..{c.server_layers[1] - 1}/{c.tail_layers}"
        adapter = describe(c.adapter) + ("" if c.compression.value == "none" else f" /{c.compression.value}")
        ident = (c.identity[:11] + "...") if len(c.identity) > 13 else c.identity or "-"
        lines.append(
            f"{c.session:<17}{ident:<14}{cut:<16}{adapter:<24}{format_size(c.persistent_bytes):>10}"
            f"{format_size(c.m_f):>11}{format_size(c.m_b):>11}{c.steps:>7}  {c.state.value:<11}"
            f"{c.mean_queue_s * 1e3:>9.1f}{c.mean_compute_s * 1e3:>11.1f}"
            + (f"  cache token {format_size(c.cache_bytes)}" if c.cache_bytes else "")
        )
    if not st.clients:
        lines.append("(no clients)")
    return "\n".join(lines)
