"""The client requests a worker serves: validated before any memory is asked for, so a
bad one costs the other clients nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from menos.messages import ApplyStep, Backward, ErrorCode, Forward
from worker.engine import InputError, ServerEngine
from worker.policy import Job

Request = Forward | Backward | ApplyStep


class RequestError(ValueError):
    """A request refused as it arrived; ``code`` goes back to the client."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def job_for(msg: Request, tensors, engine: ServerEngine) -> Job:
    """The job ``msg`` asks for, or RequestError if it does not fit the client's session."""
    want = 0 if isinstance(msg, ApplyStep) else 1
    if len(tensors) != want:
        raise RequestError(ErrorCode.BAD_TENSOR, f"{type(msg).__name__} carries {want} tensor(s), got {len(tensors)}")
    try:
        if isinstance(msg, Forward):
            engine.check_input(tensors[0], "activations")
            return Job.FORWARD if msg.train else Job.EVAL
        if isinstance(msg, Backward):
            engine.check_backward(msg.step, tensors[0])
            return Job.BACKWARD
        engine.check_step(msg.step, msg.scale)
        return Job.STEP
    except InputError as exc:
        raise RequestError(ErrorCode.BAD_REQUEST if want == 0 else ErrorCode.BAD_TENSOR, str(exc)) from None


@dataclass
class Serving:
    """The client request being served, and what its reply reports."""

    msg: Request
    x: torch.Tensor | None  # its tensor (none for ApplyStep)
    out: list = field(default_factory=list)
    error: BaseException | None = None
    asked_at: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    swap_s: float = 0.0
