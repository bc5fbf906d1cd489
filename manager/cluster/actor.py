"""One manager of a cluster, owned by a Ray actor on its node: started, watched, restarted.

The manager is the ordinary ``menos-manager start`` in a child process of the actor, so
its workers stay its children and share its weights exactly as on a single server. Its
state directory is on its node's own disk. The actor is a plain class here; the cluster's
driver wraps it with ``ray.remote`` (so this module imports without Ray).

One thread owns the child for the actor's whole life: the kernel's parent-death signal
(``menos.procs.die_with_parent``) follows the thread that started the child, so the
manager dies with the actor, and the actor's methods only read what that thread reports.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from manager import runinfo
from menos.procs import die_with_parent

log = logging.getLogger("menos.cluster")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # a manager that keeps dying is retried ever more slowly
STOP_GRACE_S = 15.0


class ManagerRunner:
    def __init__(self, manager_id: str, state_dir: str, flags: list[str], host: str, keys: dict[str, bytes],
                 device: str = "cpu"):  # fmt: skip
        """``keys``: files (path relative to the state dir -> bytes) to place before each start:
        the cluster's CURVE key pair and admitted client keys."""
        self.id = manager_id
        self.state_dir = state_dir
        self.flags = list(flags)
        self.host = host
        self.device = device
        self.node = socket.gethostname()
        self.restarts = 0
        self._keys = dict(keys)
        self._proc: subprocess.Popen | None = None
        self._endpoint = ""
        self._error = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._own, daemon=True, name=f"manager-{manager_id}")
        self._thread.start()

    # ---------------------------------------------------------------- what the driver calls

    def info(self) -> dict:
        with self._lock:
            proc = self._proc
            alive = proc is not None and proc.poll() is None and bool(self._endpoint)
            return {"id": self.id, "node": self.node, "device": self.device, "endpoint": self._endpoint if alive else "",
                    "pid": proc.pid if proc is not None else 0, "alive": alive, "restarts": self.restarts,
                    "error": self._error}  # fmt: skip

    def wait_started(self, timeout_s: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.info()
            if info["alive"] or self._error:
                return info
            time.sleep(0.1)
        return self.info()

    def set_keys(self, keys: dict[str, bytes]) -> None:
        """New admitted client keys: written at once (the manager re-reads its key directory)."""
        with self._lock:
            self._keys = dict(keys)
        self._write_keys()

    def stop(self) -> int:
        """Stop the manager (SIGTERM: it stops its workers and removes its files) and the watch."""
        self._stop.set()
        self._thread.join(STOP_GRACE_S + 5)
        with self._lock:
            return self._proc.returncode if self._proc is not None and self._proc.returncode is not None else 0

    # ---------------------------------------------------------------- the owning thread

    def _own(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._run_once()
            except Exception as exc:  # noqa: BLE001  reported through info(); retried below
                self._error = f"{type(exc).__name__}: {exc}: {self._last_words()}"
                log.error("manager %s: %s", self.id, self._error)
            if self._stop.is_set():
                break
            attempt = 0 if time.monotonic() - started > 60 else attempt + 1
            self.restarts += 1
            self._stop.wait(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])

    def _run_once(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self._write_keys()
        cmd = [sys.executable, "-m", "manager", "start", "--state-dir", self.state_dir,
               "--listen", f"tcp://{self.host}:*", "--device", self.device, *self.flags]  # fmt: skip
        parent = os.getpid()
        with open(os.path.join(self.state_dir, "manager.log"), "ab") as out:  # on its node, beside its state
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: die_with_parent(parent))  # fmt: skip
        with self._lock:
            self._proc, self._endpoint = proc, ""
        try:
            endpoint = runinfo.wait_endpoint(self.state_dir, proc)
            with self._lock:
                self._endpoint, self._error = endpoint, ""
            log.info("manager %s: pid %d on %s", self.id, proc.pid, endpoint)
            while proc.poll() is None and not self._stop.wait(0.05):
                pass
        finally:
            if proc.poll() is None:  # stopping: let it stop its workers and remove its files
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if not self._stop.is_set():
            self._error = f"the manager (pid {proc.pid}) exited with code {proc.returncode}: {self._last_words()}"
            log.error("manager %s: %s; restarting", self.id, self._error)

    def _last_words(self) -> str:
        """The last line the manager wrote (``menos-manager`` says why it would not start in one)."""
        try:
            with open(os.path.join(self.state_dir, "manager.log"), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
                lines = f.read().decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else "(no output)"
        except OSError:
            return "(no log)"

    def _write_keys(self) -> None:
        with self._lock:
            keys = dict(self._keys)
        for rel, data in keys.items():
            path = os.path.join(self.state_dir, rel)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.chmod(path + ".tmp", 0o600)
            os.replace(path + ".tmp", path)
        clients = os.path.join(self.state_dir, "keys", "clients")
        if keys and os.path.isdir(clients):  # exactly the cluster's admitted keys: a removed one is revoked
            for name in os.listdir(clients):
                if os.path.join("keys", "clients", name) not in keys:
                    os.unlink(os.path.join(clients, name))
