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
    return _commit(directory, step, lambda tmp: save_file(tensors, tmp, metadata={"menos": json.dumps(meta)}))


def _path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:08d}.safetensors")


def _commit(directory: str, step: int, write) -> str:
    """``write(tmp)`` then fsync and rename into place; prune all but the last KEEP."""
    path = _path(directory, step)
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in steps(directory)[:-KEEP]:
        os.unlink(_path(directory, old))
    return path


def read_bytes(directory: str, step: int) -> bytes:
    """Checkpoint ``step`` as it is on disk, to hand to another machine (``write_bytes``)."""
    with open(_path(directory, step), "rb") as f:
        return f.read()


def write_bytes(directory: str, step: int, data: bytes) -> str:
    """Store a checkpoint file received from elsewhere, once it parses as one of step
    ``step`` (safetensors with our metadata; nothing is unpickled); ValueError otherwise.
    Its tensors are checked against the adapter when it is loaded."""
    from safetensors.torch import load as parse

    try:
        meta = json.loads(_metadata(data)["menos"])
        parse(bytes(data))
        ok = meta.get("step") == step
    except Exception as exc:  # noqa: BLE001  any parse failure: not a checkpoint
        raise ValueError(f"not a Menos checkpoint file ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise ValueError(f"the checkpoint file is of step {meta.get('step')}, not {step}")
    os.makedirs(directory, mode=0o700, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return _commit(directory, step, write)


def _metadata(data: bytes) -> dict:
    """A safetensors file's __metadata__ (an 8-byte length, then a JSON header)."""
    n = int.from_bytes(bytes(data[:8]), "little")
    if not 0 < n <= len(data) - 8:
        raise ValueError("truncated header")
    return json.loads(bytes(data[8:8 + n]))["__metadata__"]


def steps(directory: str) -> list[int]:
    """Steps with a complete checkpoint in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = (re.fullmatch(r"step-(\d+)\.safetensors", f) for f in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def load(directory: str, step: int, params: dict[str, torch.Tensor], optimizer) -> int:
    """Restore ``params`` (and their accumulated gradients, if saved) and ``optimizer`` from
    checkpoint ``step``; returns the step saved."""
    path = _path(directory, step)
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
