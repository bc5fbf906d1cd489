"""What ``menos-manager start`` checks before it loads anything: each mistake is one line
on stderr and exit status 2, as command-line tools do, not a traceback minutes later.
Light: no torch (the device check that needs it takes torch as an argument)."""

from __future__ import annotations

import glob
import os
import re
import socket

from manager.config import ManagerConfig
from menos.versions import transformers_problem

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


class StartupError(Exception):
    """A mistake in the manager's arguments or environment; the message says which."""


def check_config(cfg: ManagerConfig) -> None:
    problem = transformers_problem()
    if problem:
        raise StartupError(problem)
    if cfg.model is not None:
        check_model_dir(cfg.model)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise StartupError(f"--device {cfg.device!r}: use cpu, cuda or cuda:N")
    try:
        cfg.codecs
    except ValueError as exc:
        raise StartupError(f"--compression-allowed {cfg.compression_allowed!r}: {exc}") from None
    check_port_free(cfg.listen)


def check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise StartupError(f"--model {path}: no such directory (a local Hugging Face checkpoint: config.json + weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise StartupError(f"--model {path}: no config.json there; is it a Hugging Face checkpoint directory?")
    if not any(glob.glob(os.path.join(path, pattern)) for pattern in _WEIGHTS):
        raise StartupError(f"--model {path}: config.json but no weights (*.safetensors or pytorch_model*.bin)")


def check_port_free(endpoint: str) -> None:
    """A tcp:// endpoint with a fixed port that another program holds."""
    m = re.fullmatch(r"tcp://(.+):(\d+)", endpoint)
    if not m:
        return  # ipc://, or a port chosen at bind (tcp://host:*)
    host, port = m.group(1).strip("[]"), int(m.group(2))
    host = "0.0.0.0" if host == "*" else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ's listener: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except socket.gaierror:
            return  # an interface name (tcp://eth0:5555): ZeroMQ resolves those itself
        except OSError as exc:
            raise StartupError(f"--listen {endpoint}: {exc.strerror} (another manager there? pick another port)") from None


def check_device(device: str, torch) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StartupError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise StartupError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
