"""The client library: the model's ends on the client, the middle on a Menos server.

A split training step (U-shape; input ids and labels never leave this process):

    x_c = head(embed(input_ids))         -> server: x_s = middle(x_c)
    loss = lm_loss(tail(x_s), labels);   g_c = dloss/dx_s
    g_c                                  -> server: backward + adapter step; g_s = dloss/dx_c
    x_c.backward(g_s); local adapter step
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
import zmq

from menos import checkpoint, wire
from menos.adapters import inject_lora, make_optimizer, save_peft_adapter
from menos.errors import MenosError, MenosTimeout
from menos.keys import CurveKeys
from menos.link import Link
from menos.messages import (
    PROTOCOL_VERSION,
    Activations,
    AdapterRequest,
    AdapterState,
    Backward,
    Bye,
    Error,
    Forward,
    Gradients,
    Heartbeat,
    Hello,
    LoraSpec,
    Status,
    StatusRequest,
    Welcome,
)
from menos.models import load_base
from menos.surgery import (
    BlockRunner,
    build_section,
    causal_lm_loss,
    config_from_json,
    embed,
    logits,
    split_layers,
)

# Fields that must agree between a client's local checkpoint and the server's model.
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")


# transformers builds and loads models under process-wide state (default dtype, init
# contexts): clients connecting from several threads at once take turns here.
_BUILD_LOCK = threading.Lock()


@dataclass
class StepTimes:
    """Per-step timings, seconds (the paper's Tables 1-3 break an iteration down like this).

    total: the whole train step on the client; server_compute: the server's compute
    under its memory grants; server_queue: waiting for grants (scheduling time);
    server_swap: swapping the task back in (vanilla baseline only; the paper counts it
    as scheduling time); communication: round trips minus the server's share
    (network, emulated link and serialization).
    """

    total: list[float] = field(default_factory=list)
    server_compute: list[float] = field(default_factory=list)
    server_queue: list[float] = field(default_factory=list)
    server_swap: list[float] = field(default_factory=list)
    communication: list[float] = field(default_factory=list)

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Medians over the steps after the first ``skip`` (warm-up)."""
        med = lambda xs: statistics.median(xs[skip:]) if xs[skip:] else float("nan")  # noqa: E731
        return {"steps": len(self.total), "s_per_step": med(self.total),
                "server_compute_s": med(self.server_compute), "server_queue_s": med(self.server_queue),
                "server_swap_s": med(self.server_swap), "communication_s": med(self.communication)}  # fmt: skip


@dataclass
class PendingStep:
    """A train step between its forward and its backward (see ``Client.forward_step``)."""

    step: int
    x_c: torch.Tensor  # head output (B, T, H), with its graph
    x_s: torch.Tensor  # server output (B, T, H), a leaf that collects g_c
    loss: torch.Tensor
    t0: float
    compute_s: float
    queue_s: float
    swap_s: float
    comm_s: float


class _Channel:
    """A DEALER socket speaking menos.wire, with timeouts and server errors as exceptions;
    with a ``link``, every message is delayed as that link would (menos.link)."""

    def __init__(self, endpoint: str, timeout_s: float, curve: CurveKeys | None = None, link: Link | None = None):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.curve = curve
        self._monitor = None
        if curve is not None:
            curve.apply(self.sock)
            # A refused key shows only as a failed handshake: watch for it to say so.
            self._monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.link = link

    def send(self, msg, tensors=()) -> None:
        frames = wire.encode(msg, tensors)
        if self.link is not None:
            self.link.transit(sum(memoryview(f).nbytes for f in frames))
        self.sock.send_multipart(frames, copy=False)

    def recv(self, expect: type, timeout_s: float | None = None):
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.sock.poll(min(200, max(0, int((deadline - time.monotonic()) * 1000)))):
            if self._monitor is not None and self._monitor.poll(0):
                raise MenosError("unauthorized", f"{self.endpoint} refused this client's key")
            if time.monotonic() >= deadline:
                hint = " (with CURVE, a wrong server key looks like this)" if self.curve else ""
                raise MenosTimeout(f"no answer from {self.endpoint} within {timeout_s:.0f} s{hint}")
        frames = self.sock.recv_multipart(copy=False)
        if self.link is not None:
            self.link.transit(sum(f.buffer.nbytes for f in frames))
        msg, tensors = wire.decode(frames)
        if isinstance(msg, Error):
            raise MenosError(msg.code, msg.message)
        if not isinstance(msg, expect):
            raise MenosError("protocol", f"expected {expect.__name__}, got {type(msg).__name__}")
        return msg, tensors

    def close(self, linger_ms: int = 0) -> None:
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(0)
        # A last message (Bye) needs linger to leave the queue before the socket closes.
        self.sock.close(linger_ms)


class Client:
    """One client's fine-tuning session with a Menos server. See ``menos.connect``."""

    def __init__(
        self,
        endpoint: str,
        model: str | None = None,
        head_layers: int = 1,
        tail_layers: int = 0,
        adapter: LoraSpec | None = None,
        batch_size: int = 4,
        seq_len: int = 128,
        lr: float = 1e-4,
        seed: int = 0,
        identity: str | None = None,
        state_dir: str | None = None,
        resume: bool = False,
        client_key: str | None = None,
        server_key: str | None = None,
        timeout_s: float = 300.0,
        link: str | Link | None = None,
    ):
        self.adapter = adapter or LoraSpec()
        self.model_path = model
        self.batch_size, self.seq_len = batch_size, seq_len
        self.state_dir = state_dir
        self.times = StepTimes()
        self.eval_losses: list[float] = []
        self.steps = 0  # training steps done, counting those before a resume
        self._saved = 0
        self._step = 0  # request counter (message step ids)
        self._heartbeat: _Heartbeat | None = None
        resume_steps = ()
        if resume:
            resume_steps = tuple(checkpoint.steps(state_dir)) if state_dir else ()
            if not resume_steps:
                raise ValueError(f"resume=True needs a state_dir holding a checkpoint (got {state_dir!r})")
        if (client_key is None) != (server_key is None):
            raise ValueError("CURVE needs both client_key (your .key_secret file) and server_key (the server's .key)")
        curve = CurveKeys.load(client_key, server_key) if client_key else None
        link = Link.parse(link) if isinstance(link, str) else link
        self._chan = _Channel(endpoint, timeout_s, curve, link)
        try:
            hello = Hello(
                PROTOCOL_VERSION, head_layers, tail_layers, self.adapter, batch_size, seq_len, lr, seed,
                send_sections=model is None, identity=identity or "", resume_steps=resume_steps,
            )  # fmt: skip
            self._chan.send(hello)
            welcome, tensors = self._chan.recv(Welcome)
            self.session = welcome.session
            self.config = config_from_json(welcome.config)
            self.dtype = wire.dtype_from_name(welcome.dtype)
            self.server_layers = welcome.server_layers
            head, _, tail = split_layers(self.config.num_hidden_layers, head_layers, tail_layers)
            self.head_blocks, self.tail_blocks = list(head), list(tail)
            with _BUILD_LOCK:
                if model is None:
                    base = {name: t for names, t in zip(welcome.section_names, tensors) for name in names}
                else:
                    base = self._local_base(model)
                self.model = build_section(self.config, base, [*head, *tail], True, self.dtype)
                del base, tensors
            self.runner = BlockRunner(self.model)
            self.params = inject_lora(self.model, self.adapter, seed)
            self.optimizer = make_optimizer(self.params, lr)
            if resume:
                # The server chose the latest step both sides have a checkpoint of.
                checkpoint.load(state_dir, welcome.step, self._adapter_state(), self.optimizer)
                self.steps = self._saved = welcome.step
            self._heartbeat = _Heartbeat(endpoint, self.session, welcome.heartbeat_s, curve)
        except BaseException:
            self._chan.close()
            raise

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_state(self, directory: str | None = None) -> str:
        """Checkpoint the client's sections (adapter, optimizer, step) into ``directory``
        (default: the ``state_dir`` given to connect). Resume with ``resume=True``."""
        directory = directory or self.state_dir
        if directory is None:
            raise ValueError("save_state needs a directory (or connect(..., state_dir=...))")
        path = checkpoint.save(directory, self.steps, self._adapter_state(), self.optimizer)
        if directory == self.state_dir:
            self._saved = self.steps
        return path

    def save_adapter(self, directory: str) -> str:
        """Write the whole model's adapter (this client's sections and the server's part,
        fetched from the worker) as ONE PEFT adapter: load it with
        ``peft.PeftModel.from_pretrained(full_base_model, directory)``."""
        self._chan.send(AdapterRequest())
        reply, tensors = self._chan.recv(AdapterState)
        state = dict(zip(reply.names, tensors, strict=True))
        state.update({n: p for n, p in self._adapter_state().items()})
        save_peft_adapter(directory, self.adapter, state, self.model_path)
        return directory

    def _local_base(self, path: str) -> dict[str, torch.Tensor]:
        _, full = load_base(path, self.dtype)
        for f in _SHAPE_FIELDS:
            mine, theirs = getattr(full.config, f, None), getattr(self.config, f, None)
            if mine != theirs:
                raise MenosError("model_mismatch", f"local checkpoint {path} has {f}={mine}, the server's model {theirs}")
        return dict(full.state_dict())

    # ---------------------------------------------------------------- steps

    def _check_batch(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if not (0 < b <= self.batch_size and 1 < t <= self.seq_len):
            raise ValueError(f"batch {b} x seq {t} exceeds what this client declared ({self.batch_size} x {self.seq_len})")
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        return labels

    def _head(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.runner.run(embed(self.model, input_ids), self.head_blocks)  # (B, T, H)

    def _tail_loss(self, x_s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits(self.model, self.runner.run(x_s, self.tail_blocks)), labels)

    def _round_trip(self, msg, tensor, expect):
        """Send one request, wait for its reply; returns (reply, tensors, server s, comm s)."""
        t0 = time.perf_counter()
        self._chan.send(msg, [tensor])
        reply, tensors = self._chan.recv(expect)
        server = reply.compute_s + reply.queue_s + reply.swap_s
        return reply, tensors, server, max(0.0, time.perf_counter() - t0 - server)

    def forward_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> "PendingStep":
        """First half of ``train_step``: forward through all sections and the loss.

        The server keeps what its backward needs until ``backward_step``; steps must
        alternate forward_step, backward_step."""
        labels = self._check_batch(input_ids, labels)
        t0 = time.perf_counter()
        self._step += 1
        x_c = self._head(input_ids)
        reply, (x_s,), server, comm = self._round_trip(Forward(self._step, True), x_c.detach(), Activations)
        x_s.requires_grad_(True)
        loss = self._tail_loss(x_s, labels)
        return PendingStep(self._step, x_c, x_s, loss, t0, reply.compute_s, reply.queue_s, reply.swap_s, comm)

    def backward_step(self, pending: "PendingStep") -> float:
        """Second half of ``train_step``: backward on both sides, adapter steps. Returns the loss."""
        if pending.step != self._step:
            raise ValueError(f"backward_step for step {pending.step}, but the last forward_step was {self._step}")
        pending.loss.backward()  # reaches x_s: g_c = dloss/dx_s
        want_input_grad = pending.x_c.requires_grad  # False when nothing before the server trains
        reply, grads, server, comm = self._round_trip(
            Backward(pending.step, want_input_grad), pending.x_s.grad, Gradients
        )
        if want_input_grad:
            pending.x_c.backward(grads[0])
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if reply.checkpoint == self.steps and self.state_dir:
            self.save_state()  # the server saved this step: keep both sides in step
        self.times.server_compute.append(pending.compute_s + reply.compute_s)
        self.times.server_queue.append(pending.queue_s + reply.queue_s)
        self.times.server_swap.append(pending.swap_s + reply.swap_s)
        self.times.communication.append(pending.comm_s + comm)
        self.times.total.append(time.perf_counter() - pending.t0)
        return pending.loss.item()

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """One split iteration: forward, loss, backward, adapter steps on both sides."""
        return self.backward_step(self.forward_step(input_ids, labels))

    def fit(self, batches, steps: int | None = None, eval_batches=None, progress: bool | None = None) -> list[float]:
        """Train on ``batches`` (an iterable of input_ids, or of (input_ids, labels)) for
        ``steps`` steps (default: until it ends); returns the loss of every step.

        A tqdm bar shows loss, seconds per iteration and queue time (off when not on a
        terminal, or with progress=False). With ``eval_batches``, the mean eval loss at the
        end is appended to ``self.eval_losses`` and shown."""
        from tqdm.auto import tqdm

        losses: list[float] = []
        it = iter(batches)
        bar = tqdm(total=steps, disable=None if progress is None else not progress, unit="step", desc="menos")
        try:
            while steps is None or len(losses) < steps:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                ids, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
                losses.append(self.train_step(ids, labels))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", s_it=f"{self.times.total[-1]:.3f}",
                                queue=f"{self.times.server_queue[-1]:.3f}")  # fmt: skip
            if eval_batches is not None:
                evals = [self.eval_step(*(b if isinstance(b, (tuple, list)) else (b,))) for b in eval_batches]
                self.eval_losses.append(sum(evals) / len(evals))
                bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "-", eval=f"{self.eval_losses[-1]:.4f}")
        finally:
            bar.close()
        return losses

    @torch.no_grad()
    def eval_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Loss of the current split model on a batch; nothing is trained."""
        labels = self._check_batch(input_ids, labels)
        self._step += 1
        _, (x_s,), _, _ = self._round_trip(Forward(self._step, False), self._head(input_ids), Activations)
        return self._tail_loss(x_s, labels).item()

    # ---------------------------------------------------------------- life cycle

    def close(self) -> None:
        """End the session: both sides checkpoint (with a state_dir), the worker exits."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._chan is not None:
            try:
                if self.state_dir and self.steps > self._saved:
                    self.save_state()
                self._chan.send(Bye())
            finally:
                self._chan.close(linger_ms=1000)
                self._chan = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Heartbeat:
    """Tells the manager, from a side socket and thread, that this client is alive, even
    while the main thread computes for a long time."""

    def __init__(self, endpoint: str, session: str, interval_s: float, curve: CurveKeys | None):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint, session, interval_s, curve), daemon=True)
        self._thread.start()

    def _run(self, endpoint: str, session: str, interval_s: float, curve) -> None:
        chan = _Channel(endpoint, interval_s, curve)  # zmq sockets are not thread-safe: this thread's own
        try:
            while True:
                chan.send(Heartbeat(session))
                if self._stop.wait(interval_s):
                    break
        finally:
            chan.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def connect(endpoint: str = "tcp://127.0.0.1:5555", **kwargs) -> Client:
    """Open a fine-tuning session; see ``Client`` for the arguments."""
    return Client(endpoint, **kwargs)


def status(endpoint: str = "tcp://127.0.0.1:5555", timeout_s: float = 10.0,
           client_key: str | None = None, server_key: str | None = None) -> Status:  # fmt: skip
    """A running manager's status (model, memory, sessions)."""
    chan = _Channel(endpoint, timeout_s, CurveKeys.load(client_key, server_key) if client_key else None)
    try:
        chan.send(StatusRequest())
        return chan.recv(Status)[0]
    finally:
        chan.close()
