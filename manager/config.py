"""The manager's configuration: one dataclass; the command line is derived from it."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional

from menos.codecs import Codec
from menos.messages import Policy
from menos.quantization import CHOICES as QUANTIZATIONS


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "menos")


@dataclass
class ManagerConfig:
    model: Optional[str] = field(
        default=None,
        metadata={"help": "local Hugging Face checkpoint directory (config.json + safetensors), or builtin: "
                  "the built-in small Llama with seeded random weights (the default)"},
    )  # fmt: skip
    device: str = field(default="cpu", metadata={"help": "where the base weights live: cpu, cuda or cuda:N"})
    dtype: str = field(
        default="float32", metadata={"help": "dtype of the base weights", "choices": ("float32", "bfloat16", "float16")}
    )
    quantization: str = field(
        default="none",
        metadata={"help": "store the server's block Linears quantized, ONE copy for every client (QLoRA): nf4 or "
                  "fp4 (4-bit, bitsandbytes) or int8 (LLM.int8); --dtype is then the compute dtype and the "
                  "clients' own sections keep it; needs pip install 'menos[qlora]'",
                  "choices": QUANTIZATIONS},
    )  # fmt: skip
    listen: str = field(
        default="tcp://127.0.0.1:5555",
        metadata={"help": "client endpoint; port * picks a free one (written to STATE_DIR/manager.json)"},
    )
    state_dir: str = field(
        default_factory=_default_state_dir, metadata={"help": "keys, checkpoints and run files"}
    )
    insecure: bool = field(
        default=False,
        metadata={"help": "allow plain text (no CURVE keys) on an address other than 127.0.0.1/localhost/ipc"},
    )
    memory_capacity: Optional[str] = field(
        default=None,
        metadata={"help": "bytes the scheduler may grant for activations, e.g. 6GiB; "
                  "default: half the available memory (CPU) or the free GPU memory (CUDA)"},
    )  # fmt: skip
    memory_share: float = field(
        default=1.0,
        metadata={"help": "the fraction of the device's memory this manager counts on for its default capacity: "
                  "managers that share a device split it (menos-cluster sets 1/N for N managers on a node)"},
    )  # fmt: skip
    free_memory_file: Optional[str] = field(
        default=None,
        metadata={"help": "read the device's free bytes from this file instead of NVML (CUDA) or the "
                  "kernel (CPU); for tests and for rehearsing a busy device"},
    )  # fmt: skip
    policy: str = field(
        default="on-demand",
        metadata={"help": "on-demand: forwards keep nothing, backwards recompute (Menos); preserve: forwards keep "
                  "activations and their memory until the backward; adaptive: keep them while memory is "
                  "plentiful, drop them when someone waits", "choices": ("on-demand", "preserve", "adaptive")},
    )  # fmt: skip
    baseline: str = field(
        default="none",
        metadata={"help": "vanilla: run the baseline instead of Menos (each worker its own copy of its blocks, "
                  "activations kept, the task's memory held between iterations and swapped out when another "
                  "task needs it: to the weights file on CPU, to host memory on CUDA)", "choices": ("none", "vanilla")},
    )  # fmt: skip
    backfill: str = field(
        default="fcfs",
        metadata={"help": "fcfs: backfill behind a head that fits (paper); easy: also pass a blocked head "
                  "when that cannot delay it", "choices": ("fcfs", "easy")},
    )  # fmt: skip
    metrics_port: int = field(default=0, metadata={"help": "serve Prometheus metrics on 127.0.0.1:PORT (0: off)"})
    trace: Optional[str] = field(default=None, metadata={"help": "write every scheduler event, park and wake to this JSONL file"})
    checkpoint_every: int = field(
        default=10, metadata={"help": "training steps between server-side checkpoints (0: only when a session ends)"}
    )
    client_timeout: float = field(
        default=60.0, metadata={"help": "seconds without a message or heartbeat before a client counts as gone"}
    )
    min_head_layers: int = field(
        default=1, metadata={"help": "blocks every client keeps before the server's range; the manager holds only "
                             "the blocks from there on (and no embedding or output head), and refuses fewer"},
    )  # fmt: skip
    blocks: Optional[str] = field(
        default=None, metadata={"help": "A:B: hold and serve only blocks A..B-1, as one stage of a chain of managers "
                                "(clients connect to every stage: menos.connect([ep1, ep2, ...])); replaces "
                                "--min-head-layers; default: --min-head-layers to the last block"},
    )  # fmt: skip
    heartbeat: float = field(default=5.0, metadata={"help": "seconds between the heartbeats clients send"})
    max_clients: int = field(default=64, metadata={"help": "concurrent sessions, parked ones included; more are refused"})
    park_after: float = field(
        default=0.0, metadata={"help": "seconds without a request after which a session parks: its worker saves its "
                               "state and exits, and its next request starts a new one (0: never)"},
    )  # fmt: skip
    max_workers: int = field(
        default=0, metadata={"help": "worker processes at most (0: one per session); when a request needs one more, "
                             "the least recently used idle session parks, and the request waits in order"},
    )  # fmt: skip
    no_adapter_export: bool = field(
        default=False, metadata={"help": "refuse to send clients the server part of their adapter"}
    )
    reject_nonfinite: bool = field(default=False, metadata={"help": "refuse tensors holding NaN or Inf"})
    compression_allowed: str = field(
        default="none,bf16,fp16,int8", metadata={"help": "the cut-layer codecs clients may declare, comma-separated"}
    )
    max_message_bytes: int = field(default=1 << 30, metadata={"help": "largest inbound client message frame"})
    worker_threads: int = field(
        default=1, metadata={"help": "torch CPU threads per worker (0: torch's default); keep cores for many workers"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING"})

    @property
    def codecs(self) -> frozenset:
        """``compression_allowed`` parsed (ValueError names an unknown codec)."""
        return frozenset(Codec.parse(c.strip()) for c in self.compression_allowed.split(",") if c.strip())

    @property
    def block_range(self) -> tuple[int, int]:
        """The blocks served, [start, stop); stop 0: to the last (``blocks`` parsed; ValueError says why not)."""
        if self.blocks is None:
            return self.min_head_layers, 0
        return parse_blocks(self.blocks)

    @property
    def worker_policy(self) -> Policy:
        """What workers run: the scheduling policy, or the vanilla baseline."""
        return Policy.VANILLA if self.baseline == "vanilla" else Policy(self.policy)


def parse_blocks(text: str) -> tuple[int, int]:
    """"A:B" -> (A, B): blocks A..B-1, 0 <= A < B."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if m is None or int(m[1]) >= int(m[2]):
        raise ValueError("A:B with 0 <= A < B, e.g. 1:12 for blocks 1 to 11")
    return int(m[1]), int(m[2])


def add_arguments(parser: argparse.ArgumentParser, cls=ManagerConfig) -> None:
    """One flag per field: --field-name, with the field's help, type and default."""
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kwargs = {"default": default, "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.type in ("bool", bool):
            kwargs["action"] = "store_true"
        elif f.type in ("int", int, "float", float):
            kwargs["type"] = int if f.type in ("int", int) else float
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


_PATHS = ("model", "state_dir", "free_memory_file", "trace")  # "~/..." expanded as a shell would


def from_args(args: argparse.Namespace, cls=ManagerConfig):
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    if values.get("model") == "builtin":  # as menos-estimate takes it (a directory of that name: ./builtin)
        values["model"] = None
    for name in _PATHS:
        if isinstance(values.get(name), str):
            values[name] = os.path.expanduser(values[name])
    return cls(**values)
