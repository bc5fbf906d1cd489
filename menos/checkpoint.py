"""Training state on disk: adapter weights, optimizer state, step counter.

One file per checkpoint, safetensors (tensors) with the scalars as JSON metadata, so
nothing is ever unpickled. Writes are atomic (temp file + fsync + rename), and the
last two checkpoints are kept: the server and the client checkpoint the same step
one after the other, so if a crash falls between the two, the older one still
matches the client's. Each records its layout (the cut and the adapter it was trained
as): a resume that asks another is refused in one line naming both, before anything
is loaded (and, on the client, before it connects).
"""

from __future__ import annotations

import json
import os
import re

import msgspec
import torch
from safetensors.torch import load_file, save_file

from menos.adapter_spec import describe, same_tensors
from menos.messages import AdapterSpec

KEEP = 2
FIX = "connect with the saved {what}, or start without resume=True"


class Mismatch(ValueError):
    """A checkpoint saved with another cut or adapter than the session that resumes from it."""


def layout(head_layers: int, tail_layers: int, adapter: AdapterSpec) -> dict:
    """What a checkpoint is trained as, kept in its metadata: a resume must ask the same."""
    return {"head_layers": head_layers, "tail_layers": tail_layers, "adapter": msgspec.to_builtins(adapter)}


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


def save(directory: str, step: int, params: dict[str, torch.Tensor], optimizer, grads=None,
         trained_as: dict | None = None) -> str:  # fmt: skip
    """Write checkpoint ``step`` into ``directory`` atomically; prune all but the last KEEP.
    ``grads``: gradients accumulated towards an unfinished optimizer step, by name;
    ``trained_as``: its ``layout``."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tensors, meta = _state_tensors(params, optimizer, grads)
    meta["step"] = step
    if trained_as is not None:
        meta["layout"] = trained_as
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


def remove(directory: str, step: int) -> None:
    """Delete checkpoint ``step`` (nothing to do if it is gone)."""
    try:
        os.unlink(_path(directory, step))
    except FileNotFoundError:
        pass


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


def resume_steps(directory: str | None, asked: dict) -> tuple[int, ...]:
    """The steps a client offers for resume=True: refused when there is none, or when the
    latest (the one the resume takes) was saved with another layout than ``asked``."""
    found = steps(directory) if directory else []
    if not found:
        raise ValueError(f"resume=True needs a state_dir holding a checkpoint (got {directory!r})")
    path = _path(directory, found[-1])
    try:
        meta = _file_metadata(path)
    except Exception as exc:  # noqa: BLE001  any parse failure: not a checkpoint
        raise ValueError(f"resume=True: {path} is not a readable checkpoint ({exc})") from None
    check_layout(meta.get("layout"), asked, f"the checkpoint of step {found[-1]} in {directory!r}")
    return tuple(found)


def check_layout(saved: dict | None, asked: dict, where: str) -> None:
    """Mismatch, naming the saved cut and adapter against the asked ones, when a checkpoint
    ``where`` saved as ``saved`` (None: before checkpoints recorded it) cannot resume as ``asked``."""
    if not saved:
        return
    specs = [msgspec.convert(d["adapter"], AdapterSpec) for d in (saved, asked)]
    cuts = [f"head_layers={d['head_layers']}, tail_layers={d['tail_layers']}" for d in (saved, asked)]
    named = [describe(s) for s in specs] if describe(specs[0]) != describe(specs[1]) else [repr(s) for s in specs]
    said: list[list[str]] = [[], []]
    what = []
    if cuts[0] != cuts[1]:
        what.append("cut")
        said = [[c] for c in cuts]
    if not same_tensors(*specs):
        what.append("adapter")
        said = [s + [f"adapter {n}"] for s, n in zip(said, named)]
    if what:
        raise Mismatch(f"resume=True: {where} was saved with {', '.join(said[0])}; this connect asks "
                       f"{', '.join(said[1])}: {FIX.format(what=' and '.join(what))}")  # fmt: skip


def _file_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["menos"])


def load(directory: str, step: int, params: dict[str, torch.Tensor], optimizer, asked: dict | None = None,
         where: str | None = None) -> int:  # fmt: skip
    """Restore ``params`` (and their accumulated gradients, if saved) and ``optimizer`` from
    checkpoint ``step``; returns the step saved. Mismatch, before anything is restored, when
    it was saved with another layout than ``asked`` or holds other tensors than ``params``."""
    path = _path(directory, step)
    where = where or f"the checkpoint of step {step} in {directory!r}"
    meta = _file_metadata(path)
    if asked is not None:
        check_layout(meta.get("layout"), asked, where)
    tensors = load_file(path)
    _check_tensors(tensors, params, where)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
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


def _check_tensors(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor], where: str) -> None:
    """The checkpoint holds exactly ``params``' tensors, of their shapes (else the optimizer's
    state would be loaded into the wrong parameters)."""
    saved = {k.removeprefix("param/"): t for k, t in tensors.items() if k.startswith("param/")}
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    wrong = [f"{n} is {tuple(saved[n].shape)} there, {tuple(p.shape)} here" for n, p in params.items()
             if n in saved and saved[n].shape != p.shape]  # fmt: skip
    found = [f"missing {missing[:2]}"] * bool(missing) + [f"unexpected {extra[:2]}"] * bool(extra) + wrong[:1]
    if found:
        raise Mismatch(f"resume=True: {where} holds another adapter than this session's ({'; '.join(found)}): it was "
                       "saved with another cut (head_layers, tail_layers) or adapter; "
                       + FIX.format(what="cut and adapter"))  # fmt: skip
