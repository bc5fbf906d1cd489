"""Running a real manager and client processes from a script: the demo, the
benchmarks and the tests share this.

``ManagerProcess`` is ``menos-manager start`` in a subprocess that is always reaped
(``ClusterProcess``: ``menos-cluster start``);
``server_pss`` sums the proportional set size of it and everything it spawned (the
launcher and the workers), which counts shared pages once across them;
``run_clients`` runs one function per client in its own spawned process, the way
clients would run.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

from manager import runinfo


class ManagerExited(RuntimeError):
    """The manager exited before it listened (its stderr says why); ``returncode`` is its exit status."""

    def __init__(self, message: str, returncode: int | None):
        super().__init__(message)
        self.returncode = returncode


class ManagerProcess:
    """``menos-manager start`` in a subprocess; ``stop()`` ends it and everything it spawned."""

    def __init__(self, state_dir: str, *args: str, log_level: str = "WARNING", worker_threads: int = 1):
        self.state_dir = state_dir
        cmd = [sys.executable, "-m", "manager", "start", "--state-dir", state_dir, "--listen", "tcp://127.0.0.1:*",
               "--worker-threads", str(worker_threads), "--log-level", log_level, *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        try:
            self.endpoint = runinfo.wait_endpoint(state_dir, self.proc)
        except BaseException as exc:
            self.stop()
            if isinstance(exc, RuntimeError):  # it exited: it said why on stderr
                raise ManagerExited(str(exc), self.proc.returncode) from None
            raise

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        """Worker processes: forked by the launcher (the manager's one child that is not a
        worker), or (without one) started directly."""
        return [p for p in self.children() if _ppid(p) != self.pid or "--session" in " ".join(_cmdline(p))]

    def pss(self) -> dict[int, int]:
        """pid -> PSS bytes of the manager and every process it spawned."""
        out = {}
        for p in [psutil.Process(self.pid), *self.children()]:
            try:
                out[p.pid] = p.memory_full_info().pss
            except psutil.Error:
                pass
        return out

    def gpu_bytes(self) -> dict[int, int]:
        """pid -> device memory NVML reports for the manager and every process it spawned
        (CUDA). Written from the NVML docs; no GPU was available to test it.

        NVML names processes by the host's pids. Inside a container (its own pid
        namespace) none of ours match; then every compute process on our devices is
        counted, under pid -1: in a container the GPU is the container's."""
        import pynvml

        ours = {self.pid, *(p.pid for p in self.children())}
        out: dict[int, int] = {}
        unmatched = 0
        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = proc.usedGpuMemory or 0
                    if proc.pid in ours:
                        out[proc.pid] = out.get(proc.pid, 0) + used
                    else:
                        unmatched += used
        finally:
            pynvml.nvmlShutdown()
        if not out and unmatched:
            out[-1] = unmatched
        return out

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 30.0) -> int:
        children = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for c in children:  # should be gone already; never leave one behind
            try:
                c.wait(10)
            except psutil.TimeoutExpired:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        return self.proc.returncode

    def __enter__(self) -> "ManagerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ClusterProcess:
    """``menos-cluster start`` in a subprocess, up once every manager is; ``stop()`` is
    ``menos-cluster stop`` (and a kill of anything left, should that fail)."""

    def __init__(self, state_dir: str, endpoint: str, *args: str, timeout_s: float = 180.0,
                 client_key: str | None = None, server_key: str | None = None):  # fmt: skip
        from manager.cluster import state_file

        self.state_dir, self.endpoint = state_dir, endpoint
        self.keys = (client_key, server_key)
        self.proc = subprocess.Popen([sys.executable, "-m", "manager.cluster", "start", "--listen", endpoint,
                                      "--state-dir", state_dir, *args], stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        try:
            while not (state_file.running(state_dir) and self._all_up()):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"menos-cluster start exited with code {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the cluster was not up within {timeout_s:.0f} s")
                time.sleep(0.2)
        except BaseException:
            self.kill()
            raise

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "manager.cluster", *args], capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    def status(self) -> dict:
        """``menos-cluster status --json``: {"managers": [...], "clients": [...]}."""
        from manager.cluster.cli import cluster_status

        return cluster_status(self.endpoint, *self.keys)

    def _all_up(self) -> bool:
        from menos.errors import MenosError

        try:
            return all(m["alive"] for m in self.status()["managers"])
        except MenosError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            out = self.command("stop", "--state-dir", self.state_dir)
            if out.returncode != 0:
                self.kill()
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                c.kill()
            self.proc.kill()
        self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _ppid(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.Error:
        return None


def run_clients(fn, args_per_client: list[tuple], timeout_s: float = 3600, threads: bool = False) -> list:
    """``fn(*args, barrier)`` for each client, each in its own (spawned) process, at the
    same time; ``barrier`` is shared by all of them. Returns their results in order; the
    first client to fail breaks the barrier (no other waits on it forever) and its
    exception is raised.

    ``threads=True`` runs them as threads of this process instead: no interpreter to
    start per client (quick checks, tests), but they share this process's GIL."""
    n = len(args_per_client)
    if threads:
        barrier = threading.Barrier(n, timeout=timeout_s)
        with ThreadPoolExecutor(n) as pool:
            jobs = [pool.submit(fn, *args, barrier) for args in args_per_client]
            _wait_all(lambda j: j.done(), lambda j: j.exception(0) is not None, lambda j: j.result(0), jobs, barrier,
                      timeout_s)  # fmt: skip
            return [j.result(timeout=timeout_s) for j in jobs]
    ctx = mp.get_context("spawn")  # clients are separate processes, as they would be
    with ctx.Manager() as sync, ctx.Pool(n) as pool:
        barrier = sync.Barrier(n)
        jobs = [pool.apply_async(fn, (*args, barrier)) for args in args_per_client]
        _wait_all(lambda j: j.ready(), lambda j: not j.successful(), lambda j: j.get(0), jobs, barrier, timeout_s)
        results = [j.get(timeout=timeout_s) for j in jobs]
        pool.close()
        pool.join()
        return results


def _wait_all(done, failed, get, jobs: list, barrier, timeout_s: float) -> None:
    """Until every job is done; a job that failed breaks the barrier for the rest, and
    ``get`` raises its exception."""
    deadline = time.monotonic() + timeout_s
    while not all(done(j) for j in jobs) and time.monotonic() < deadline:
        for j in jobs:
            if done(j) and failed(j):
                barrier.abort()
                get(j)
        time.sleep(0.05)
