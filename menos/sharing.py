"""The one module that owns cross-process weight sharing.

The manager packs every base tensor into ONE block (one POSIX shared-memory segment
on CPU, one CUDA allocation on GPU) and describes it with a ``SharedHandle`` of plain
data: entry names, dtypes, shapes, byte offsets, plus the segment name or the CUDA IPC
arguments. A worker maps the same block and builds tensor views on it, so the
weights exist once however many workers attach. One block keeps cleanup and
accounting simple: one name to unlink, one size to report.

CPU: a POSIX shared-memory segment in /dev/shm, mapped. Segment names carry the owner's pid
(``menos_<pid>_<random>``) so a later manager can sweep segments of dead owners.
The vanilla baseline (``menos-manager start --baseline vanilla``) shares nothing: the
manager writes the same block to a file (``menos.weight_files``) and drops the model; each
worker reads the entries of its own blocks into private memory, and reads them again
whenever its task is swapped back in.

CUDA: ``torch.multiprocessing.reductions.reduce_tensor`` gives the arguments of
``rebuild_cuda_tensor``; they are made plain data here (classes and dtypes by name)
so they can travel as msgpack. The manager must keep the block alive while workers
use it, and must not use ``expandable_segments`` or ``cudaMallocAsync`` (both break
CUDA IPC). Devices are matched by UUID, since CUDA_VISIBLE_DEVICES may differ.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from collections.abc import Mapping

import msgspec
import torch

from menos.procs import pid_alive
from menos.messages import SharedEntry, SharedHandle
from menos.weight_files import FileTensors, FileWeights, layout
from menos.wire import dtype_from_name, dtype_name

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "menos_"
_SHM_DIR = "/dev/shm"


def _views(block: torch.Tensor, entries) -> dict[str, torch.Tensor]:
    """Tensor views on a flat uint8 ``block``, one per name."""
    out = {}
    for e in entries:
        dtype = dtype_from_name(e.dtype)
        n = 1
        for d in e.shape:
            n *= d
        view = block[e.offset : e.offset + n * dtype.itemsize].view(dtype).view(e.shape)
        for name in e.names:
            out[name] = view
    return out


class SharedWeights:
    """Owner side: the block, its views, and the handle workers attach with.

    ``SharedWeights(state_dict)`` packs a state dict into a new block. ``adopt(handle)``
    takes over a CPU segment another of our processes packed for this one (the base's
    loader, ``menos.packing``): it is then this process's to unlink. On CUDA the segment
    is copied into a device block and unlinked at once."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                 owner_pid: int | None = None):  # fmt: skip
        groups, size = layout(state_dict)
        entries = tuple(SharedEntry(names, dtype_name(t.dtype), tuple(t.shape), off) for names, t, off in groups)
        self._open(entries, size, torch.device(device), owner_pid or os.getpid())
        for names, t, _ in groups:
            self.tensors[names[0]].copy_(t.detach())
        self._filled()

    @classmethod
    def adopt(cls, handle: SharedHandle, device: str | torch.device = "cpu") -> "SharedWeights":
        if handle.kind != "cpu-shm":
            raise ValueError(f"only a cpu-shm block can be adopted, not {handle.kind!r}")
        device, self = torch.device(device), cls.__new__(cls)
        if device.type == "cpu":
            self._shm = _map_segment(handle.segment, max(handle.size, 1))
            self._block = torch.frombuffer(self._shm, dtype=torch.uint8, count=max(handle.size, 1))
            self.entries, self.size, self.handle = handle.entries, handle.size, handle
            self.tensors = _views(self._block, self.entries)
            return self
        packed = cls.adopt(handle)
        try:
            self._open(handle.entries, handle.size, device, os.getpid())
            self._block.copy_(packed._block)  # the same layout: one copy of the whole block
            self._filled()
        finally:
            packed.close()
        return self

    def _open(self, entries, size: int, device: torch.device, owner_pid: int) -> None:
        """A new, unfilled block for ``entries``: a segment named after its owner, or device memory."""
        self.entries, self.size = entries, size
        self._shm, name = None, ""
        if device.type == "cpu":
            name = f"{SEGMENT_PREFIX}{owner_pid}_{secrets.token_hex(4)}"
            self._shm = _create_segment(name, max(size, 1))
            self._block = torch.frombuffer(self._shm, dtype=torch.uint8, count=max(size, 1))
        elif device.type == "cuda":
            backend = torch.cuda.memory.get_allocator_backend()
            if backend != "native":  # cudaMallocAsync blocks cannot travel through CUDA IPC handles
                raise RuntimeError(f"CUDA allocator backend {backend!r} cannot share weights: use the native one "
                                   "(PYTORCH_CUDA_ALLOC_CONF without backend:cudaMallocAsync)")  # fmt: skip
            self._block = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        else:
            raise ValueError(f"cannot share weights on device {device}")
        self.tensors = _views(self._block, self.entries)
        self.handle = SharedHandle(kind="cpu-shm" if self._shm else "cuda-ipc", size=size, entries=entries, segment=name)

    def _filled(self) -> None:
        if self._block.device.type == "cuda":
            torch.cuda.synchronize(self._block.device)  # the block is filled before any consumer can map it
        log.info("shared %d tensors, %.1f MiB, in one %s block", len(self.entries), self.size / 2**20, self.handle.kind)

    def handle_for_worker(self) -> SharedHandle:
        """The handle one worker attaches with. CUDA: a fresh export per consumer, since
        torch's IPC counts one consumer per reduction in the producer's shared reference
        counter (torch/multiprocessing/reductions.py); the block itself stays alive until
        ``close``, after every worker is gone."""
        if self._shm is not None:
            return self.handle
        return msgspec.structs.replace(self.handle, cuda=_export_cuda(self._block))

    @property
    def segment(self) -> str:
        return self.handle.segment

    def close(self) -> None:
        """Release the block. Workers that still map it keep their pages until they exit."""
        self.tensors = {}
        self._block = None
        if self._shm is not None:
            unlink_segment(self.handle.segment)
            try:
                self._shm.close()
            except BufferError:  # a view is still referenced somewhere; the unlink suffices
                pass
            self._shm = None


def select_entries(weights, wanted: set[str]) -> tuple[list, list[tuple[str, ...]]]:
    """The tensors of ``weights`` named in ``wanted``, one per entry, with each one's wanted
    aliases (tied weights travel once): views of a shared block, or a file's ``FileRows``
    (read a chunk of rows at a time, when asked)."""
    tensors, aliases = [], []
    for e in weights.entries:
        names = tuple(n for n in e.names if n in wanted)
        if names:
            tensors.append(weights.tensors.rows_of(names[0]) if isinstance(weights, FileWeights)
                           else weights.tensors[names[0]])  # fmt: skip
            aliases.append(names)
    return tensors, aliases


class AttachedWeights:
    """Worker side: views on the manager's block. Nothing is copied (except for the
    vanilla baseline's "file" handle: private copies, read on demand)."""

    def __init__(self, handle: SharedHandle, device: str | torch.device = "cpu"):
        self.handle = handle
        self._shm = None
        if handle.kind == "file":
            self.device = torch.device(device)
            self.tensors = FileTensors(handle.segment, handle.entries, device)
            return
        if handle.kind == "cpu-shm":
            self._shm = _map_segment(handle.segment, max(handle.size, 1))
            block = torch.frombuffer(self._shm, dtype=torch.uint8, count=max(handle.size, 1))
        elif handle.kind == "cuda-ipc":
            block = _import_cuda(handle.cuda)
        else:
            raise ValueError(f"unknown shared handle kind {handle.kind!r}")
        self.device = block.device  # CUDA: the index this process sees the manager's GPU at
        self._span = (block.data_ptr(), block.data_ptr() + block.numel())
        self.tensors = _views(block, handle.entries)

    def owns(self, t: torch.Tensor) -> bool:
        """True if ``t``'s memory lies inside the shared block (no private copy)."""
        if self.handle.kind == "file":
            return False
        lo, hi = self._span
        return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi

    def close(self) -> None:
        self.tensors = {}
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:
                pass


def _create_segment(name: str, size: int) -> mmap.mmap:
    """A new POSIX shared-memory segment, mapped. Not through SharedMemory: that starts a
    resource-tracker process, which takes over a second to exit after the manager (and
    unlinking is ours anyway: on close, and by the sweep after a crash)."""
    fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _map_segment(name: str, size: int) -> mmap.mmap:
    """Map the owner's segment. Not through SharedMemory: before Python 3.13 that starts a
    resource tracker in every worker and registers the segment, which it would then
    unlink when the worker exits."""
    if not re.fullmatch(rf"{SEGMENT_PREFIX}\d+_[0-9a-f]+", name):
        raise ValueError(f"not a menos segment name: {name!r}")
    fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR)
    try:
        if os.fstat(fd).st_size < size:
            raise ValueError(f"segment {name} is smaller than the {size} bytes its handle describes")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    """Remove a segment's name (its pages go when the last process unmaps them)."""
    try:
        os.unlink(os.path.join(_SHM_DIR, name))
    except FileNotFoundError:
        pass


def sweep_stale_segments() -> list[str]:
    """Unlink segments left by managers that no longer run. Returns their names."""
    swept = []
    if not os.path.isdir(_SHM_DIR):
        return swept
    for fname in os.listdir(_SHM_DIR):
        m = re.fullmatch(rf"{SEGMENT_PREFIX}(\d+)_[0-9a-f]+", fname)
        if not m or pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(_SHM_DIR, fname))
            swept.append(fname)
        except OSError as exc:
            log.warning("could not remove stale segment %s: %s", fname, exc)
    return swept


# --------------------------------------------------------------------------- CUDA IPC
# Written from torch.multiprocessing.reductions; only exercised where CUDA exists.

_STORAGE_CLASSES = {"TypedStorage": torch.storage.TypedStorage, "UntypedStorage": torch.UntypedStorage}


def _export_cuda(block: torch.Tensor) -> dict:
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(block)
    (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_size, storage_offset,
     requires_grad, ref_handle, ref_offset, event_handle, event_sync) = args
    if tensor_cls is not torch.Tensor:
        raise TypeError(f"expected a plain tensor, got {tensor_cls}")
    return {
        "size": list(size), "stride": list(stride), "offset": offset,
        "storage_cls": storage_cls.__name__, "dtype": dtype_name(dtype),
        "device_uuid": str(torch.cuda.get_device_properties(device).uuid),
        "handle": handle, "storage_size": storage_size, "storage_offset": storage_offset,
        "ref_handle": ref_handle, "ref_offset": ref_offset,
        "event_handle": event_handle, "event_sync": event_sync,
    }  # fmt: skip


def _import_cuda(args: dict) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = cuda_index_of_uuid(args["device_uuid"])
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(args["size"]), tuple(args["stride"]), args["offset"],
        _STORAGE_CLASSES[args["storage_cls"]], dtype_from_name(args["dtype"]), device,
        args["handle"], args["storage_size"], args["storage_offset"], False,
        args["ref_handle"], args["ref_offset"], args["event_handle"], args["event_sync"],
    )  # fmt: skip


def cuda_index_of_uuid(uuid: str) -> int:
    """This process's index of the GPU with ``uuid``."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"GPU {uuid} is not visible to this process (check CUDA_VISIBLE_DEVICES)")
