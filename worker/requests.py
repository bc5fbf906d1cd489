"""The client requests a worker serves: validated before any memory is asked for, so a
bad one costs the other clients nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from menos import codecs
from menos.codecs import Codec
from menos.messages import ApplyStep, Backward, ErrorCode, Forward, PrefixSpec
from worker.engine import InputError, ServerEngine
from worker.policy import Job

Request = Forward | Backward | ApplyStep


class RequestError(ValueError):
    """A request refused as it arrived; ``code`` goes back to the client."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def job_for(msg: Request, tensors, engine: ServerEngine, codec: Codec = Codec.NONE) -> tuple[Job, torch.Tensor | None]:
    """The job ``msg`` asks for and its tensor, decoded from the session's codec; or
    RequestError if it does not fit the client's session."""
    if isinstance(msg, ApplyStep):
        if tensors:
            raise RequestError(ErrorCode.BAD_TENSOR, f"ApplyStep carries no tensor, got {len(tensors)}")
        try:
            engine.check_step(msg.step, msg.scale)
        except InputError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return Job.STEP, None
    if engine.pending_sq_norm is not None:  # before any memory is asked for
        raise RequestError(ErrorCode.BAD_REQUEST, f"{type(msg).__name__}: the clipped optimizer step waits for "
                           "its ApplyStep (send it again)")  # fmt: skip
    try:
        if tensors:  # the declared sizes first: decoding allocates
            engine.check_shape(tensors[0].shape, type(msg).__name__)
        x = codecs.decode(tensors, codec, engine.dtype)
        if isinstance(msg, Forward):
            if msg.generate or msg.cached:  # a generation's step (menos.generation)
                engine.check_input(x, "activations")
                try:
                    engine.check_generation(msg, x.shape)
                except InputError as exc:  # the tensor is fine; the request does not fit the session's state
                    raise RequestError(ErrorCode.BAD_REQUEST, f"Forward: {exc}") from None
                return (Job.GENERATE if msg.generate else Job.DECODE), x
            if msg.train and not msg.adapter:
                raise RequestError(ErrorCode.BAD_REQUEST, "a training forward runs with the adapter (adapter=False: eval only)")
            engine.check_input(x, "activations")
            if msg.pads and (len(msg.pads) != x.shape[0] or any(not 0 <= p < x.shape[1] for p in msg.pads)):
                raise RequestError(ErrorCode.BAD_REQUEST, f"Forward: pads {msg.pads}: one per row, each below the "
                                   f"length {x.shape[1]}")  # fmt: skip
            if any(msg.pads) and isinstance(engine.spec, PrefixSpec):
                raise RequestError(ErrorCode.BAD_REQUEST, "Forward: left padding with prefix tuning is not supported")
            return (Job.FORWARD if msg.train else Job.EVAL), x
        if msg.adapter_grads and not engine.opt.driven:
            raise RequestError(ErrorCode.BAD_REQUEST, "Backward(adapter_grads): the session's own optimizer steps "
                               "its adapter (AdapterRequest(drive=True) hands it to the client's)")  # fmt: skip
        engine.check_backward(msg.step, x)
        return Job.BACKWARD, x
    except (InputError, codecs.CodecError) as exc:
        raise RequestError(ErrorCode.BAD_TENSOR, f"{type(msg).__name__}: {exc}") from None


@dataclass
class Serving:
    """The client request being served, and what its reply reports."""

    msg: Request
    x: torch.Tensor | None  # its tensor (none for ApplyStep)
    out: list = field(default_factory=list)
    adapter_grads: list = field(default_factory=list)  # a driven session's, after the backward (raw)
    error: BaseException | None = None
    asked_at: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    swap_s: float = 0.0
