"""A client's settings: the arguments of ``menos.connect``, defined once.

``menos-estimate`` and the estimator take their defaults from here, so a server sized
with the estimator's defaults is sized for a client with connect's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from menos.link import Link
from menos.messages import LoraSpec


@dataclass(frozen=True)
class ClientConfig:
    model: Optional[str] = None  # a local checkpoint dir; None: the manager sends this client's sections
    head_layers: int = 1  # blocks kept on the client before the server's range
    tail_layers: int = 0  # blocks kept on the client after it
    adapter: LoraSpec = field(default_factory=LoraSpec)  # the same adapter on both sides of the cut
    batch_size: int = 4  # the largest batch the client will send
    seq_len: int = 128  # the longest sequence it will send
    lr: float = 1e-4  # AdamW's learning rate, on both sides
    seed: int = 0  # seeds the adapter's initial weights (cut-independent)
    identity: Optional[str] = None  # names the checkpoints on a plain-text server (CURVE: the key does)
    state_dir: Optional[str] = None  # where the client keeps its own sections' checkpoints
    resume: bool = False  # continue from the latest step both sides have a checkpoint of
    client_key: Optional[str] = None  # CURVE: this client's .key_secret file
    server_key: Optional[str] = None  # CURVE: the server's public .key file
    timeout_s: float = 300.0  # how long to wait for any answer
    link: Union[str, Link, None] = None  # emulate a network link, e.g. "50ms,100Mbit" (benchmarks)

    def __post_init__(self):
        if self.adapter is None:
            object.__setattr__(self, "adapter", LoraSpec())
        if isinstance(self.link, str):
            object.__setattr__(self, "link", Link.parse(self.link))
        if (self.client_key is None) != (self.server_key is None):
            raise ValueError("CURVE needs both client_key (your .key_secret file) and server_key (the server's .key)")
        if self.resume and not self.state_dir:
            raise ValueError(f"resume=True needs a state_dir holding a checkpoint (got {self.state_dir!r})")
