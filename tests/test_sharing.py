"""The shared block: one copy, attachable from another process, cleaned up."""

import os
import subprocess
import sys

import msgspec
import pytest
import torch

from menos.messages import SharedHandle
from menos.sharing import AttachedWeights, SharedWeights, sweep_stale_segments

CHILD = r"""
import sys, msgspec, torch
from menos.messages import SharedHandle
from menos.sharing import AttachedWeights
h = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=SharedHandle)
w = AttachedWeights(h)
print(float(w.tensors["a"].sum()), float(w.tensors["b"].float().sum()), w.tensors["a"].data_ptr() == w.tensors["tied"].data_ptr(), w.owns(w.tensors["b"]))
w.tensors["a"][0, 0] = 42.0  # same pages: the owner sees it
w.close()
"""


def test_child_maps_the_same_memory_and_tied_weights_are_stored_once():
    a = torch.randn(3, 4)
    sd = {"a": a, "tied": a, "b": torch.arange(10, dtype=torch.bfloat16)}
    shared = SharedWeights(sd)
    try:
        assert len(shared.entries) == 2  # "tied" aliases "a"
        assert shared.size == 64 + 64  # two 64-byte aligned entries
        out = subprocess.run(
            [sys.executable, "-c", CHILD], input=msgspec.msgpack.encode(shared.handle),
            capture_output=True, check=True,
        )  # fmt: skip
        s_a, s_b, tied, owned = out.stdout.decode().split()
        assert float(s_a) == pytest.approx(float(a.sum()), abs=1e-5)
        assert float(s_b) == 45.0 and tied == "True" and owned == "True"
        assert shared.tensors["a"][0, 0].item() == 42.0
        assert os.path.exists(f"/dev/shm/{shared.segment}")
        # the child's exit must not have unlinked the owner's segment (resource tracker)
    finally:
        shared.close()
    assert not os.path.exists(f"/dev/shm/{shared.segment}")


def test_attached_weights_recognise_foreign_tensors():
    shared = SharedWeights({"w": torch.ones(8)})
    try:
        attached = AttachedWeights(msgspec.msgpack.decode(msgspec.msgpack.encode(shared.handle), type=SharedHandle))
        assert attached.owns(attached.tensors["w"])
        assert not attached.owns(torch.ones(8))
        attached.close()
    finally:
        shared.close()


def test_a_block_packed_for_another_process_is_adopted_and_then_owned():
    """The base's loader packs the block for the manager (a segment named after it), and
    exits; the manager adopts it: same views, its name to unlink."""
    sd = {"a": torch.randn(3, 4), "b": torch.arange(10, dtype=torch.bfloat16)}
    packed = SharedWeights(sd, owner_pid=os.getppid())
    assert packed.segment.startswith(f"menos_{os.getppid()}_")  # a sweep spares it while its owner lives
    handle = msgspec.msgpack.decode(msgspec.msgpack.encode(packed.handle), type=SharedHandle)
    packed._shm.close()  # the packer exits without unlinking  # noqa: SLF001
    adopted = SharedWeights.adopt(handle)
    try:
        assert torch.equal(adopted.tensors["a"], sd["a"]) and torch.equal(adopted.tensors["b"], sd["b"])
        assert adopted.handle_for_worker() == handle and adopted.size == packed.size
        with pytest.raises(ValueError, match="only a cpu-shm block"):
            SharedWeights.adopt(msgspec.structs.replace(handle, kind="file"))
    finally:
        adopted.close()
    assert not os.path.exists(f"/dev/shm/{handle.segment}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_adopted_block_goes_to_the_device_and_its_segment_at_once():
    sd = {"a": torch.randn(64, 64), "b": torch.arange(10, dtype=torch.bfloat16)}
    handle = SharedWeights(sd).handle  # dropped unclosed: the packer's exit
    adopted = SharedWeights.adopt(handle, "cuda")
    try:
        assert adopted.handle.kind == "cuda-ipc" and adopted.tensors["a"].is_cuda
        assert torch.equal(adopted.tensors["a"].cpu(), sd["a"]) and torch.equal(adopted.tensors["b"].cpu(), sd["b"])
        assert not os.path.exists(f"/dev/shm/{handle.segment}")  # copied to the device, then unlinked
    finally:
        adopted.close()


def test_sweep_removes_only_segments_of_dead_owners():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead_pid = int(dead.stdout)
    stale = f"/dev/shm/menos_{dead_pid}_deadbeef"
    with open(stale, "wb") as f:
        f.write(b"x")
    live = SharedWeights({"w": torch.ones(2)})
    try:
        swept = sweep_stale_segments()
        assert f"menos_{dead_pid}_deadbeef" in swept
        assert not os.path.exists(stale)
        assert os.path.exists(f"/dev/shm/{live.segment}")
    finally:
        live.close()
        if os.path.exists(stale):
            os.unlink(stale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_ipc_child_maps_the_same_allocation():
    sd = {"a": torch.randn(16, 16)}
    shared = SharedWeights(sd, "cuda")
    child = CHILD.replace("AttachedWeights(h)", "AttachedWeights(h, 'cuda')").replace('"b"', '"a"').replace('"tied"', '"a"')
    for _ in range(2):  # two consumers, each with its own export
        torch.cuda.synchronize()
        expected = float(shared.tensors["a"].sum())
        out = subprocess.run([sys.executable, "-c", child], input=msgspec.msgpack.encode(shared.handle_for_worker()),
                             capture_output=True, check=True)  # fmt: skip
        assert float(out.stdout.split()[0]) == pytest.approx(expected, abs=1e-3)
    torch.cuda.synchronize()
    assert shared.tensors["a"][0, 0].item() == 42.0
    shared.close()


def test_allocator_settings_that_cannot_share_are_refused():
    from menos import allocator

    assert allocator.shareable(None) == "expandable_segments:False"
    assert allocator.shareable("max_split_size_mb:128") == "max_split_size_mb:128,expandable_segments:False"
    assert allocator.shareable("expandable_segments:False") == "expandable_segments:False"
    for bad in ("expandable_segments:True", "backend:cudaMallocAsync", "max_split_size_mb:64, backend:cudaMallocAsync"):
        with pytest.raises(ValueError, match="cannot share"):
            allocator.shareable(bad)


def test_the_manager_refuses_an_unshareable_allocator_before_loading_anything(tmp_path):
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    out = subprocess.run([sys.executable, "-m", "manager", "start", "--device", "cuda", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert out.returncode != 0 and "cannot share CUDA memory" in out.stderr
