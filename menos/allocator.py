"""The CUDA allocator settings weight sharing depends on, owned by the manager.

CUDA IPC shares one cudaMalloc block per handle. Two allocator settings break that:
``backend:cudaMallocAsync`` (its pools are not shareable this way) and
``expandable_segments:True`` (torch shares those through ``pidfd_getfd``, which fails in
containers without ptrace permission, pytorch#165685, and a 2026 regression gives one
segment different handles, pytorch#198305). The manager sets PYTORCH_CUDA_ALLOC_CONF
before CUDA starts, for itself and every worker it spawns, and refuses a configuration
that asks for either. No torch import here: it must run before torch touches CUDA.
"""

from __future__ import annotations

ENV = "PYTORCH_CUDA_ALLOC_CONF"
_REFUSED = {"backend": "cudamallocasync", "expandable_segments": "true"}


def shareable(conf: str | None) -> str:
    """``conf`` with ``expandable_segments:False`` made explicit; ValueError for a setting
    that cannot share memory across processes."""
    parts = [p.strip() for p in (conf or "").split(",") if p.strip()]
    keys = {}
    for p in parts:
        key, _, value = p.partition(":")
        keys[key.strip()] = value.strip()
        if _REFUSED.get(key.strip()) == value.strip().lower():
            raise ValueError(f"{ENV}={conf!r}: {p} cannot share CUDA memory between processes "
                             "(Menos shares the base weights through CUDA IPC); remove it")  # fmt: skip
    if "expandable_segments" not in keys:
        parts.append("expandable_segments:False")
    return ",".join(parts)
