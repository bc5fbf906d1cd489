"""The protocol's vocabulary: policies, session states, grant kinds and error codes.

They travel as their string values and are validated on decode (``menos.messages``
re-exports them: import them from there).
"""

from __future__ import annotations

import enum


class Policy(str, enum.Enum):
    """What a worker runs: a Menos scheduling policy, or the vanilla baseline."""

    ON_DEMAND = "on-demand"  # the paper's Menos: forwards keep only x_c, backwards recompute
    PRESERVE = "preserve"  # forwards keep their activations and M_b until the backward
    ADAPTIVE = "adaptive"  # preserve while memory is plentiful, on-demand under pressure
    VANILLA = "vanilla"  # the baseline: the worker's own copy of its blocks, swapped


class SessionState(str, enum.Enum):
    STARTING = "starting"  # the worker loads and profiles
    IDLE = "idle"  # holds no grant, waits for its client
    WAITING = "waiting"  # asked for a memory grant
    COMPUTING = "computing"  # holds a grant and computes (vanilla: an iteration is open)
    HOLDING = "holding"  # holds a reclaimable grant between computes (kept activations, a resident task)
    GENERATING = "generating"  # holds a generation's cache token between its token steps
    CLOSING = "closing"  # the session ended; its worker checkpoints and exits
    FAILED = "failed"  # the worker could not start; it exits
    PARKING = "parking"  # idle: its worker saves the session's state and exits (manager.parking)
    PARKED = "parked"  # no worker process: its state waits in the run directory for its next request
    WAKING = "waking"  # a request came for a parked session: a worker restores it (or waits for a slot)


class TokenKind(str, enum.Enum):
    """What a memory grant is for."""

    FORWARD = "forward"
    EVAL = "eval"
    BACKWARD = "backward"
    TASK = "task"  # vanilla: the whole task resident (its blocks and activations)
    STEP = "step"  # a clipped optimizer step on the accumulated adapter gradients
    LOAD = "load"  # vanilla: loading and profiling the task at start-up
    CACHE = "cache"  # a generation: its key/value cache and one forward, held from the prompt to its end


class ErrorCode(str, enum.Enum):
    """Every error code a client can see: from the server, or raised by the client library."""

    BAD_MESSAGE = "bad_message"  # does not decode, or not a message this side accepts
    BAD_TENSOR = "bad_tensor"  # a tensor that does not match what the client declared
    BAD_REQUEST = "bad_request"  # well-formed but not allowed now (wrong step, busy)
    UNKNOWN_SESSION = "unknown_session"
    TOO_LARGE = "too_large"  # needs more memory than the server's capacity
    WORKER_FAILED = "worker_failed"  # the session's worker could not start
    WORKER_DIED = "worker_died"
    NO_CHECKPOINT = "no_checkpoint"  # resume asked for, nothing matching on the server
    UNAUTHORIZED = "unauthorized"  # CURVE: the server refused this client's key
    FORBIDDEN = "forbidden"  # the operator disabled this (e.g. adapter export)
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"  # the server failed on a valid request
    PROTOCOL = "protocol"  # client side: the server answered with an unexpected message
    MODEL_MISMATCH = "model_mismatch"  # client side: the local checkpoint is not the server's model
    TIMEOUT = "timeout"  # client side: no answer in time
    UNREACHABLE = "unreachable"  # client side: nothing answered at the endpoint
    HANDSHAKE = "handshake"  # client side: connected, but the encryption handshake failed (CURVE on one side only)
    CLOSED = "closed"  # client side: the client was closed
    DISCONNECTED = "disconnected"  # client side: the server closed the connection (its process died?)
