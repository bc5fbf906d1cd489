"""A server checkpoint that a client carries in: resuming on a manager that never ran it.

In a cluster the client keeps a copy of each server checkpoint (``StateRequest``), so
that it can resume on any manager without a filesystem shared between nodes. A Hello
with ``carried_step`` whose checkpoint this manager lacks is answered ``StateWanted``;
the client sends the Hello again with the file as one uint8 frame, stored here before
admission looks for the identity's checkpoints.
"""

from __future__ import annotations

from manager.sessions import checkpoint_dir
from menos import checkpoint, wire
from menos.messages import Error, ErrorCode, Hello, StateWanted


def take(hello: Hello, identity: str, frames, state_dir: str) -> StateWanted | Error | None:
    """Store the carried checkpoint if it is needed and sent; None: go on to admission."""
    if hello.carried_step < 0 or not identity:
        return None
    directory = checkpoint_dir(state_dir, identity)
    if hello.carried_step in checkpoint.steps(directory):
        return None  # this manager has it (it ran the identity's session)
    if frames is None or len(frames) < 2:
        return StateWanted(step=hello.carried_step)
    try:
        _, tensors = wire.decode(frames)
        if len(tensors) != 1 or tensors[0].dim() != 1 or tensors[0].dtype != wire.dtype_from_name("uint8"):
            raise ValueError("a carried checkpoint is one 1-d uint8 tensor frame")
        checkpoint.write_bytes(directory, hello.carried_step, tensors[0].numpy().tobytes())
    except (ValueError, OSError) as exc:  # WireError is a ValueError
        return Error(code=ErrorCode.BAD_REQUEST, message=f"the carried checkpoint of step {hello.carried_step}: {exc}")
    return None
