"""Training state on disk: adapter weights, optimizer state, step counter.

One file per checkpoint, safetensors (tensors) with the scalars as JSON metadata, so
nothing is ever unpickled. Writes are atomic (temp file + fsync + rename), and the
last two checkpoints are kept: the server and the client checkpoint the same step
one after the other, so if a crash falls between the two, the older one still
matches the client's.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

KEEP = 2


def _state_tensors(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None, grads):
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in params.items()}
    tensors.update({f"grad/{n}": g.detach().contiguous() for n, g in (grads or {}).items()})
    meta = {"param_groups": [], "state_keys": {}}
    if optimizer is not None:
        sd = optimizer.state_dict()
        meta["param_groups"] = sd["param_groups"]
        for idx, state in sd["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    tensors[f"opt/{idx}/{k}"] = v.detach().contiguous()
                else:
                    meta["state_keys"][f"{idx}/{k}"] = v
    return tensors, meta


def save(directory: str, step: int, params: dict[str, torch.Tensor], optimizer, grads=None) -> str:
    """Write checkpoint ``step`` into ``directory`` atomically; prune all but the last KEEP.
    ``grads``: gradients accumulated towards an unfinished optimizer step, by name."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tensors, meta = _state_tensors(params, optimizer, grads)
    meta["step"] = step
    path = os.path.join(directory, f"step-{step:08d}.safetensors")
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"menos": json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in steps(directory)[:-KEEP]:
        os.unlink(os.path.join(directory, f"step-{old:08d}.safetensors"))
    return path


def steps(directory: str) -> list[int]:
    """Steps with a complete checkpoint in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = (re.fullmatch(r"step-(\d+)\.safetensors", f) for f in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def load(directory: str, step: int, params: dict[str, torch.Tensor], optimizer) -> int:
    """Restore ``params`` (and their accumulated gradients, if saved) and ``optimizer`` from
    checkpoint ``step``; returns the step saved."""
    path = os.path.join(directory, f"step-{step:08d}.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["menos"])
    tensors = load_file(path)
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint {path} does not match this adapter (missing {missing[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            src = tensors[f"param/{n}"]
            if src.shape != p.shape:
                raise ValueError(f"checkpoint {path}: {n} has shape {tuple(src.shape)}, adapter {tuple(p.shape)}")
            p.copy_(src)
            grad = tensors.get(f"grad/{n}")
            p.grad = None if grad is None else grad.to(device=p.device, dtype=p.dtype)
    if optimizer is not None:
        state: dict = {}
        for key, v in tensors.items():
            if key.startswith("opt/"):
                _, idx, k = key.split("/", 2)
                state.setdefault(int(idx), {})[k] = v
        for key, v in meta["state_keys"].items():
            idx, k = key.split("/", 1)
            state.setdefault(int(idx), {})[k] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"]
