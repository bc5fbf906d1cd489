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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def malloc_trim() -> None:
    """Give the C heap's free pages back to the kernel (glibc keeps them after a large load)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
