"""A client's settings: the arguments of ``menos.connect``, defined once.

``menos-estimate`` and the estimator take their defaults from here, so a server sized
with the estimator's defaults is sized for a client with connect's defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from menos.adapter_spec import adapter_spec
from menos.codecs import Codec
from menos.defences import Defence, parse as parse_defence
from menos.link import Link
from menos.messages import LoraSpec, Recipe, Schedule
from menos.schedule import validate


@dataclass(frozen=True)
class ClientConfig:
    model: Optional[str] = None  # a local checkpoint dir; None: the manager sends this client's sections
    head_layers: int = 1  # blocks kept on the client before the server's range
    tail_layers: int = 0  # blocks kept on the client after it
    # The adapter on both sides of the cut: a peft.LoraConfig / IA3Config / PrefixTuningConfig,
    # or menos.LoraSpec / IA3Spec / PrefixSpec (menos.adapter_spec).
    adapter: Any = field(default_factory=LoraSpec)
    batch_size: int = 4  # the largest batch the client will send
    seq_len: int = 128  # the longest sequence it will send
    # The recipe, as the transformers Trainer's arguments, run in lockstep on both sides:
    lr: float = 1e-4  # AdamW's peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    lr_schedule: Union[str, Schedule] = "constant"  # "constant", "linear" or "cosine"
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    total_steps: int = 0  # optimizer steps the linear / cosine schedule decays over
    max_grad_norm: float = 0.0  # clip the global norm over ALL adapter parameters (0: off)
    grad_accum_steps: int = 1  # micro-batches (train_step calls) per optimizer step
    seed: int = 0  # seeds the adapter's initial weights (cut-independent)
    identity: Optional[str] = None  # names the checkpoints on a plain-text server (CURVE: the key does)
    state_dir: Optional[str] = None  # where the client keeps its own sections' checkpoints
    resume: bool = False  # continue from the latest step both sides have a checkpoint of
    # Keep a copy of the server's checkpoints in STATE_DIR/server, to resume on a manager that
    # never ran this client. None: when connected through a cluster's gateway.
    carry_server_state: Optional[bool] = None
    client_key: Optional[str] = None  # CURVE: this client's .key_secret file
    server_key: Optional[str] = None  # CURVE: the server's public .key file
    timeout_s: float = 300.0  # how long to wait for any answer
    connect_timeout_s: float = 10.0  # how long to wait for the connection and its handshake
    link: Union[str, Link, None] = None  # emulate a network link, e.g. "50ms,100Mbit" (benchmarks)
    compression: Union[str, Codec, None] = None  # the cut layer's codec: None, "bf16", "fp16", "int8"
    # Start from a trained PEFT adapter (a directory save_adapter wrote, or any PEFT adapter of
    # a supported method for this base); its method replaces ``adapter``.
    init_adapter: Optional[str] = None
    # Applied to the activations before they are sent (menos.defences): None, "noise:0.5",
    # "clip:2+noise:0.5", "nopeek:0.1"; the server needs no change to serve it.
    defence: Union[str, Defence, None] = None

    def __post_init__(self):
        for name in ("model", "state_dir", "client_key", "server_key", "init_adapter"):  # "~/..." as a shell would
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, os.path.expanduser(value))
        object.__setattr__(self, "adapter", adapter_spec(self.adapter))
        if self.init_adapter is not None:
            self._take_init_adapter()
        object.__setattr__(self, "compression", Codec.parse(self.compression))
        object.__setattr__(self, "defence", parse_defence(self.defence))
        try:
            object.__setattr__(self, "lr_schedule", Schedule(self.lr_schedule))
        except ValueError:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: one of {[s.value for s in Schedule]}") from None
        validate(self.recipe)
        if isinstance(self.link, str):
            object.__setattr__(self, "link", Link.parse(self.link))
        if (self.client_key is None) != (self.server_key is None):
            raise ValueError("CURVE needs both client_key (your .key_secret file) and server_key (the server's .key)")
        if self.resume and not self.state_dir:
            raise ValueError(f"resume=True needs a state_dir holding a checkpoint (got {self.state_dir!r})")

    def _take_init_adapter(self) -> None:
        from menos.export import peft_adapter_spec  # PEFT: only when asked

        if self.resume:
            raise ValueError("init_adapter and resume=True both say where the adapter comes from: pass one")
        spec = peft_adapter_spec(self.init_adapter)
        if self.adapter not in (spec, type(self.adapter)(), LoraSpec()):  # connect's default, or a method's, is no choice
            raise ValueError(f"adapter={self.adapter} but init_adapter={self.init_adapter!r} holds {spec}: "
                             "leave adapter out (the directory's method is used)")  # fmt: skip
        object.__setattr__(self, "adapter", spec)

    @property
    def recipe(self) -> Recipe:
        return Recipe(lr=self.lr, weight_decay=self.weight_decay, lr_schedule=self.lr_schedule,
                      warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                      max_grad_norm=self.max_grad_norm, grad_accum_steps=self.grad_accum_steps)  # fmt: skip
