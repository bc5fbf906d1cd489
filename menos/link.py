"""An emulated network link for the client transport (benchmarks).

Split learning across the Internet spends most of an iteration in transit; on
loopback that gap vanishes, and with it the idle time that Menos lends to other
clients. ``Link`` puts it back: every message a client sends or receives is delayed
by the one-way latency plus its size over the bandwidth. Each client has its own link
(clients sit in different places); the server's side is not slowed down.

    Link.parse("50ms,100Mbit")   # 50 ms one way, 100 Mbit/s
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


@dataclass(frozen=True)
class Link:
    latency_s: float = 0.0  # one way
    bandwidth_bps: float = math.inf  # bits per second

    @classmethod
    def parse(cls, spec: str) -> "Link":
        """'LATENCY,BANDWIDTH', e.g. '50ms,100Mbit', '20ms,1Gbit', '0ms,inf'."""
        parts = [p.strip().lower() for p in spec.split(",")]
        if len(parts) != 2:
            raise ValueError(f"link {spec!r}: expected LATENCY,BANDWIDTH such as 50ms,100Mbit")
        m = re.fullmatch(r"([0-9.]+)\s*(us|ms|s)", parts[0])
        if not m:
            raise ValueError(f"link latency {parts[0]!r}: expected a number with us, ms or s")
        latency = float(m.group(1)) * _TIME[m.group(2)]
        if parts[1] == "inf":
            bandwidth = math.inf
        else:
            m = re.fullmatch(r"([0-9.]+)\s*(bit|kbit|mbit|gbit)", parts[1])
            if not m or float(m.group(1)) <= 0:
                raise ValueError(f"link bandwidth {parts[1]!r}: expected a positive number with bit, Kbit, Mbit or Gbit")
            bandwidth = float(m.group(1)) * _RATE[m.group(2)]
        return cls(latency, bandwidth)

    def delay_s(self, nbytes: int) -> float:
        """Seconds a message of ``nbytes`` spends in transit."""
        return self.latency_s + nbytes * 8 / self.bandwidth_bps

    def transit(self, nbytes: int) -> None:
        d = self.delay_s(nbytes)
        if d > 0:
            time.sleep(d)

    def __str__(self) -> str:
        bw = "inf" if math.isinf(self.bandwidth_bps) else f"{self.bandwidth_bps / 1e6:g}Mbit"
        return f"{self.latency_s * 1e3:g}ms,{bw}"
