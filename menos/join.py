"""Joining a server: the Hello's round trips, and the server checkpoints a client carries.

A client's endpoint is a manager or a cluster's gateway. The gateway answers the Hello
with a ``Redirect`` to the manager it placed the client on; the client says Hello there. A
cluster whose managers hold ranges of the base (``--stages``) answers a Hello for a range none
holds whole with a ``Chain`` of the ranges: the client then says Hello through the gateway once
per stage, with its range (``menos.client``).
A manager that lacks the server checkpoint the client resumes from (it never ran this
client: its first manager died) answers ``StateWanted``, and the client sends the Hello
again with its copy of that checkpoint. A client carries those copies when it came
through a gateway (or with ``carry_server_state=True``): each time both sides
checkpoint, it fetches the server's file into STATE_DIR/server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgspec
import torch

from menos import checkpoint
from menos.channel import Channel
from menos.keys import CurveKeys
from menos.messages import Chain, Hello, Redirect, ServerCheckpoint, StateRequest, StateWanted, Welcome


def carried_dir(state_dir: str, blocks: tuple[int, int] | None = None) -> str:
    """Where a client keeps its server's checkpoints; a chain's stage (``blocks``) has its own."""
    return os.path.join(state_dir, "server" if blocks is None else f"server-{blocks[0]}-{blocks[1]}")


def carried_step(carry_dir: str | None, own_steps) -> int:
    """The latest step of which the client holds both its own and the server's checkpoint
    (in ``carry_dir``); -1 if none."""
    if not carry_dir:
        return -1
    both = set(own_steps) & set(checkpoint.steps(carry_dir))
    return max(both, default=-1)


@dataclass
class Joined:
    chan: Channel | None
    endpoint: str  # the manager's (after a redirect, not the gateway's)
    welcome: Welcome | None
    manager: str = ""  # the manager's id in a cluster ("" when connected to a manager directly)
    chain: Chain | None = None  # instead of the rest: a gateway's cluster serves this client as a chain


def join(endpoint: str, hello: Hello, cfg, curve: CurveKeys | None, carry_dir: str | None) -> Joined:
    """Say Hello at ``endpoint`` (following one redirect); the Welcome and the channel it came on,
    or, from a gateway of stages, its ``Chain`` alone (no channel, no Welcome).
    ``carry_dir``: where the server checkpoints the client carries are (``carried_dir``; None: nowhere).
    Raises MenosError as the server or the connection does; the channel is closed then."""
    chan = _open(endpoint, cfg, curve)
    manager = ""
    try:
        chan.send(hello)
        reply, _ = chan.recv((Welcome, Redirect, StateWanted, Chain))
        if isinstance(reply, Chain):  # a cluster of stages: a Hello per stage, with its range
            chan.close()
            return Joined(None, endpoint, None, chain=reply)
        if isinstance(reply, Redirect):  # a gateway: the manager it chose serves us from now on
            chan.close()
            endpoint, manager = reply.endpoint, reply.manager
            chan = _open(endpoint, cfg, curve)
            chan.send(hello)
            reply, _ = chan.recv((Welcome, StateWanted))
        if isinstance(reply, StateWanted):
            if reply.step != hello.carried_step:
                raise ValueError(f"the server wants the checkpoint of step {reply.step}, we offered {hello.carried_step}")
            data = bytearray(checkpoint.read_bytes(carry_dir, reply.step))
            chan.send(hello, [torch.frombuffer(data, dtype=torch.uint8)])
            reply, _ = chan.recv(Welcome)
    except BaseException:
        chan.close()
        raise
    return Joined(chan, endpoint, reply, manager)


def _open(endpoint: str, cfg, curve) -> Channel:
    chan = Channel(endpoint, cfg.timeout_s, curve, cfg.link)
    try:
        chan.wait_connected(cfg.connect_timeout_s)  # unreachable, or CURVE on one side only: say so now
    except BaseException:
        chan.close()
        raise
    return chan


def fetch_server_checkpoint(chan: Channel, carry_dir: str) -> int:
    """Copy the server's latest checkpoint into ``carry_dir`` (``carried_dir``); returns its step."""
    chan.send(StateRequest())
    reply, tensors = chan.recv(ServerCheckpoint)
    if len(tensors) != 1:
        raise ValueError(f"a ServerCheckpoint carries one frame, got {len(tensors)}")
    checkpoint.write_bytes(carry_dir, reply.step, tensors[0].numpy().tobytes())
    return reply.step


def hello_carrying(hello: Hello, carry_dir: str | None) -> Hello:
    """``hello`` offering the server checkpoint the client holds (in ``carry_dir``) for its resume step."""
    if not hello.resume_steps:
        return hello
    return msgspec.structs.replace(hello, carried_step=carried_step(carry_dir, hello.resume_steps))
