"""STATE_DIR/manager.json: how to reach a running manager (pid, endpoint, model); and
STATE_DIR/menos.lock: which live process (a manager, or a cluster) owns the directory.

manager.json is written atomically by the manager once it listens; read by whoever
started it (the demo, tests, scripts) to learn the endpoint, e.g. when it bound port ``*``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time

from menos.procs import pid_alive

FILENAME = "manager.json"
LOCKNAME = "menos.lock"

_held: dict[int, str] = {}  # fd -> lock path: the state directories this process holds


def _drop_in_child() -> None:
    # A forked child (the worker launcher, its workers) must not keep the lock alive after
    # the manager dies: close its copies (the parent's lock is untouched by that).
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class Busy(Exception):
    """The state directory belongs to another live process; ``holder`` is what it wrote
    in the lock file (kind, pid, listen, info), with ``endpoint`` once it listens."""

    def __init__(self, holder: dict):
        super().__init__(f"held by {holder}")
        self.holder = holder


class StateLock:
    """This process's hold on a state directory (``claim``)."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        """Remove the lock file, then unlock: a claimer that opened it meanwhile sees it gone and retries."""
        if _held.pop(self.fd, None) is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


def claim(state_dir: str, kind: str, listen: str, info_file: str) -> StateLock:
    """Hold ``state_dir`` for this process's life: an OS lock (flock) on STATE_DIR/menos.lock,
    which the kernel releases however the process ends, so the lock of a dead process is
    simply taken over. ``info_file`` (in the directory) is where the holder writes its
    endpoint. Busy if a live process holds it; OSError if the directory cannot be made."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, LOCKNAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # close-on-exec: Python's default
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(holder(state_dir)) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it as it stopped: lock the one there now
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"kind": kind, "pid": os.getpid(), "listen": listen, "info": info_file}).encode())
    _held[fd] = path
    return StateLock(fd, path)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def holder(state_dir: str) -> dict:
    """What the lock's holder wrote, with its endpoint from its info file once it listens."""
    for _ in range(20):  # a holder that has just locked writes its line at once
        try:
            with open(os.path.join(state_dir, LOCKNAME)) as f:
                info = json.load(f)
            break
        except (OSError, ValueError):
            time.sleep(0.01)
    else:
        return {}
    try:
        with open(os.path.join(state_dir, os.path.basename(str(info.get("info", FILENAME))))) as f:
            run = json.load(f)
        if run.get("pid") == info.get("pid"):
            info["endpoint"] = run.get("endpoint")
    except (OSError, ValueError, AttributeError):
        pass
    return info


def write(state_dir: str, **info) -> str:
    path = os.path.join(state_dir, FILENAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)
    return path


def remove(state_dir: str, pid: int) -> None:
    """Remove the file if it is this manager's (a newer one may have replaced it)."""
    path = os.path.join(state_dir, FILENAME)
    try:
        with open(path) as f:
            if json.load(f).get("pid") == pid:
                os.unlink(path)
    except (OSError, ValueError):
        pass


def wait_endpoint(state_dir: str, proc, timeout_s: float = 120.0) -> str:
    """The endpoint of the manager process ``proc`` (a Popen), once it is listening."""
    path = os.path.join(state_dir, FILENAME)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"menos-manager exited with code {proc.returncode}")
        try:
            with open(path) as f:
                info = json.load(f)
            if info["pid"] == proc.pid:
                return info["endpoint"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"menos-manager did not start within {timeout_s:.0f} s")


def sweep_dead_runs(state_dir: str) -> list[str]:
    """Remove the run directories (worker socket files) of managers that no longer run."""
    swept = []
    for name in os.listdir(state_dir):
        m = re.fullmatch(r"run-(\d+)", name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(state_dir, name), ignore_errors=True)
            swept.append(name)
    return swept
