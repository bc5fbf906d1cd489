"""STATE_DIR/cluster.json: how to reach (and stop) a running ``menos-cluster start``."""

from __future__ import annotations

import json
import os

from menos.procs import pid_alive

FILENAME = "cluster.json"


def write(state_dir: str, **info) -> None:
    path = os.path.join(state_dir, FILENAME)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(path + ".tmp", path)


def read(state_dir: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, FILENAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def running(state_dir: str) -> bool:
    info = read(state_dir)
    pid = int(info.get("pid", 0)) if info is not None else 0
    return pid > 0 and pid_alive(pid)


def remove(state_dir: str, pid: int) -> None:
    info = read(state_dir)
    if info is not None and info.get("pid") == pid:
        os.unlink(os.path.join(state_dir, FILENAME))
