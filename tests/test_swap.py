"""The vanilla baseline's task swap: weights leave memory and come back unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from menos.sharing import AttachedWeights
from menos.weight_files import FileWeights
from worker.swap import FileSwap, HostSwap, task_swap


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(64, 32, generator=g), "b.weight": torch.randn(16, generator=g).to(torch.bfloat16)}


def test_file_swap_frees_and_restores_private_copies(tmp_path):
    state = _weights()
    owner = FileWeights(state, str(tmp_path / "base.weights"))
    attached = AttachedWeights(owner.handle)
    params = {n: nn.Parameter(attached.tensors[n], requires_grad=False) for n in state}
    assert all(not attached.owns(p) for p in params.values())  # private copies, nothing mapped
    swap = task_swap(params, attached.tensors, torch.device("cpu"))
    assert isinstance(swap, FileSwap) and swap.nbytes == 64 * 32 * 4 + 16 * 2
    ids = {n: id(p) for n, p in params.items()}
    swap.swap_out()
    assert not swap.resident and all(p.numel() == 0 for p in params.values())
    swap.swap_in()
    assert swap.resident and swap.swaps == 1
    for n, p in params.items():
        assert id(p) == ids[n]  # the module's parameters themselves: no re-wiring needed
        assert p.dtype == state[n].dtype and torch.equal(p.data, state[n])
    owner.close()
    assert not (tmp_path / "base.weights").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_swap_moves_weights_off_the_device_and_back():
    state = {n: t.cuda() for n, t in _weights().items()}
    params = {n: nn.Parameter(t.clone(), requires_grad=False) for n, t in state.items()}
    swap = task_swap(params, None, torch.device("cuda"))
    assert isinstance(swap, HostSwap)
    before = torch.cuda.memory_allocated()
    swap.swap_out()
    assert torch.cuda.memory_allocated() < before
    assert all(t.is_pinned() for t in swap.host.values())
    swap.swap_in()
    for n, p in params.items():
        assert p.is_cuda and torch.equal(p.data, state[n])


def test_failed_swap_in_leaves_nothing_half_loaded(tmp_path):
    state = _weights()
    path = tmp_path / "base.weights"
    owner = FileWeights(state, str(path))
    attached = AttachedWeights(owner.handle)
    params = {n: nn.Parameter(attached.tensors[n], requires_grad=False) for n in state}
    swap = task_swap(params, attached.tensors, torch.device("cpu"))
    swap.swap_out()
    with open(path, "r+b") as f:
        f.truncate(64 * 32 * 4 + 8)  # the second tensor is cut short: its read fails
    with pytest.raises(OSError, match="short read"):
        swap.swap_in()
    assert not swap.resident and all(p.numel() == 0 for p in params.values())
    owner.close()
