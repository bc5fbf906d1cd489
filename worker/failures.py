"""What an exception from a compute means: out of memory (retry under an exclusive
grant), fatal for the process's CUDA context (end the worker), or an ordinary failure
of that one request."""

from __future__ import annotations

import torch

_OOM_TYPES = tuple({getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError, MemoryError})
# Allocation failures that surface as other errors: the CPU allocator's, and the CUDA
# libraries' own workspaces (cuBLAS, cuDNN) when the device is full.
_OOM_TEXT = ("can't allocate memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
             "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "CUSOLVER_STATUS_ALLOC_FAILED")  # fmt: skip
# CUDA errors after which the process's context is unusable: every later call fails.
_FATAL_TEXT = ("illegal memory access", "device-side assert", "unspecified launch failure", "illegal instruction",
               "misaligned address", "CUDA error: an illegal", "uncorrectable ECC")  # fmt: skip


def is_oom(exc: BaseException) -> bool:
    """Out of memory: CUDA's OutOfMemoryError, or an allocation failure that only says so."""
    return isinstance(exc, _OOM_TYPES) or (isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT))


def is_fatal(exc: BaseException) -> bool:
    """A CUDA error that leaves this process's context unusable: the worker must end."""
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _FATAL_TEXT)
