"""Every message that crosses a process boundary, defined once.

Messages are msgspec structs, tagged so that one decoder validates any of them
against its schema (types, required fields) before the program sees it. Tensors
never sit inside a message: they travel as raw frames after the header, described
by ``TensorMeta`` entries (see ``menos.wire``). Nothing here is ever pickled.

Who sends what:

    client  -> manager: Hello, Forward, Backward, AdapterRequest, Bye, StatusRequest, Heartbeat
    manager -> client : Welcome, Activations, Gradients, AdapterState, Error, Status
    worker  -> manager: WorkerHello, WorkerReady, WorkerFailed, TokenRequest,
                        TokenRelease, and client-bound Activations/Gradients/Error
    manager -> worker : WorkerSetup, TokenGrant, Reclaim, Shutdown, and the
                        client's Forward/Backward/Bye
    (worker -> manager also: TokenHold, when a kept forward becomes reclaimable, or the
     vanilla baseline's task becomes resident)
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec

PROTOCOL_VERSION = 1


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    """Base of every message; ``type`` is the tag on the wire."""


# --------------------------------------------------------------------------- shared parts


class LoraSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A LoRA adapter, applied the same way to the client's and the server's blocks."""

    r: int = 8  # rank (paper default)
    alpha: int = 16  # scaling numerator: delta W = (alpha / r) * B @ A
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # Linear names inside each block


class TensorMeta(msgspec.Struct, frozen=True, array_like=True):
    """Describes one raw tensor frame: dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """First frame of every multipart message: the message and its tensor frames."""

    msg: "Message"
    tensors: tuple[TensorMeta, ...] = ()


class SharedEntry(msgspec.Struct, frozen=True, array_like=True):
    """One base tensor inside the shared block: name(s), dtype, shape, byte offset."""

    names: tuple[str, ...]  # tied weights share one entry
    dtype: str
    shape: tuple[int, ...]
    offset: int


class SharedHandle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a worker needs to map the manager's base weights without copying."""

    kind: str  # "cpu-shm" or "cuda-ipc"; "file": the vanilla baseline's private copies
    size: int  # bytes of the one shared block (or file)
    entries: tuple[SharedEntry, ...]
    segment: str = ""  # cpu-shm: the POSIX shared-memory name; file: its path
    cuda: Optional[dict] = None  # cuda-ipc: plain-data rebuild arguments (menos.sharing)


# --------------------------------------------------------------------------- client <-> server


class Hello(_Msg, tag="hello"):
    protocol: int
    head_layers: int = 1  # blocks on the client before the server range
    tail_layers: int = 0  # blocks on the client after the server range
    adapter: LoraSpec = LoraSpec()
    batch_size: int = 4  # largest batch the client will send
    seq_len: int = 128  # longest sequence the client will send
    lr: float = 1e-4
    seed: int = 0  # seeds the adapter's initial weights
    send_sections: bool = True  # ship the client's base sections in the Welcome
    identity: str = ""  # names the client's checkpoints on a plain-text server (CURVE: the key does)
    resume_steps: tuple[int, ...] = ()  # resume: steps the client has a checkpoint of


class Welcome(_Msg, tag="welcome"):
    session: str
    config: str  # the base model's transformers config, as JSON
    dtype: str
    server_layers: tuple[int, int]  # [start, stop) of the blocks the server runs
    section_names: tuple[tuple[str, ...], ...] = ()  # aliases of each tensor frame sent
    step: int = 0  # training steps done (> 0 after a resume)
    heartbeat_s: float = 5.0  # send a Heartbeat at least this often


class Forward(_Msg, tag="forward"):
    step: int
    train: bool  # False: evaluation, nothing is kept for a backward


class Activations(_Msg, tag="activations"):
    step: int
    compute_s: float = 0.0  # server compute time of this request
    queue_s: float = 0.0  # time waiting for a memory grant
    swap_s: float = 0.0  # vanilla baseline: time to swap the task back in


class Backward(_Msg, tag="backward"):
    step: int
    want_input_grad: bool = True  # False when nothing before the server range trains


class Gradients(_Msg, tag="gradients"):
    step: int
    compute_s: float = 0.0
    queue_s: float = 0.0
    checkpoint: int = -1  # the server saved its state after this many training steps
    swap_s: float = 0.0


class Heartbeat(_Msg, tag="heartbeat"):
    """Client -> manager, from a side socket: the client is alive."""

    session: str


class Bye(_Msg, tag="bye"):
    pass


class AdapterRequest(_Msg, tag="adapter_request"):
    """Client -> worker: send me the server part of my adapter (for export)."""


class AdapterState(_Msg, tag="adapter_state"):
    """Worker -> client: the server's adapter tensors, by full parameter name, in frame order."""

    names: tuple[str, ...]
    step: int


class StatusRequest(_Msg, tag="status_request"):
    pass


class ClientStatus(msgspec.Struct, frozen=True):
    session: str
    pid: int
    identity: str  # the client's key (CURVE) or claimed name; "" if anonymous
    head_layers: int
    tail_layers: int
    server_layers: tuple[int, int]
    adapter: LoraSpec
    persistent_bytes: int  # adapter + optimizer state
    m_f: int  # memory token asked for a forward
    m_b: int  # memory token asked for a re-forward + backward + step
    steps: int
    state: str  # starting, idle, waiting, computing, holding
    requests: int = 0  # memory-token requests served
    mean_queue_s: float = 0.0  # mean wait for a grant (the paper's scheduling time)
    mean_compute_s: float = 0.0  # mean time a grant was held
    reclaims: int = 0  # adaptive: kept activations dropped under memory pressure
    oom_retries: int = 0


class Status(_Msg, tag="status"):
    model: str
    model_type: str
    dtype: str
    device: str
    shared_bytes: int
    capacity: int
    granted: int
    queued: int
    policy: str = "on-demand"
    clients: tuple[ClientStatus, ...] = ()
    pss: dict[str, int] = {}  # process label -> proportional set size, bytes


class Error(_Msg, tag="error"):
    code: str  # one of ErrorCode's values
    message: str
    step: Optional[int] = None


class ErrorCode:
    BAD_MESSAGE = "bad_message"
    BAD_TENSOR = "bad_tensor"
    BAD_REQUEST = "bad_request"  # well-formed but not allowed now (wrong step, busy)
    UNKNOWN_SESSION = "unknown_session"
    TOO_LARGE = "too_large"  # needs more memory than the server's capacity
    WORKER_FAILED = "worker_failed"
    WORKER_DIED = "worker_died"
    NO_CHECKPOINT = "no_checkpoint"  # resume asked for, nothing matching on the server
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"  # the operator disabled this (e.g. adapter export)
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


# --------------------------------------------------------------------------- manager <-> worker


class WorkerHello(_Msg, tag="worker_hello"):
    session: str
    pid: int


class WorkerSetup(_Msg, tag="worker_setup"):
    client: Hello
    config: str  # transformers config JSON
    dtype: str
    device: str
    weights: SharedHandle
    server_layers: tuple[int, int]
    threads: int  # torch intra-op threads; 0 keeps torch's default
    policy: str  # on-demand, preserve, adaptive, or vanilla (the baseline: own copy, swapped)
    capacity: int  # the scheduler's capacity: an exclusive grant asks for all of it
    checkpoint_dir: str
    checkpoint_every: int  # training steps between checkpoints (0: only at the end)
    resume_step: int = -1  # load this checkpoint first (-1: start fresh)
    reject_nonfinite: bool = False


class WorkerReady(_Msg, tag="worker_ready"):
    persistent_bytes: int
    shared_params: int  # base parameters that live in the shared block
    private_params: int  # base parameters that do not (should be 0)
    m_f: int  # profiled token sizes, bytes, safety margin included
    m_b: int
    t_f: float  # profiled compute seconds
    t_b: float
    profile_method: str
    step: int = 0  # resumed at


class WorkerFailed(_Msg, tag="worker_failed"):
    message: str


class TokenRequest(_Msg, tag="token_request"):
    request_id: int
    nbytes: int
    kind: str  # forward, backward, eval; "+retry" after an out-of-memory error
    expected_s: float = 0.0  # expected compute time (EASY backfilling)
    preserve_nbytes: int = 0  # adaptive: bytes to keep the activations, if memory is plentiful


class TokenGrant(_Msg, tag="token_grant"):
    request_id: int
    nbytes: int
    preserve: bool = False  # adaptive: keep the activations under this grant


class TokenRelease(_Msg, tag="token_release"):
    request_id: int


class TokenHold(_Msg, tag="token_hold"):
    """The worker's forward is done but it keeps activations under this grant; or (vanilla)
    its task is resident under it. Either way the scheduler may reclaim it."""

    request_id: int
    busy: bool = False  # vanilla: an iteration is open under it, so it is freed only at its end


class Reclaim(_Msg, tag="reclaim"):
    """Manager to worker: drop what is held under this grant (kept activations; the
    vanilla baseline: its whole task, swapped out) and release it."""

    request_id: int


class Shutdown(_Msg, tag="shutdown"):
    reason: str = ""


Message = Union[
    Hello,
    Welcome,
    Forward,
    Activations,
    Backward,
    Gradients,
    Bye,
    AdapterRequest,
    AdapterState,
    Heartbeat,
    StatusRequest,
    Status,
    Error,
    WorkerHello,
    WorkerSetup,
    WorkerReady,
    WorkerFailed,
    TokenRequest,
    TokenGrant,
    TokenRelease,
    TokenHold,
    Reclaim,
    Shutdown,
]

# Messages a worker sends that the manager passes on to the worker's client as they are.
CLIENT_BOUND = (Activations, Gradients, AdapterState, Error)
