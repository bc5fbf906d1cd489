"""Child processes that must not outlive their parent (workers, a cluster's managers)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGTERM us when our parent (thread) dies, and close the race."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the checks in the loop still notice
    if os.getppid() != parent_pid:
        sys.exit("menos: parent already gone")


def set_title(title: str) -> None:
    """Name this process for ``ps`` and ``top``: a forked child otherwise shows its
    parent's command line, and an operator cannot tell a client's worker from the
    launcher or the manager (vLLM names its processes the same way)."""
    try:
        import setproctitle
    except ImportError:  # cosmetic: never a reason not to serve
        return
    setproctitle.setproctitle(title)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
HEAP_MMAP_BYTES = 256 << 10


def raise_open_files() -> int:
    """Raise this process's soft limit on open files to its hard limit, and return it (a
    manager holds two connections per session, its requests' and its heartbeats')."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def bound_heap() -> None:
    """Serve every buffer of 256 KiB or more from a mapping of its own, unmapped when it
    is freed. glibc's default threshold rises to the largest buffer yet freed (up to 32
    MiB); past that, a step's activations and a section's chunks are cut from the heap,
    and the holes they leave between live objects stay resident after the step: memory
    the scheduler was told is free again. Set before forking: forks inherit it."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)
    except (OSError, AttributeError):
        pass


def malloc_trim() -> None:
    """Give the C heap's free pages back to the kernel (glibc keeps them after a large load)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
