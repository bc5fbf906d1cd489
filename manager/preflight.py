"""What ``menos-manager start`` checks before it loads anything: each mistake is one line
on stderr and exit status 2, as command-line tools do, not a traceback minutes later.
Light: no torch (the device check that needs it takes torch as an argument)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import socket

from manager import runinfo
from manager.config import ManagerConfig
from menos.sizes import parse_size
from tools.cli_args import raw_config
from menos.versions import transformers_problem

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


class StartupError(Exception):
    """A mistake in the manager's arguments or environment; the message says which."""


def check_config(cfg: ManagerConfig) -> None:
    problem = transformers_problem()
    if problem:
        raise StartupError(problem)
    check_manager_flags(cfg)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise StartupError(f"--device {cfg.device!r}: use cpu, cuda or cuda:N")
    check_state_dir(cfg.state_dir)
    check_port_free(cfg.listen)
    check_metrics_port(cfg.metrics_port, cfg.listen)


# flag -> (the least value it takes, what it means); a field not here takes any value its type does
_LEAST = {"memory_share": (1e-9, "a fraction in (0, 1], e.g. 0.5 for one of two managers"),
          "metrics_port": (0, "a TCP port, 1..65535 (0: no metrics)"), "checkpoint_every": (0, "steps, 0 or more"),
          "client_timeout": (1e-9, "seconds, more than 0"), "heartbeat": (1e-9, "seconds, more than 0"),
          "max_clients": (1, "1 or more"), "max_message_bytes": (1, "bytes, 1 or more"),
          "worker_threads": (0, "0 (torch's default) or more"), "min_head_layers": (0, "blocks, 0 or more"),
          "park_after": (0, "seconds, 0 (never) or more"), "max_workers": (0, "processes, 0 (no cap) or more")}  # fmt: skip
_MOST = {"memory_share": 1, "metrics_port": 65535}


def check_manager_flags(cfg: ManagerConfig) -> None:
    """What ``menos-manager start`` and ``menos-cluster start`` both check of a manager's flags."""
    if cfg.model is not None:
        check_model_dir(cfg.model)
    check_quantization(cfg.quantization, cfg.model)
    for name, (least, means) in _LEAST.items():
        value = getattr(cfg, name)
        if not least <= value <= _MOST.get(name, float("inf")):
            raise StartupError(f"--{name.replace('_', '-')} {value:g}: {means}")
    if cfg.baseline == "vanilla" and (cfg.park_after or cfg.max_workers):
        raise StartupError("--park-after and --max-workers park Menos sessions; the vanilla baseline keeps its "
                           "process per client (it is what Menos is measured against): leave them out")  # fmt: skip
    try:
        cfg.codecs
    except ValueError as exc:
        raise StartupError(f"--compression-allowed {cfg.compression_allowed!r}: {exc}") from None
    if cfg.memory_capacity is not None:
        try:
            capacity = parse_size(cfg.memory_capacity)
        except ValueError as exc:
            raise StartupError(f"--memory-capacity: {exc}") from None
        if capacity <= 0:
            raise StartupError(f"--memory-capacity {cfg.memory_capacity}: a size above 0, e.g. 6GiB (or leave it out: "
                               "the device's free memory)")  # fmt: skip
    try:
        start, stop = cfg.block_range
    except ValueError as exc:
        raise StartupError(f"--blocks {cfg.blocks}: {exc}") from None
    if start or stop:
        try:
            layers = raw_config(cfg.model).get("num_hidden_layers")
        except ValueError:
            layers = None  # check_model_dir or the loader says what is wrong with the checkpoint
        if isinstance(layers, int):
            check_blocks(cfg, start, stop, layers)


def check_blocks(cfg: ManagerConfig, start: int, stop: int, layers: int) -> None:
    """The served blocks [start, stop) (stop 0: to the last) exist in a model of ``layers`` blocks."""
    if cfg.blocks is not None and stop > layers:
        raise StartupError(f"--blocks {cfg.blocks}: the model has {layers} blocks (0..{layers - 1}); "
                           f"at most {start}:{layers}")  # fmt: skip
    if start >= (stop or layers):
        raise StartupError(f"--min-head-layers {start}: the model has {layers} blocks, and the server runs at "
                           f"least one: at most {layers - 1}")  # fmt: skip


def check_state_dir(path: str, flag: str = "--state-dir") -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise StartupError(f"{flag} {path}: a file, not a directory; pick a directory (it is made if missing)")


def claim_state_dir(path: str, kind: str, listen: str, info_file: str) -> runinfo.StateLock:
    """The state directory, held by this process until it ends (``runinfo.claim``)."""
    check_state_dir(path)
    try:
        return runinfo.claim(path, kind, listen, info_file)
    except runinfo.Busy as exc:
        raise StartupError(f"--state-dir {path}: {_held_by(exc.holder, path)}, or pick another --state-dir") from None
    except OSError as exc:
        raise StartupError(f"--state-dir {path}: {exc.strerror}; pick a directory you can write") from None


def _held_by(h: dict, path: str) -> str:
    pid = h.get("pid", "?")
    where = h.get("endpoint") or f"starting on {h.get('listen', '?')}"
    if h.get("kind") == "cluster":
        return f"a running menos-cluster holds it (pid {pid}, gateway {where}); menos-cluster stop --state-dir {path} first"
    return f"a running manager holds it (pid {pid}, {where}); stop it first (kill {pid})"


def check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise StartupError(f"--model {path}: no such directory (a local Hugging Face checkpoint: config.json + weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise StartupError(f"--model {path}: no config.json there; is it a Hugging Face checkpoint directory?")
    if not any(glob.glob(os.path.join(path, pattern)) for pattern in _WEIGHTS):
        raise StartupError(f"--model {path}: config.json but no weights (*.safetensors or pytorch_model*.bin)")


def check_quantization(quantization: str, model: str | None) -> None:
    """A checkpoint quantized already (Menos quantizes the base itself, for one shared copy),
    and a quantization without bitsandbytes installed."""
    if model is not None:
        try:
            with open(os.path.join(model, "config.json")) as f:
                qc = json.load(f).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            qc = None  # the loader says what is wrong with it
        if qc is not None:
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            raise StartupError(f"--model {model}: a checkpoint quantized already ({method}); give Menos the "
                               "unquantized one, with --quantization nf4, fp4 or int8: it quantizes one copy "
                               "for every client itself")  # fmt: skip
    if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise StartupError(f"--quantization {quantization}: needs bitsandbytes; pip install 'menos[qlora]'")


def check_quantization_runs(quantization: str, device: str, dtype: str) -> None:
    """bitsandbytes runs this quantization on this device in this dtype (after torch loads)."""
    from menos.quantization import Quantization, probe
    from menos.wire import dtype_from_name

    try:
        probe(Quantization.parse(quantization), device, dtype_from_name(dtype))
    except Exception as exc:  # noqa: BLE001  whatever bitsandbytes raises, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(f"--quantization {quantization} on --device {device} with --dtype {dtype}: "
                           f"bitsandbytes cannot ({first})") from None


def check_port_free(endpoint: str) -> None:
    """A tcp:// endpoint with a fixed port that another program holds."""
    m = re.fullmatch(r"tcp://(.+):(\d+)", endpoint)
    if not m:
        return  # ipc://, or a port chosen at bind (tcp://host:*)
    host, port = m.group(1).strip("[]"), int(m.group(2))
    problem = _bind_problem("0.0.0.0" if host == "*" else host, port)
    if problem:
        raise StartupError(f"--listen {endpoint}: {problem} (another manager there? pick another port)")


def check_metrics_port(port: int, listen: str) -> None:
    """``--metrics-port`` (served on 127.0.0.1): in range, not --listen's port, free."""
    if port == 0:
        return  # off; its range is checked with the other flags (check_manager_flags)
    m = re.fullmatch(r"tcp://(.+):(\d+)", listen)
    if m and int(m.group(2)) == port and m.group(1) in ("127.0.0.1", "localhost", "*", "0.0.0.0"):
        raise StartupError(f"--metrics-port {port}: --listen {listen} takes that port; pick another")
    problem = _bind_problem("127.0.0.1", port)
    if problem:
        raise StartupError(f"--metrics-port {port}: {problem} on 127.0.0.1; pick another port (0: no metrics)")


def _bind_problem(host: str, port: int) -> str | None:
    """Why a listener could not bind ``host:port`` now (None: it could, or ``host`` is no address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ's and the metrics' listeners: TIME_WAIT is free
        try:
            s.bind((host, port))
        except socket.gaierror:
            return None  # an interface name (tcp://eth0:5555): ZeroMQ resolves those itself
        except OSError as exc:
            return exc.strerror
    return None


def check_device(device: str, torch) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StartupError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise StartupError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
