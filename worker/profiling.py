"""Start-up profile of one client's memory demand: M_f, M_b and their compute times.

Run once per worker with random inputs of the client's batch size and sequence
length, after a warm-up, and without side effects: the adapter and its optimizer
state are restored afterwards, so training starts exactly where it would have.

How peak memory is measured:
- CUDA: the caching allocator's peak (``max_memory_reserved``) over the step, after
  ``empty_cache`` and ``reset_peak_memory_stats``: the device memory the step takes
  from the driver.
- CPU (Linux): the kernel's peak resident set size of this process. Before the step,
  freed heap pages are returned to the kernel (``malloc_trim``) and the peak is reset
  (writing 5 to /proc/self/clear_refs); after it, VmHWM - VmRSS(before) is the memory
  the step really touched, allocator overhead and fragmentation included. It is not a
  count of tensor allocations.
Tokens are the measurements with ``menos.estimator.with_margin`` (x1.2 + 1 MiB), for run-to-run noise.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch

from menos.adapters import persistent_bytes
from menos.estimator import with_margin
from menos.messages import Recipe
from menos.procs import malloc_trim
from menos.recipe import SideOptimizer
from worker.engine import ServerEngine

CPU_METHOD = "cpu: kernel peak RSS (VmHWM after clear_refs=5 and malloc_trim)"
CUDA_METHOD = "cuda: caching allocator max_memory_reserved delta"


@dataclass(frozen=True)
class Profile:
    m_f: int  # measured peak bytes of a no-grad forward
    m_b: int  # measured peak bytes of a re-forward + backward + optimizer step
    t_f: float  # seconds
    t_b: float
    method: str
    persistent_bytes: int = 0  # A + O measured after a step: the adapter and the optimizer's whole state

    def tokens(self) -> tuple[int, int]:
        """(M_f, M_b) token sizes to ask the scheduler for, with the safety margin."""
        return with_margin(self.m_f), with_margin(self.m_b)

    def step_token(self) -> int:
        """A clipped optimizer step on its own: AdamW's temporaries are at most the size of
        its state and the adapter (A + O), which bounds it."""
        return with_margin(self.persistent_bytes)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[int, float]:
    """(peak extra resident bytes, seconds) of ``fn()`` in this process."""
    gc.collect()
    malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return max(0, _status_kib("VmHWM") - before) * 1024, seconds


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, float]:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_reserved(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return max(0, torch.cuda.max_memory_reserved(device) - before), seconds


def profile(engine: ServerEngine, batch: int, seq: int, repeats: int = 2) -> Profile:
    """Measure M_f and M_b of ``engine`` at (batch, seq); leaves the engine as it was."""
    device = engine.device
    measure = (lambda fn: cuda_peak_bytes(fn, device)) if device.type == "cuda" else cpu_peak_bytes
    saved_params = [p.detach().clone() for p in engine.params]
    # A plain one-step recipe stands in for the client's while profiling (the backward
    # steps every time), so the client's optimizer, schedule and accumulation are untouched.
    saved_opt, engine.opt = engine.opt, SideOptimizer(engine.params, Recipe(lr=engine.opt.recipe.lr))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, engine.hidden, generator=gen).to(engine.dtype)
    g = (torch.randn(batch, seq, engine.hidden, generator=gen) * 1e-3).to(engine.dtype)
    m_f = m_b = 0
    t_f = t_b = float("inf")
    # Each measurement starts from a collected heap. A full collection walks every object of
    # the process (with torch, transformers and PEFT loaded: a quarter of a second each, five
    # per profile); what is alive now is not garbage, so collect once and freeze it: the
    # measurements' collections walk only what the profile itself made.
    gc.collect()
    gc.freeze()
    try:
        engine.forward(-1, x, train=True)
        engine.backward(-1, g, want_input_grad=True)  # warm-up: lazy inits, optimizer state
        persistent = persistent_bytes(engine.params, engine.optimizer)
        for _ in range(repeats):
            peak, secs = measure(lambda: engine.forward(-1, x, train=True))
            m_f, t_f = max(m_f, peak), min(t_f, secs)
            peak, secs = measure(lambda: engine.backward(-1, g, want_input_grad=True))
            m_b, t_b = max(m_b, peak), min(t_b, secs)
        engine.drop_kept()
    finally:
        engine.opt = saved_opt
        with torch.no_grad():
            for p, s in zip(engine.params, saved_params):
                p.copy_(s)
                p.grad = None
        del saved_params
        gc.collect()
        gc.unfreeze()
        malloc_trim()  # the profiled steps' freed heap is not this worker's to keep
    method = CUDA_METHOD if device.type == "cuda" else CPU_METHOD
    return Profile(m_f, m_b, t_f, t_b, method, persistent)
