"""A pre-imported parent that forks workers in milliseconds instead of seconds, and the
loader that packs the base.

Importing torch, transformers and PEFT takes about 10 s on a small CPU; a worker per
client would pay it on every connect. The manager imports everything a worker needs
(this module), then forks this launcher once, before it starts any thread, CUDA or
ZeroMQ (``manager.workers``): the imported modules' pages are then one copy for the
manager, the launcher and every worker. The launcher waits for ``SpawnWorker`` messages
on stdin and answers each with a ``WorkerSpawned`` (the forked worker's pid) on stdout:
the same typed messages as every other process boundary, length-prefixed on the pipes
(menos.wire). ``python -m worker.launcher MANAGER_PID`` runs it as a process of its own.

It also forks the loader on a ``LoadBase``: a child that loads the checkpoint through
transformers, packs it (``menos.packing.pack``: the shared segment and files, which the
manager then adopts), answers ``BaseLoaded`` and exits. The manager never runs
transformers' modelling code itself, so the pages it would have dirtied doing so (heap
and Python objects, copied away from the launcher's on write: its private pages fell
from 132 to 21 MB on OPT-1.3B) do not exist; and nothing of the load is left in the
launcher, whose pages every worker maps.

Forking after these imports is safe because nothing has run yet: no OpenMP pool, no
CUDA context, no ZeroMQ context exists in the launcher (each worker makes its own).
The launcher dies with the manager (parent-death signal), and its workers with it.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

# What a worker imports: paid once, here. Model classes are resolved lazily by
# transformers, so load the families Menos supports up front.
import peft  # noqa: F401
import torch  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import transformers.models.mistral.modeling_mistral  # noqa: F401
import transformers.models.opt.modeling_opt  # noqa: F401
import transformers.models.qwen2.modeling_qwen2  # noqa: F401

from menos import packing, wire
from menos.messages import BaseLoaded, LoadBase, SpawnWorker, WorkerSpawned
from menos.procs import die_with_parent, set_title
from worker import main as worker_main


def _reap(*_) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _leave_pipes() -> None:
    """In a child: default signal handling, and no hold on the launcher's command pipes
    (the manager must see their end when the launcher goes)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)


def _fork(req: SpawnWorker) -> int:
    pid = os.fork()
    if pid:
        return pid
    _leave_pipes()
    set_title(f"menos-worker {req.session} {req.identity or 'anonymous'}")
    code = 1
    try:
        code = worker_main.serve_session(req.manager, req.session, req.manager_pid, req.log_level)
    finally:
        os._exit(code or 0)  # never return into the launcher's loop


def _load(req: LoadBase) -> BaseLoaded:
    """Fork the loader; its reply comes on a pipe of its own, so that a loader the kernel
    kills (out of memory) leaves a missing reply, never half of one on our stdout."""
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            _leave_pipes()
            set_title("menos-loader")
            die_with_parent(parent)
            with os.fdopen(w, "wb") as out:
                wire.write_message(out, packing.pack_reply(req))
            code = 0
        finally:
            os._exit(code)  # never return into the launcher's loop
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        reply = wire.read_message(pipe)  # the SIGCHLD handler reaps the loader
    if isinstance(reply, BaseLoaded):
        return reply
    return BaseLoaded(error="the loader process died before it answered (killed for memory?)")


def main(argv=None) -> int:
    manager_pid = int((sys.argv[1:] if argv is None else argv)[0])
    die_with_parent(manager_pid)
    set_title(f"menos-launcher {manager_pid}")
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the manager stops us
    # Move the imported objects out of the collector's reach: a collection in a worker
    # would otherwise write to (and so copy) every page holding them.
    gc.freeze()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (req := wire.read_message(stdin)) is not None:
        if isinstance(req, SpawnWorker):
            wire.write_message(stdout, WorkerSpawned(pid=_fork(req)))
        elif isinstance(req, LoadBase):
            wire.write_message(stdout, _load(req))
        else:
            raise SystemExit(f"worker launcher: unexpected {type(req).__name__}")
    os._exit(0)  # nothing to clean up: skip the seconds of tearing down torch's module state


if __name__ == "__main__":
    sys.exit(main())
