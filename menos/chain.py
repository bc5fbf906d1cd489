"""A chain of managers: the server's range split across several, one stage each.

A base too large for one device is served by several managers, each holding a range of its
blocks (``menos-manager start --blocks A:B``). A client connects to all of them
(``menos.connect([ep1, ep2, ...])``) and relays between them: its forward goes head -> stage 1
-> ... -> stage K -> tail, and its backward comes back in reverse, so no manager needs to reach
another and the client sees every boundary (as in Petals). Each stage is a session of its own
(worker, adapter part, memory token, checkpoints).

This module is the pure part: which blocks each stage serves for a client, and what is wrong
with a chain that cannot serve it. ``menos.client`` does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from menos.errors import MenosError
from menos.messages import ErrorCode


@dataclass(frozen=True)
class Serves:
    """What one manager says it serves (from its Status)."""

    endpoint: str
    model: str
    layers: int  # blocks in the whole model
    blocks: tuple[int, int]  # [start, stop) that it holds
    digest: str  # menos.models.base_digest of its base


def plan(serving: list[Serves], head_layers: int, tail_layers: int,
         skip_outside: bool = False) -> list[tuple[Serves, tuple[int, int]]]:  # fmt: skip
    """Each stage, in the order the forward visits them, with the blocks it runs for a client that
    keeps ``head_layers`` blocks before the server's range and ``tail_layers`` after it. The stages'
    ranges must cover that range exactly once: MenosError(BAD_REQUEST) names a gap, an overlap, a
    stage outside the range (``skip_outside``: left out, as a cluster's stages a client does not
    reach), or stages of different bases."""
    if not serving:
        raise MenosError(ErrorCode.BAD_REQUEST, "a chain needs at least one manager's endpoint")
    first = serving[0]
    if first.layers < 1:
        raise MenosError(ErrorCode.PROTOCOL, f"{first.endpoint} does not say how many blocks its model has: a "
                         "manager of an older Menos release, which serves no chain")  # fmt: skip
    for s in serving[1:]:
        if (s.digest, s.layers) != (first.digest, first.layers):
            raise MenosError(ErrorCode.MODEL_MISMATCH, f"{s.endpoint} serves another base than {first.endpoint} "
                             f"({s.model!r}, {s.layers} blocks, digest {s.digest[:12]} against {first.model!r}, "
                             f"{first.layers} blocks, digest {first.digest[:12]}): every stage of a chain must serve "
                             "the same checkpoint")  # fmt: skip
    layers = first.layers
    start, stop = head_layers, layers - tail_layers
    if not 0 <= start < stop <= layers:
        raise MenosError(ErrorCode.BAD_REQUEST, f"head_layers={head_layers}, tail_layers={tail_layers} leave no "
                         f"block for the server (the model has {layers})")  # fmt: skip
    ordered = sorted(serving, key=lambda s: s.blocks)
    if skip_outside:
        ordered = [s for s in ordered if s.blocks[1] > start and s.blocks[0] < stop] or ordered
    out, at = [], start
    for s, nxt in zip(ordered, [*ordered[1:], None]):
        a, b = s.blocks
        if b <= start or a >= stop:
            raise MenosError(ErrorCode.BAD_REQUEST, f"{s.endpoint} holds blocks {blocks_text(s.blocks)}, outside this "
                             f"client's server range {blocks_text((start, stop))} (head_layers={head_layers}, "
                             f"tail_layers={tail_layers}): leave it out of the chain")  # fmt: skip
        if a > at:
            raise MenosError(ErrorCode.BAD_REQUEST, f"no stage holds blocks {blocks_text((at, a))}: the chain "
                             f"{_ranges(ordered)} has a gap (this client's server range is {blocks_text((start, stop))})")
        if nxt is not None and nxt.blocks[0] < b:
            raise MenosError(ErrorCode.BAD_REQUEST, f"{s.endpoint} and {nxt.endpoint} both hold blocks "
                             f"{blocks_text((nxt.blocks[0], min(b, nxt.blocks[1])))}: the chain {_ranges(ordered)} "
                             "overlaps; give each block to one stage")  # fmt: skip
        out.append((s, (at, min(b, stop))))
        at = min(b, stop)
    if at < stop:
        raise MenosError(ErrorCode.BAD_REQUEST, f"no stage holds blocks {blocks_text((at, stop))}: the chain "
                         f"{_ranges(ordered)} ends before this client's tail (tail_layers={tail_layers}); add a "
                         "stage, or keep those blocks on the client with a larger tail_layers")  # fmt: skip
    return out


def split_range(start: int, stop: int, k: int) -> list[tuple[int, int]]:
    """Blocks [start, stop) as ``k`` contiguous ranges, as even as they go (the earlier ones
    smaller): the stages of a cluster's chains (``menos-cluster start --stages K``)."""
    n = stop - start
    if not 1 <= k <= n:
        raise ValueError(f"{k} stages: the server's range {start}..{stop - 1} has {n} blocks")
    edges = [start + (n * i) // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def combine(replies: list):
    """One reply for a request every stage answered (in the order it visited them): the last
    one's, with every stage's times summed, the latest checkpoint ALL stages saved (the least
    step any of them reports), and the sum of their adapters' squared gradient norms (clipping's
    global norm spans every stage). One stage's reply is returned as it is."""
    if len(replies) == 1:
        return replies[0]
    last = replies[-1]
    fields = {f: sum(getattr(r, f) for r in replies) for f in ("compute_s", "queue_s", "swap_s")}
    if hasattr(last, "checkpoint"):
        fields["checkpoint"] = min(r.checkpoint for r in replies)
    if hasattr(last, "grad_sq_norm"):
        norms = [r.grad_sq_norm for r in replies]
        if len({n is None for n in norms}) > 1:
            raise MenosError(ErrorCode.PROTOCOL, f"step {last.step}: the stages' optimizers are out of step "
                             "(some end an optimizer step, some do not)")  # fmt: skip
        fields["grad_sq_norm"] = None if norms[0] is None else sum(norms)
    return msgspec.structs.replace(last, **fields)


def stage_of(name: str, layers_prefix: str, ranges: list[tuple[int, int]]) -> int | None:
    """The index of the stage whose blocks hold parameter ``name`` (None: not a block's)."""
    if not name.startswith(layers_prefix):
        return None
    block = int(name[len(layers_prefix):].split(".", 1)[0])
    return next((i for i, (a, b) in enumerate(ranges) if a <= block < b), None)


def blocks_text(r) -> str:
    """Blocks [a, b) as people read them: "a..b-1"."""
    return f"{r[0]}..{r[1] - 1}"


def _ranges(serving: list[Serves]) -> str:
    return "[" + ", ".join(blocks_text(s.blocks) for s in serving) + "]"
