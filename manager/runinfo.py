"""STATE_DIR/manager.json: how to reach a running manager (pid, endpoint, model).

Written atomically by the manager once it listens; read by whoever started it (the
demo, tests, scripts) to learn the endpoint, e.g. when it bound port ``*``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

from menos.procs import pid_alive

FILENAME = "manager.json"


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
