"""Every message that crosses a process boundary, defined once.

Messages are msgspec structs, tagged so that one decoder validates any of them
against its schema (types, required fields) before the program sees it. Tensors
never sit inside a message: they travel as raw frames after the header, described
by ``TensorMeta`` entries (see ``menos.wire``). Nothing here is ever pickled.

Who sends what:

    client  -> manager: Hello, SectionRequest, Forward, GenerationEnd, Backward, ApplyStep, AdapterRequest,
                        AdapterLoad, StateRequest, Bye, StatusRequest, Heartbeat
    manager -> client : Welcome, SectionChunk, StateWanted, Activations, Gradients, StepApplied, AdapterState,
                        AdapterLoaded, ServerCheckpoint, Error, Status
    client <-> gateway (a cluster's endpoint): Hello -> Redirect, Chain (a cluster of stages) or Error;
                        StatusRequest -> ClusterStatus
    worker  -> manager: WorkerHello, WorkerReady, WorkerFailed, TokenRequest, TokenRelease,
                        TokenHold (a kept forward or a resident vanilla task is reclaimable),
                        Parked (its answer to Park), and the client-bound messages (CLIENT_BOUND)
    manager -> worker : WorkerSetup, TokenGrant, TokenRefused, Reclaim, Shutdown, Park, Woken, and the
                        client's Forward/GenerationEnd/Backward/ApplyStep/AdapterRequest/AdapterLoad/Bye
    manager <-> launcher: SpawnWorker -> WorkerSpawned, LoadBase -> BaseLoaded (length-prefixed, over its pipes)

The protocol's vocabulary (policies, session states, grant kinds, error codes) is in
``menos.vocabulary``, re-exported here.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec

from menos.codecs import Codec
from menos.launcher_messages import BaseLoaded, LoadBase, SpawnWorker, WorkerSpawned  # noqa: F401
from menos.message_base import SharedEntry, SharedHandle, TensorMeta, _Msg  # noqa: F401
from menos.vocabulary import ErrorCode, Policy, SessionState, TokenKind  # noqa: F401
from menos.specs import AdapterSpec, IA3Spec, LoraSpec, PrefixSpec, Recipe, Schedule  # noqa: F401  (protocol parts)

PROTOCOL_VERSION = 6


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Frame 0 of every multipart message: the message and its tensor frames."""

    msg: "Message"
    tensors: tuple[TensorMeta, ...] = ()


# --------------------------------------------------------------------------- client <-> server
# Every message is built by keyword (kw_only): positional fields would silently shift
# when a field is added.


class Hello(_Msg, tag="hello", kw_only=True):
    protocol: int = PROTOCOL_VERSION
    head_layers: int = 1  # blocks on the client before the server range
    tail_layers: int = 0  # blocks on the client after the server range
    adapter: AdapterSpec = LoraSpec()
    batch_size: int = 4  # largest batch the client will send
    seq_len: int = 128  # longest sequence the client will send
    recipe: Recipe = Recipe()
    compression: Codec = Codec.NONE  # the cut layer's codec (menos.codecs)
    seed: int = 0  # seeds the adapter's initial weights
    send_sections: bool = True  # ship the client's base sections in the Welcome
    identity: str = ""  # names the client's checkpoints on a plain-text server (CURVE: the key does)
    resume_steps: tuple[int, ...] = ()  # resume: steps the client has a checkpoint of
    # Resume anywhere (a cluster): the step of the server's checkpoint the client holds a copy
    # of. A manager without it answers StateWanted; the Hello then carries it as one uint8 frame.
    carried_step: int = -1


class Redirect(_Msg, tag="redirect", kw_only=True):
    """Gateway -> client: send the Hello to this manager (the gateway is not on the data path)."""

    endpoint: str
    manager: str  # the manager's id in the cluster
    carry: bool = True  # keep a copy of the server's checkpoints: resume on any manager


class Chain(_Msg, tag="chain", kw_only=True):
    """Gateway -> client: no manager of this cluster holds the client's whole server range; its
    managers hold these ranges (``--stages``): say Hello here once per stage, with its range."""

    layers: int  # blocks in the whole model
    ranges: tuple[tuple[int, int], ...]  # [start, stop) of each stage, in order


class StateWanted(_Msg, tag="state_wanted", kw_only=True):
    """Manager -> client: this manager lacks the server checkpoint ``step``: send the Hello again with it."""

    step: int


class Welcome(_Msg, tag="welcome", kw_only=True):
    session: str
    config: str  # the base model's transformers config, as JSON
    dtype: str
    server_layers: tuple[int, int]  # [start, stop) of the blocks the server runs
    section_names: tuple[tuple[str, ...], ...] = ()  # aliases of each section
    sections: tuple[TensorMeta, ...] = ()  # the client's base tensors, to fetch with SectionRequest
    base_digests: dict[str, str] = {}  # a client with its own checkpoint: its section's tensors' digests
    step: int = 0  # training steps done (> 0 after a resume)
    heartbeat_s: float = 5.0  # send a Heartbeat at least this often


class SectionRequest(_Msg, tag="section_request", kw_only=True):
    """Client -> manager, after the Welcome: rows from ``row`` on of section ``index`` (menos.sections)."""

    index: int
    row: int


class SectionChunk(_Msg, tag="section_chunk", kw_only=True):
    """Manager -> client: ``rows`` rows of section ``index`` from ``row`` on, one frame."""

    index: int
    row: int
    rows: int


class Forward(_Msg, tag="forward", kw_only=True):
    step: int
    train: bool  # False: evaluation, nothing is kept for a backward
    adapter: bool = True  # False (evaluation only): the frozen base alone, e.g. a reference model
    # Generation (menos.generation): ``generate`` > 0: the prompt of a generation of that many positions
    # in all, with each row's left ``pads``; ``cached``: the next positions of the open generation.
    # Any other forward may have left ``pads`` too (prompt + completion rows; never attended to).
    generate: int = 0
    pads: tuple[int, ...] = ()
    cached: bool = False


class GenerationEnd(_Msg, tag="generation_end"):
    """Client -> worker: the open generation is over: free its cache and its memory token."""


class Activations(_Msg, tag="activations", kw_only=True):
    step: int
    compute_s: float = 0.0  # server compute time of this request
    queue_s: float = 0.0  # time waiting for a memory grant
    swap_s: float = 0.0  # vanilla baseline: time to swap the task back in


class Backward(_Msg, tag="backward", kw_only=True):
    step: int
    want_input_grad: bool = True  # False when nothing before the server range trains
    # A driven session (AdapterRequest(drive=True)): the reply carries the adapter's gradients
    # accumulated since the last reply that carried them, and the server forgets them.
    adapter_grads: bool = False
    fresh: bool = False  # a driven session's client zeroed its gradients: the server forgets any it holds


class Gradients(_Msg, tag="gradients", kw_only=True):
    step: int
    compute_s: float = 0.0
    queue_s: float = 0.0
    swap_s: float = 0.0
    checkpoint: int = -1  # the server saved its state after this many training steps
    # Clipping, at the last micro-batch of an optimizer step: the server's adapter gradients'
    # squared norm; its optimizer step then waits for the client's ApplyStep.
    grad_sq_norm: Optional[float] = None
    # Backward(adapter_grads=True): the last this-many frames are the adapter's gradients, raw
    # (not in the cut's codec), in the order of the AdapterState that started the drive.
    adapter_grads: int = 0


class ApplyStep(_Msg, tag="apply_step", kw_only=True):
    """Client -> worker, with clipping: scale the accumulated adapter gradients by ``scale``
    (the global clip coefficient, in (0, 1]) and take the optimizer step."""

    step: int
    scale: float


class StepApplied(_Msg, tag="step_applied", kw_only=True):
    step: int
    compute_s: float = 0.0
    queue_s: float = 0.0
    swap_s: float = 0.0
    checkpoint: int = -1


STEPPED = (Activations, Gradients, StepApplied)  # the replies to a step's requests, each naming its step


class Heartbeat(_Msg, tag="heartbeat", kw_only=True):
    """Client -> manager, from a side socket: the client is alive."""

    session: str


class Bye(_Msg, tag="bye"):
    pass


class AdapterRequest(_Msg, tag="adapter_request", kw_only=True):
    """Client -> worker: send me the server part of my adapter (for export). With ``drive``
    the client's own optimizer steps it from now on (``menos.hf_model``): the server's
    optimizer stops, its gradients go to the client (Backward.adapter_grads) and the
    stepped weights come back with AdapterLoad, at any step."""

    drive: bool = False


class AdapterState(_Msg, tag="adapter_state", kw_only=True):
    """Worker -> client: the server's adapter tensors, by full parameter name, in frame order."""

    names: tuple[str, ...]


class AdapterLoad(_Msg, tag="adapter_load", kw_only=True):
    """Client -> worker, before training (connect(init_adapter=)), or at any step of a driven
    session: the server's adapter tensors, in frame order."""

    names: tuple[str, ...]


class AdapterLoaded(_Msg, tag="adapter_loaded", kw_only=True):
    count: int  # tensors loaded


class StateRequest(_Msg, tag="state_request"):
    """Client -> worker: checkpoint now (if anything is new) and send me that checkpoint."""


class ServerCheckpoint(_Msg, tag="server_checkpoint", kw_only=True):
    """Worker -> client: the server's checkpoint file (menos.checkpoint) of ``step``, one uint8 frame."""

    step: int


class StatusRequest(_Msg, tag="status_request"):
    pass


class ClientStatus(msgspec.Struct, frozen=True, kw_only=True):
    session: str
    pid: int
    identity: str  # the client's key (CURVE) or claimed name; "" if anonymous
    head_layers: int
    tail_layers: int
    server_layers: tuple[int, int]
    adapter: AdapterSpec
    compression: Codec = Codec.NONE
    persistent_bytes: int  # adapter + optimizer state
    m_f: int  # memory token asked for a forward
    m_b: int  # memory token asked for a re-forward + backward + step
    steps: int
    standing_bytes: int = 0  # held for the session's life outside any token (A + O, kept input)
    cache_bytes: int = 0  # a generation's memory token (its key/value cache), while one is open
    state: SessionState
    requests: int = 0  # memory-token requests served
    mean_queue_s: float = 0.0  # mean wait for a grant (the paper's scheduling time)
    mean_compute_s: float = 0.0  # mean time a grant was held
    reclaims: int = 0  # adaptive: kept activations dropped under memory pressure (vanilla: swap-outs)
    oom_retries: int = 0


class Status(_Msg, tag="status", kw_only=True):
    model: str
    model_type: str
    dtype: str
    device: str
    shared_bytes: int  # the base weights' block (vanilla: the file every worker reads its copy from)
    capacity: int
    granted: int
    queued: int
    standing: int = 0  # the sessions' standing memory, inside the capacity, outside any token
    policy: Policy = Policy.ON_DEMAND
    clients: tuple[ClientStatus, ...] = ()
    pss: dict[str, int] = {}  # process label -> proportional set size, bytes
    quantization: str = "none"  # how the block's Linears are stored (menos.quantization)
    live_workers: int = 0  # worker processes now (parked sessions have none)
    max_workers: int = 0  # --max-workers (0: one per session, no cap)
    layers: int = 0  # decoder blocks in the whole model
    blocks: tuple[int, int] = (0, 0)  # [start, stop) of the blocks this manager holds (a chain's stage: --blocks)
    base_digest: str = ""  # one hash of every tensor's digest: stages of one chain must serve the same base


class ClusterStatus(_Msg, tag="cluster_status", kw_only=True):
    """Gateway -> anyone: the cluster's managers and clients, as ``menos-cluster status --json``."""

    json: str


class Error(_Msg, tag="error", kw_only=True):
    code: ErrorCode
    message: str
    step: Optional[int] = None


# --------------------------------------------------------------------------- manager <-> worker


class WorkerHello(_Msg, tag="worker_hello"):
    """Worker -> manager: the worker is up (the routing id names its session)."""


class WorkerSetup(_Msg, tag="worker_setup", kw_only=True):
    client: Hello
    config: str  # transformers config JSON
    dtype: str
    device: str
    weights: SharedHandle
    server_layers: tuple[int, int]
    threads: int  # torch intra-op threads; 0 keeps torch's default
    policy: Policy
    checkpoint_dir: str
    checkpoint_every: int  # training steps between checkpoints (0: only at the end)
    resume_step: int = -1  # load this checkpoint first (-1: start fresh)
    reject_nonfinite: bool = False
    load_nbytes: int = 0  # the grant to load (vanilla) and profile under: the admission estimate of M_b
    quantization: str = "none"  # menos.quantization: how the block's Linears are stored
    park_dir: str = ""  # where this session's state goes when it parks (manager.parking)
    parked: Optional["ParkedState"] = None  # a parked session woken: restore this, without profiling again
    profile: Optional["Profiled"] = None  # an earlier session of the same shape's profile: not measured again


class WorkerReady(_Msg, tag="worker_ready", kw_only=True):
    persistent_bytes: int  # A + O: adapter and optimizer state
    private_params: int  # base parameters outside the shared block (0 unless vanilla)
    m_f: int  # the token sizes this worker will ask for, bytes, safety margin included
    m_b: int
    t_f: float  # profiled compute seconds
    t_b: float
    profile_method: str
    step: int = 0  # resumed at
    standing_bytes: int = 0  # held for the session's life outside any token: A + O and the kept input x_c
    m_step: int = 0  # a clipped optimizer step's token


class WorkerFailed(_Msg, tag="worker_failed", kw_only=True):
    message: str


class TokenRequest(_Msg, tag="token_request", kw_only=True):
    request_id: int
    nbytes: int
    kind: TokenKind
    retry: bool = False  # after an out-of-memory error: exclusive (granted alone, all that is free), nbytes at least
    expected_s: float = 0.0  # expected compute time (EASY backfilling)
    preserve_nbytes: int = 0  # adaptive: bytes to keep the activations, granted instead if memory is plentiful


class TokenGrant(_Msg, tag="token_grant", kw_only=True):
    request_id: int
    nbytes: int
    preserve: bool = False  # adaptive: keep the activations under this grant


class TokenRefused(_Msg, tag="token_refused", kw_only=True):
    """Manager -> worker: this request will not be granted (the memory it needs is held
    outside the scheduler, and has been for a while)."""

    request_id: int
    reason: str


class TokenRelease(_Msg, tag="token_release", kw_only=True):
    request_id: int


class TokenHold(_Msg, tag="token_hold", kw_only=True):
    """The worker's forward is done but it keeps activations under this grant; or (vanilla)
    its task is resident under it. Either way the scheduler may reclaim it."""

    request_id: int
    busy: bool = False  # vanilla: an iteration is open under it, so it is freed only at its end


class Reclaim(_Msg, tag="reclaim", kw_only=True):
    """Manager to worker: drop what is held under this grant (kept activations; the
    vanilla baseline: its whole task, swapped out) and release it."""

    request_id: int


class Shutdown(_Msg, tag="shutdown", kw_only=True):
    reason: str = ""


class Park(_Msg, tag="park"):
    """Manager -> worker: the session is idle; save its state to the park directory and exit."""


class Profiled(msgspec.Struct, frozen=True, kw_only=True):
    """A session's profile as its worker reported it (WorkerReady: token sizes with their
    margins), handed to a later worker of the same session (a wake) or of the same shape."""

    m_f: int
    m_b: int
    m_step: int  # a clipped step's token
    t_f: float
    t_b: float
    method: str
    persistent_bytes: int
    standing_bytes: int

    @classmethod
    def of(cls, r: "WorkerReady") -> "Profiled":
        return cls(m_f=r.m_f, m_b=r.m_b, m_step=r.m_step, t_f=r.t_f, t_b=r.t_b, method=r.profile_method,
                   persistent_bytes=r.persistent_bytes, standing_bytes=r.standing_bytes)  # fmt: skip


class ParkedState(msgspec.Struct, frozen=True, kw_only=True):
    """What a parked session's next worker needs besides the park file (the adapter,
    optimizer state and accumulated gradients of ``step``): its profile and counters."""

    step: int  # micro-batches trained: the park file's step
    saved_step: int  # the last regular checkpoint's step
    driven: bool  # the client's optimizer steps the adapter (menos.driven)
    profile: Profiled
    expected_s: dict[str, float] = {}  # the policy's running mean compute seconds, by job


class Parked(_Msg, tag="parked", kw_only=True):
    """Worker -> manager: the answer to Park. ``state`` set: saved, and the worker exits;
    None: it cannot park now (``reason``: a forward kept for its backward, a clipped step
    waiting, an open generation, a request in progress) and serves on."""

    state: Optional[ParkedState] = None
    reason: str = ""


class Woken(_Msg, tag="woken", kw_only=True):
    """Manager -> worker, before a woken session's held requests: how long the first of them
    waited for a worker (a slot and the wake), reported to the client as queue time."""

    queued_s: float


Message = Union[
    Hello, Welcome, SectionRequest, SectionChunk, Redirect, Chain, StateWanted, StateRequest, ServerCheckpoint,
    ClusterStatus, Forward, GenerationEnd, Activations, Backward, Gradients, ApplyStep, StepApplied, Bye, AdapterRequest, AdapterState,
    AdapterLoad, AdapterLoaded, Heartbeat, StatusRequest, Status, Error, SpawnWorker, WorkerSpawned, LoadBase,
    BaseLoaded, WorkerHello,
    WorkerSetup, WorkerReady, WorkerFailed, TokenRequest, TokenGrant, TokenRefused, TokenRelease, TokenHold, Reclaim,
    Shutdown, Park, Parked, Woken,
]  # fmt: skip

# Messages a worker sends that the manager passes on to the worker's client as they are.
CLIENT_BOUND = (Activations, Gradients, StepApplied, AdapterState, AdapterLoaded, ServerCheckpoint, Error)
