"""Starting and watching worker processes.

Workers are forked by a pre-imported launcher (``worker.launcher``, itself forked from
the manager after its imports, so the modules' pages are one copy), so a client's
worker is ready in well under a second instead of paying torch/transformers/PEFT
imports each time. Without pidfds (not Linux) they are started as plain
subprocesses. Either way a ``WorkerHandle`` has a pidfd the manager's poll loop
watches, so a worker's death is noticed at once, whoever its parent is.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time

from menos import wire
from menos.messages import BaseLoaded, LoadBase, SpawnWorker, WorkerSpawned

log = logging.getLogger("menos.manager")


class WorkerHandle:
    """A worker process, child or grandchild: poll/wait/terminate/kill like Popen."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.popen = popen
        self.pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None

    def poll(self) -> int | None:
        """None while running; the exit code, or -1 where it is not ours to know (forked)."""
        if self.popen is not None:
            return self.popen.poll()
        if self.pidfd is not None:
            return -1 if select.select([self.pidfd], [], [], 0)[0] else None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return -1
        return None

    def wait(self, timeout: float) -> int:
        if self.popen is not None:
            return self.popen.wait(timeout)
        if self.pidfd is None or not select.select([self.pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return -1

    def send_signal(self, sig: int) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)  # never a recycled pid
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def stop_workers(handles: list[WorkerHandle], grace_s: float) -> None:
    """Wait up to ``grace_s`` for workers told to stop, then TERM, then KILL the rest."""
    deadline = time.monotonic() + grace_s
    for h in handles:
        try:
            h.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            h.terminate()
    for h in handles:
        try:
            h.wait(2.0)
        except subprocess.TimeoutExpired:
            h.kill()
            try:
                h.wait(5.0)
            except subprocess.TimeoutExpired:
                log.error("worker pid %d survived SIGKILL for 5 s", h.pid)


def worker_command() -> list[str]:
    """The menos-worker entry point next to this interpreter, or the module as a fallback."""
    script = os.path.join(os.path.dirname(sys.executable), "menos-worker")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "worker"]


class Launcher:
    """The worker launcher (``worker.launcher``), forked from this process: its pipes, and
    poll/wait/kill as ``subprocess.Popen`` has them."""

    def __init__(self):
        from worker import launcher  # everything a worker imports, imported here: shared with the fork

        manager_pid = os.getpid()
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        sys.stdout.flush()  # the fork must not write out this process's buffered output again
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the launcher: its stdin and stdout are the pipes
            code = 1
            try:
                os.close(to_w)
                os.close(from_r)
                os.dup2(to_r, 0)
                os.dup2(from_w, 1)
                os.close(to_r)  # the workers it forks must not hold the pipes (the manager would miss their EOF)
                os.close(from_w)
                code = launcher.main([str(manager_pid)])
            finally:
                os._exit(code or 0)
        os.close(to_r)
        os.close(from_w)
        self.pid = pid
        self.stdin, self.stdout = os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("worker launcher", timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


class WorkerSpawner:
    def __init__(self):
        """Fork the launcher now: call before this process starts a thread, CUDA or ZeroMQ."""
        self.launcher = Launcher() if hasattr(os, "pidfd_open") and hasattr(os, "fork") else None

    def spawn(self, req: SpawnWorker) -> WorkerHandle:
        """A worker for ``req``'s session: forked by the launcher, or started directly."""
        if self.launcher is not None:
            reply = self._ask_launcher(req)
            if isinstance(reply, WorkerSpawned):
                return WorkerHandle(reply.pid)
            log.error("the worker launcher is gone (exit code %s); starting workers directly", self.launcher.poll())
            self.launcher = None
        args = ["--manager", req.manager, "--session", req.session, "--manager-pid", str(req.manager_pid),
                "--log-level", req.log_level]  # fmt: skip
        popen = subprocess.Popen(worker_command() + args, stdin=subprocess.DEVNULL)
        return WorkerHandle(popen.pid, popen)

    def load_base(self, req: LoadBase) -> BaseLoaded | None:
        """The base, packed by a loader the launcher forks (``worker.launcher``); None
        without a launcher: the caller loads it itself."""
        if self.launcher is None or self.launcher.poll() is not None:
            return None
        reply = self._ask_launcher(req)
        if isinstance(reply, BaseLoaded):
            return reply
        return BaseLoaded(error=f"the worker launcher failed while loading ({reply or 'it exited'})")

    def _ask_launcher(self, req):
        """The launcher's reply to ``req``; None or the exception where it gave none."""
        if self.launcher.poll() is not None:
            return None
        try:
            wire.write_message(self.launcher.stdin, req)
            return wire.read_message(self.launcher.stdout)
        except (OSError, wire.WireError) as exc:
            return exc

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.stdin.close()  # EOF: the launcher's loop ends
            self.launcher.stdout.close()
            try:
                self.launcher.wait(5)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait()
            self.launcher = None
