"""The manager <-> launcher messages (``worker.launcher``), length-prefixed on its pipes:
fork a worker for a session, or a loader that packs the base (``menos.packing``)."""

from __future__ import annotations

from typing import Optional

from menos.message_base import SharedHandle, _Msg


class SpawnWorker(_Msg, tag="spawn_worker", kw_only=True):
    """Manager -> launcher (over its stdin pipe): fork a worker for this session."""

    manager: str  # the manager's worker endpoint (ipc://...)
    session: str
    manager_pid: int  # the worker exits when this process is gone
    log_level: str = "INFO"
    identity: str = ""  # the client's, for the worker's process title (an operator finds its worker)


class WorkerSpawned(_Msg, tag="worker_spawned", kw_only=True):
    """Launcher -> manager (over its stdout pipe): the forked worker's pid."""

    pid: int


class LoadBase(_Msg, tag="load_base", kw_only=True):
    """Manager -> launcher: load the base in a child process and pack it (``menos.packing.pack``):
    the served blocks into a shared-memory segment (vanilla: all of it into a file), the
    rest into a file. The child exits after: what loading dirtied goes with it."""

    model: Optional[str]  # a checkpoint directory; None: the built-in model
    dtype: str
    run_dir: str  # where the files go
    vanilla: bool
    min_head: int  # the first served block
    stop: int = 0  # the block after the last served one (0: the model's last is served)
    owner_pid: int  # the segment is named after its owner (the manager), which unlinks it
    quantization: str = "none"  # menos.quantization: how the served block Linears are stored


class BaseLoaded(_Msg, tag="base_loaded", kw_only=True):
    """Launcher -> manager: the packed base, or why it could not be loaded."""

    name: str = ""
    config_json: str = ""
    weights: Optional[SharedHandle] = None  # the served blocks (vanilla: the whole model's file)
    ends: Optional[SharedHandle] = None  # what only clients run, in a file (vanilla: none)
    digests: dict[str, str] = {}  # tensor name -> menos.models.tensor_digest
    error: str = ""  # set when nothing was packed: the exception's type and message
