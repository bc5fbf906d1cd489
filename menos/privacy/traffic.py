"""What crossed the cut for one victim run, as the server saw it; nothing else.

Only tensors the server received or sent are here: no token ids, no labels, no losses.
Attacks (``menos.privacy.attacks``) get this record and the public base, nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Step:
    """One training step's tensors at the cut, keyed by the client's step number."""

    step: int
    received: torch.Tensor | None = None  # x_c (B, T, H): the client's head output, decoded as the server does
    sent: torch.Tensor | None = None  # h (B, T, H): the server's output, what it sent back
    gradient: torch.Tensor | None = None  # g_c (B, T, H): dloss/dh, as received from the client


@dataclass
class Traffic:
    """The cut (head_layers, tail_layers), the codec, and per training step what crossed it."""

    head_layers: int = 0
    tail_layers: int = 0
    codec: str = "none"
    dtype: str = "float32"  # the session's dtype (the Welcome's): the codec decodes to it
    steps: dict[int, Step] = field(default_factory=dict)

    def step(self, n: int) -> Step:
        return self.steps.setdefault(n, Step(n))

    def complete(self) -> list[Step]:
        """Steps with their forward's activations, in order (a step the tap saw half of is left out)."""
        return [s for _, s in sorted(self.steps.items()) if s.received is not None]
