"""Where the gateway sends a client: pure, like the scheduler.

Inputs: each manager's reported state (``ManagerView``, from its status and its Ray
actor) and the client's demand (the estimator's M_b token and standing memory, as the
manager's own admission computes them). Output: ``Placed`` or ``Refused``.

A cluster of stages (``--stages K``: each manager holds a range of the blocks) places each stage
of a client's chain on its own: only the managers holding that range are candidates.

Rules, in order: an identity with a session on a live manager goes there (that manager
decides: it waits for a closing session, refuses a second one); a returning identity goes
home, where its checkpoints are, if it fits there; otherwise the least loaded manager it
fits on (fewest clients, then most free memory). "Fits" is the scheduler's own rule
(``Scheduler.room_for``): the sessions' standing memory, this client's, and the largest
token of any of them within the capacity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from menos.chain import blocks_text
from menos.messages import ErrorCode
from menos.sizes import format_size


@dataclass(frozen=True)
class ManagerView:
    id: str
    endpoint: str
    alive: bool
    capacity: int = 0
    standing: int = 0  # the sessions' standing memory (adapter, optimizer, kept input)
    largest_token: int = 0  # the largest M_b token of its sessions
    clients: int = 0
    identities: frozenset = field(default_factory=frozenset)  # of its sessions now
    max_clients: int = 64
    blocks: tuple[int, int] = (0, 0)  # [start, stop) it holds ((0, 0): not known yet)

    def holds(self, server: tuple[int, int] | None) -> bool:
        """It can serve the server range ``server`` (None: any range of the whole base)."""
        return server is None or self.blocks[0] <= server[0] < server[1] <= self.blocks[1]

    @property
    def free(self) -> int:
        return self.capacity - self.standing

    def fits(self, d: "Demand") -> bool:
        return self.standing + d.standing + max(d.m_b, self.largest_token) <= self.capacity

    def with_pending(self, d: "Demand") -> "ManagerView":
        """This view with a client placed here that its status does not show yet."""
        return replace(self, standing=self.standing + d.standing, largest_token=max(self.largest_token, d.m_b),
                       clients=self.clients + 1)  # fmt: skip


@dataclass(frozen=True)
class Demand:
    m_b: int  # the client's M_b token
    standing: int  # its standing memory


@dataclass(frozen=True)
class Placed:
    manager: str
    endpoint: str


@dataclass(frozen=True)
class Refused:
    code: ErrorCode
    message: str


def place(managers: list[ManagerView], demand: Demand, identity: str = "", home: str | None = None,
          server: tuple[int, int] | None = None) -> Placed | Refused:  # fmt: skip
    """``server``: the client's server range, when the managers hold ranges (a cluster's stages)."""
    alive = [m for m in managers if m.alive and m.endpoint]
    live = [m for m in alive if m.holds(server)]
    if not live:
        if alive:
            return Refused(ErrorCode.UNREACHABLE, f"no live manager of the cluster holds blocks {blocks_text(server)} "
                           f"({len(alive)} alive, holding {', '.join(map(blocks_text, stages(alive)))})")  # fmt: skip
        return Refused(ErrorCode.UNREACHABLE, f"no manager of the cluster is alive ({len(managers)} known)")
    if identity:
        for m in live:
            if identity in m.identities:
                return Placed(m.id, m.endpoint)
    room = [m for m in live if m.fits(demand)]
    fitting = [m for m in room if m.clients < m.max_clients]
    if not fitting:
        if room:
            return Refused(ErrorCode.BAD_REQUEST, f"every manager with room is full ({len(room)} at their --max-clients)")
        best = max(live, key=lambda m: m.free)
        return Refused(ErrorCode.TOO_LARGE,
                       f"a backward of this client needs {format_size(demand.m_b)} beside its standing "
                       f"{format_size(demand.standing)}; the largest free capacity in the cluster is "
                       f"{format_size(best.free)} (manager {best.id}, of {len(live)} alive): lower batch_size or seq_len")  # fmt: skip
    for m in fitting:
        if m.id == home:
            return Placed(m.id, m.endpoint)
    best = min(fitting, key=lambda m: (m.clients, -m.free, m.id))
    return Placed(best.id, best.endpoint)


def stages(managers: list[ManagerView]) -> list[tuple[int, int]]:
    """The ranges the live managers hold, in order: a chain's stages (one range: no chain)."""
    return sorted({m.blocks for m in managers if m.alive and m.endpoint})
