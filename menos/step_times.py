"""A client's per-step timings: where each split iteration's time went."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class StepTimes:
    """Per-step timings, seconds (the paper's Tables 1-3 break an iteration down like this).

    total: the whole train step on the client; server_compute: the server's compute
    under its memory grants; server_queue: waiting for grants (scheduling time);
    server_swap: swapping the task back in (vanilla baseline only; the paper counts it
    as scheduling time); communication: round trips minus the server's share
    (network, emulated link and serialization).
    """

    total: list[float] = field(default_factory=list)
    server_compute: list[float] = field(default_factory=list)
    server_queue: list[float] = field(default_factory=list)
    server_swap: list[float] = field(default_factory=list)
    communication: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)  # per step, every frame (the cut layer's codec shows here)
    bytes_received: list[int] = field(default_factory=list)

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Medians over the steps after the first ``skip`` (warm-up)."""
        med = lambda xs: statistics.median(xs[skip:]) if xs[skip:] else float("nan")  # noqa: E731
        return {"steps": len(self.total), "s_per_step": med(self.total),
                "server_compute_s": med(self.server_compute), "server_queue_s": med(self.server_queue),
                "server_swap_s": med(self.server_swap), "communication_s": med(self.communication),
                "bytes_sent": med(self.bytes_sent), "bytes_received": med(self.bytes_received)}  # fmt: skip
