"""How much memory the scheduler may grant, and how much the device has free right now.

CPU: the device is the machine's memory; other programs use it too. The default
capacity is a fraction of what the kernel reports available (psutil), and the same
reading, sampled while the manager runs, caps the scheduler (manager.tokens), so a
CPU server does not over-commit the machine either.
CUDA: NVML's free memory once the base weights are loaded, less a reserve for the
CUDA contexts the workers will create (each costs a few hundred MB outside torch's
counters); sampled the same way. NVML is optional: without a driver (``nvmlInit``
raises) torch's ``mem_get_info`` is used instead.
``free_memory_file`` replaces the reading with a number of bytes read from a file
(tests, and rehearsing a busy device).
Managers that share a device (``--memory-share``, set by a cluster with several managers
per node) take their share of the default capacity, so that together they do not over-commit it.
"""

from __future__ import annotations

import logging

import psutil
import torch

from menos.sizes import parse_size

log = logging.getLogger("menos.manager")

CPU_FRACTION = 0.5
CUDA_CONTEXT_RESERVE = 512 << 20  # per expected worker
CUDA_EXPECTED_WORKERS = 4


class DeviceMemory:
    """Free-memory readings for one device; NVML where it works."""

    def __init__(self, device: torch.device, free_memory_file: str | None = None):
        self.device = device
        self.file = free_memory_file
        self._nvml = None
        if device.type == "cuda" and not free_memory_file:
            try:
                import pynvml

                pynvml.nvmlInit()
                uuid = str(torch.cuda.get_device_properties(device).uuid)
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    if _uuid(pynvml.nvmlDeviceGetUUID(h)) == uuid.removeprefix("GPU-"):
                        self._nvml = (pynvml, h)
            except Exception as exc:  # noqa: BLE001  no driver, no library: fall back to torch
                log.info("NVML unavailable (%s); using torch.cuda.mem_get_info", exc)

    def free(self) -> int:
        """Bytes free on the device now (raises if the reading fails)."""
        if self.file:
            with open(self.file) as f:
                return parse_size(f.read().strip())
        if self.device.type != "cuda":
            return psutil.virtual_memory().available
        if self._nvml is not None:
            pynvml, handle = self._nvml
            return pynvml.nvmlDeviceGetMemoryInfo(handle).free
        return torch.cuda.mem_get_info(self.device)[0]

    def default_capacity(self, share: float = 1.0) -> int:
        """``share``: this manager's part of the device, when managers share it (a cluster's
        N managers on one node each take 1/N: each reads the whole node free)."""
        if self.device.type != "cuda":
            return int(self.free() * CPU_FRACTION * share)
        return max(0, int(self.free() * share) - CUDA_CONTEXT_RESERVE * CUDA_EXPECTED_WORKERS)


def _uuid(raw) -> str:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return text.removeprefix("GPU-")
