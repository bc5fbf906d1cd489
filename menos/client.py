"""The client library: the model's ends on the client, the middle on a Menos server.

A split training step (U-shape; input ids and labels never leave this process):

    x_c = head(embed(input_ids))         -> server: x_s = middle(x_c)
    loss = lm_loss(tail(x_s), labels);   g_c = dloss/dx_s
    g_c                                  -> server: backward + adapter step; g_s = dloss/dx_c
    x_c.backward(g_s); local adapter step
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import msgspec
import torch
from msgspec.structs import replace as replace_struct

from menos import checkpoint, codecs, defences, kv_cache, wire
from menos.adapter_spec import position_offset
from menos.adapters import inject, set_dropout_step
from menos.channel import Channel, HeartbeatThread, status  # noqa: F401  (status: re-exported)
from menos.client_config import ClientConfig
from menos.cut import Cut
from menos.errors import MenosError
from menos.export import read_peft_adapter, save_peft_adapter
from menos.keys import CurveKeys
from menos.messages import (Activations, AdapterLoad, AdapterLoaded, AdapterRequest, AdapterState, ApplyStep, Backward, Bye,
                            ErrorCode, Forward, Gradients, Hello, STEPPED, StepApplied, Welcome)  # fmt: skip
from menos.batches import check_batch
from menos.chain import Serves, blocks_text, combine, plan, stage_of
from menos.join import carried_dir, fetch_server_checkpoint, hello_carrying, join
from menos.models import local_sections
from menos.fitting import fit
from menos.generation import generate
from menos.scoring import logprobs
from menos.sections import fetch as fetch_sections
from menos.recipe import SideOptimizer
from menos.schedule import clip_scale
from menos.step_times import StepTimes
from menos.versions import check_transformers
from menos.surgery import (BlockRunner, build_section, causal_lm_loss, config_from_json, embed, family_of, logits,
                           section_keys)  # fmt: skip


def _serves(endpoint: str, cfg: ClientConfig) -> Serves:
    """What the manager at ``endpoint`` serves, from its status."""
    st = status(endpoint, cfg.timeout_s, connect_timeout_s=cfg.connect_timeout_s)
    return Serves(endpoint, st.model, st.layers, tuple(st.blocks), st.base_digest)


# transformers builds and loads models under process-wide state (default dtype, init
# contexts): clients connecting from several threads at once take turns here.
_BUILD_LOCK = threading.Lock()


@dataclass
class PendingStep:
    """A train step between its forward and its backward (see ``Client.forward_step``)."""

    step: int
    x_c: torch.Tensor  # what was sent: the head's output (B, T, H) after the defence, with its graph
    x_s: torch.Tensor  # server output (B, T, H), a leaf that collects g_c
    loss: torch.Tensor
    t0: float
    compute_s: float
    queue_s: float
    swap_s: float
    comm_s: float
    bytes_sent: int  # the channel's counters when the step began
    bytes_received: int
    nopeek: torch.Tensor | None = None  # NoPeek's term (menos.defences), trained with the head


@dataclass
class Stage:
    """One manager serving the server's range, or, in a chain, part of it: this client's session there."""

    chan: Channel
    endpoint: str  # the manager's (after a gateway's redirect, not the gateway's)
    manager: str  # its id in a cluster ("" when connected to a manager directly)
    session: str
    blocks: tuple[int, int]  # [start, stop) of the blocks it runs for this client
    heartbeat: HeartbeatThread | None = None
    carry_dir: str | None = None  # where this client keeps copies of its server checkpoints (None: it does not)

    def close(self, goodbye: bool, linger_ms: int = 1000) -> None:
        """Stop heartbeating; say goodbye (the worker checkpoints and exits) unless the server is gone."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        try:
            if goodbye:
                self.chan.send(Bye())
        except MenosError as exc:  # the server is gone: nothing more to say to it
            if exc.code not in (ErrorCode.DISCONNECTED, ErrorCode.TIMEOUT):
                raise
        finally:
            self.chan.close(linger_ms=linger_ms)


class Client:
    """One client's fine-tuning session with a Menos server, or with a chain of managers that
    each serve a range of the base's blocks (``menos.chain``). See ``menos.connect``."""

    def __init__(self, endpoint: str | list[str], config: ClientConfig | None = None, **kwargs):
        """``menos.connect(endpoint, **kwargs)``: kwargs are ``ClientConfig``'s fields; a list of
        endpoints is a chain of managers (each started with ``--blocks A:B``)."""
        check_transformers()  # before a section is built: another release may compute wrong tokens
        cfg = self.cfg = replace(config or ClientConfig(), **kwargs)
        self.adapter = cfg.adapter
        self.model_path = cfg.model
        self.batch_size, self.seq_len = cfg.batch_size, cfg.seq_len
        self.codec = cfg.compression
        self.defence = cfg.defence
        self.last_nopeek: float | None = None  # NoPeek's term at the last train step (not in its loss)
        self.state_dir = cfg.state_dir
        self.times = StepTimes()
        self.eval_losses: list[float] = []
        self._saved = 0
        # A clipped step the servers have not all applied: (step, scale, the stages yet to apply it,
        # the StepApplied replies of those that did).
        self._unapplied: tuple[int, float, list[Stage], list[StepApplied]] | None = None
        self._step = 0  # request counter (message step ids)
        self._driver = None  # menos.driven.DrivenLink, once a trainer's optimizer steps the server's adapter
        self._hf_model = None
        self._closed = False
        # Why the chain's stages are out of step (a backward failed after the stages behind it took it):
        # nothing more is sent until a resume (connect(..., resume=True)) restarts them from one step.
        self._out_of_step: str | None = None
        self.layout = checkpoint.layout(cfg.head_layers, cfg.tail_layers, cfg.adapter)  # recorded in each checkpoint
        resume_steps = checkpoint.resume_steps(cfg.state_dir, self.layout) if cfg.resume else ()  # before connecting
        curve = CurveKeys.load(cfg.client_key, cfg.server_key) if cfg.client_key or cfg.server_key else None
        hello = Hello(
            head_layers=cfg.head_layers, tail_layers=cfg.tail_layers, adapter=cfg.adapter,
            batch_size=cfg.batch_size, seq_len=cfg.seq_len, recipe=cfg.recipe, seed=cfg.seed,
            compression=cfg.compression,
            send_sections=cfg.model is None, identity=cfg.identity or "", resume_steps=resume_steps,
        )  # fmt: skip
        self.stages: list[Stage] = []
        try:
            welcome = self._join([endpoint] if isinstance(endpoint, str) else list(endpoint), hello, curve)
            self.config = config_from_json(welcome.config)
            self.dtype = wire.dtype_from_name(welcome.dtype)
            self.server_layers = (self.stages[0].blocks[0], self.stages[-1].blocks[1])
            cut = Cut.around(self.config.num_hidden_layers, self.server_layers)  # the server's split
            self.head_blocks, self.tail_blocks = list(cut.head_blocks), list(cut.tail_blocks)
            with _BUILD_LOCK:
                if cfg.model is None:  # the first stage's Welcome lists them (a chain's: more than these)
                    needed = set(section_keys([n for names in welcome.section_names for n in names], self.config,
                                              cut.client_blocks, client_modules=True))  # fmt: skip
                    wanted = [i for i, names in enumerate(welcome.section_names) if needed.intersection(names)]
                    fetched = fetch_sections(self.stages[0].chan, welcome.sections, self.dtype, indices=wanted)
                    base = {name: t for i, t in zip(wanted, fetched) for name in welcome.section_names[i]}
                else:
                    base = local_sections(cfg.model, self.dtype, self.config, welcome.base_digests)
                self.model = build_section(self.config, base, cut.client_blocks, True, self.dtype)
                del base
            self.position_offset = position_offset(self.adapter)
            self.runner = BlockRunner(self.model, self.position_offset)
            self.params = inject(self.model, self.adapter, cfg.seed)
            self.opt = SideOptimizer(self.params, cfg.recipe)
            if cfg.init_adapter:
                self._init_adapter(cfg.init_adapter)
            if cfg.resume:
                # The servers chose the latest step every side has a checkpoint of.
                self.opt.steps = checkpoint.load(cfg.state_dir, welcome.step, self._adapter_state(), self.optimizer,
                                                  self.layout)  # fmt: skip
                self._saved = self.steps
        except BaseException:
            self._leave()
            raise

    def _join(self, endpoints: list[str], hello: Hello, curve) -> Welcome:
        """Say Hello to the server, or to each stage of a chain for its range (``menos.chain.plan``),
        and keep the sessions in ``self.stages``; the first one's Welcome (config, sections). A
        chain is a list of managers' endpoints, or what a cluster's gateway answers (``Chain``).
        Resuming, every stage must start from one step: while they chose different ones (one saved
        a step another did not), all join again offering only the steps up to the earliest chosen."""
        cfg = self.cfg
        if not endpoints:
            raise ValueError("connect: an endpoint, or a list of the managers of a chain (none given)")
        planned, layers = [(endpoints[0], None)], 0
        if len(endpoints) > 1:
            if curve is not None:
                raise MenosError(ErrorCode.BAD_REQUEST, "a chain of managers over CURVE is not supported yet "
                                 "(each stage has a server key of its own); a cluster's chains are")  # fmt: skip
            planned, layers = self._plan([_serves(ep, cfg) for ep in endpoints])
        offered = hello.resume_steps
        while True:
            welcomes = []
            for i, (ep, blocks) in enumerate(planned):
                ask = replace_struct(hello, resume_steps=offered)
                if blocks is not None:  # the client's sections come from the first stage only
                    ask = replace_struct(ask, head_layers=blocks[0], tail_layers=layers - blocks[1],
                                         send_sections=hello.send_sections and i == 0)  # fmt: skip
                carry = carried_dir(cfg.state_dir, blocks) if cfg.state_dir else None
                joined = join(ep, hello_carrying(ask, carry), cfg, curve, carry)
                if joined.chain is not None:  # a cluster of stages: a Hello per stage, through its gateway
                    if blocks is not None:
                        raise MenosError(ErrorCode.PROTOCOL, f"{ep} answered the Hello for blocks {blocks} "
                                         "with another chain")  # fmt: skip
                    c = joined.chain
                    serving = [Serves(ep, "", c.layers, tuple(r), "") for r in c.ranges]
                    planned, layers = self._plan(serving, skip_outside=True)  # stages this client's range misses
                    break
                w = joined.welcome
                if blocks is not None:  # what the stage serves is what was asked of it
                    served = (tuple(w.server_layers), config_from_json(w.config).num_hidden_layers)
                    if served != (blocks, layers):
                        joined.chan.close()
                        raise MenosError(ErrorCode.PROTOCOL, f"{joined.endpoint} serves blocks {served[0]} of a "
                                         f"model of {served[1]}, asked for {blocks} of {layers}")  # fmt: skip
                # Keep copies of the server's checkpoints (to resume on any manager of a cluster).
                carries = bool(cfg.state_dir) and (bool(joined.manager) if cfg.carry_server_state is None
                                                   else cfg.carry_server_state)  # fmt: skip
                self.stages.append(Stage(joined.chan, joined.endpoint, joined.manager, w.session,
                                         tuple(w.server_layers), carry_dir=carry if carries else None))  # fmt: skip
                # Alive from now on: building the sections (a local checkpoint's load, PEFT's
                # first import) may take longer than the manager waits for a heartbeat.
                self.stages[-1].heartbeat = HeartbeatThread(joined.endpoint, w.session, w.heartbeat_s, curve)
                welcomes.append(w)
            else:
                chosen = {w.step for w in welcomes}
                if len(chosen) == 1:
                    return welcomes[0]
                if not chosen <= set(offered):  # each must choose from what was offered: then the offer shrinks
                    raise MenosError(ErrorCode.PROTOCOL, f"the stages resume from steps {sorted(chosen)}, "
                                     f"offered {sorted(offered)}")  # fmt: skip
                self._leave()
                offered = tuple(s for s in offered if s <= min(chosen))

    def _plan(self, serving: list[Serves], skip_outside: bool = False) -> tuple[list[tuple[str, tuple[int, int]]], int]:
        """(each stage's endpoint and blocks, the model's blocks) for this client's range."""
        cfg = self.cfg
        stages = plan(serving, cfg.head_layers, cfg.tail_layers, skip_outside)
        return [(s.endpoint, blocks) for s, blocks in stages], serving[0].layers

    def _leave(self) -> None:
        """Say goodbye to every stage joined (each worker goes at once) and forget them; on a
        failed connect the original error matters, not one of these."""
        self._close_stages()
        self.stages = []

    def _close_stages(self) -> Exception | None:
        """Say goodbye to every stage, whatever one of them raises; the first error."""
        first = None
        for stage in self.stages:
            try:
                stage.close(goodbye=True)
            except Exception as exc:  # noqa: BLE001  the caller raises it, or has a better one
                first = first or exc
        return first

    @property
    def session(self) -> str:
        """The session id (a chain's: the first stage's; ``stages`` holds each one's)."""
        return self.stages[0].session

    @property
    def endpoint(self) -> str:
        """The manager's endpoint (a chain's: the first stage's)."""
        return self.stages[0].endpoint

    @property
    def manager(self) -> str:
        """The manager's id in a cluster ("" when connected to a manager directly)."""
        return self.stages[0].manager

    @property
    def bytes_sent(self) -> int:
        return sum(stage.chan.bytes_sent for stage in self.stages)

    @property
    def bytes_received(self) -> int:
        return sum(stage.chan.bytes_received for stage in self.stages)

    def _open(self) -> list[Stage]:
        """The stages, while the session is open."""
        if self._closed:
            raise MenosError(ErrorCode.CLOSED, f"this client is closed (session {self.session}); connect again")
        if self._out_of_step:
            raise MenosError(ErrorCode.BAD_REQUEST, f"{self._out_of_step}: close() and connect again with "
                             "resume=True (every stage restarts from the latest step all of them saved)")  # fmt: skip
        return self.stages

    def _send_all(self, msg) -> None:
        """A message every stage takes without a reply (a generation's end)."""
        for stage in self._open():
            stage.chan.send(msg)

    @property
    def steps(self) -> int:
        """Training steps (micro-batches) done, counting those before a resume."""
        return self.opt.steps

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """This side's AdamW (None when the client's sections hold no adapter)."""
        return self.opt.optimizer

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_state(self, directory: str | None = None) -> str:
        """Checkpoint the client's sections (adapter, optimizer, step) into ``directory``
        (default: the ``state_dir`` given to connect). Resume with ``resume=True``."""
        if self._driver is not None:
            raise MenosError(ErrorCode.BAD_REQUEST, "save_state: a trainer's optimizer steps this session's adapter "
                             "(hf_model()); its checkpoints hold the adapter and the optimizer (save_steps, "
                             "resume_from_checkpoint)")  # fmt: skip
        directory = directory or self.state_dir
        if directory is None:
            raise ValueError("save_state needs a directory (or connect(..., state_dir=...))")
        if self._unapplied is not None:  # its gradients hold a micro-batch the step count does not
            raise MenosError(ErrorCode.BAD_REQUEST, "a clipped optimizer step waits for the server (its ApplyStep "
                             "failed): train on to send it again; the last checkpoint stays the latest")  # fmt: skip
        state = self._adapter_state()
        path = checkpoint.save(directory, self.steps, state, self.optimizer, self.opt.grads(state), self.layout)
        if directory == self.state_dir:
            carrying = [s for s in self.stages if s.carry_dir]
            if carrying:  # the servers' side of this step too (each saves it now if it has not)
                self._open()
            for stage in carrying:
                fetch_server_checkpoint(stage.chan, stage.carry_dir)
            self._saved = self.steps
        return path

    def _init_adapter(self, directory: str) -> None:
        """Start from a PEFT adapter: this side's part here, the server's to the workers (a
        chain's: each stage its blocks')."""
        state = read_peft_adapter(directory, self.adapter, self.config, self.dtype)
        with torch.no_grad():
            for name, p in self._adapter_state().items():
                p.copy_(state.pop(name))
        prefix, ranges = family_of(self.config).layers_prefix, [stage.blocks for stage in self.stages]
        if len(ranges) > 1 and (lost := [n for n in state if stage_of(n, prefix, ranges) is None]):
            raise ValueError(f"init_adapter {directory}: {lost[0]} belongs to no stage of this chain")
        for i, stage in enumerate(self.stages):
            part = state if len(ranges) == 1 else {n: t for n, t in state.items() if stage_of(n, prefix, ranges) == i}
            stage.chan.send(AdapterLoad(names=tuple(part)), list(part.values()))
            self._reply(stage, AdapterLoaded)

    def hf_model(self, adapter: bool = True):
        """This session as a transformers causal LM that ``Trainer`` and TRL's trainers drive
        (``menos.hf_model.SplitCausalLM``); the trainer's optimizer then steps the whole
        adapter, the server's part included. ``adapter=False``: the frozen base alone, with
        no parameters (DPO's reference model, free since the base is shared)."""
        from menos.hf_model import SplitCausalLM, SplitForCausalLM

        if len(self.stages) > 1:
            raise MenosError(ErrorCode.BAD_REQUEST, "hf_model() over a chain of managers is not supported yet: "
                             "train with train_step or fit, or connect to one manager")  # fmt: skip
        if not adapter:  # a plain causal LM (TRL treats a PEFT model as the policy, not a reference)
            return SplitForCausalLM(self, None)
        if self._hf_model is None:
            self._hf_model = SplitCausalLM(self)
        return self._hf_model

    def save_adapter(self, directory: str) -> str:
        """Write the whole model's adapter (this client's sections and the server's part,
        fetched from the worker) as ONE PEFT adapter: load it with
        ``peft.PeftModel.from_pretrained(full_base_model, directory)``."""
        if self._driver is not None:
            self._driver.push()  # the trainer's last step
        state = {}
        for stage in self._open():  # a chain's: each stage's blocks
            stage.chan.send(AdapterRequest())
            reply, tensors = self._reply(stage, AdapterState)
            state.update(zip(reply.names, tensors, strict=True))
        state.update({n: p for n, p in self._adapter_state().items()})
        return save_peft_adapter(directory, self.adapter, state, self.config, self.dtype, self.model_path)

    # ---------------------------------------------------------------- steps

    def _check_batch(self, input_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
        self._open()
        return check_batch(input_ids, labels, self.batch_size, self.seq_len, self.config.vocab_size)

    def _head(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What is sent: the head's output after the defence, (B, T, H)."""
        return self._embed_head(input_ids)[1]

    def _embed_head(self, input_ids: torch.Tensor, pads: tuple[int, ...] = (),
                    adapter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(the embeddings, what is sent), each (B, T, H): NoPeek compares the two. ``pads``:
        each row's left pads; ``adapter=False`` (inside ``adapters.disabled``): the base's
        positions, as prefix tuning's shift goes with its prefix."""
        positions = kv_cache.positions(pads, 0, input_ids.shape[1]) if pads else None
        hidden = embed(self.model, input_ids, self.position_offset if adapter else 0, positions)
        return hidden, self._defend(self.runner.run(hidden, self.head_blocks, pads=pads), input_ids)

    def _defend(self, x_c: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The head's output as sent for request ``self._step``: x_c itself without a defence."""
        gen = defences.generator(self.defence, self.cfg.seed, self._step, input_ids)
        return defences.apply(x_c, self.defence, gen)

    def _defend_gradient(self, pending: "PendingStep") -> torch.Tensor:
        """The gradient for the server's output as sent back: x_s.grad itself without gradnoise."""
        g = pending.x_s.grad
        return defences.apply_to_gradient(g, self.defence, defences.generator(self.defence, self.cfg.seed,
                                                                              pending.step, g, gradient=True))

    def _tail_loss(self, x_s: torch.Tensor, labels: torch.Tensor, loss_fn=None) -> torch.Tensor:
        out = logits(self.model, self.runner.run(x_s, self.tail_blocks))
        if loss_fn is None:
            return causal_lm_loss(out, labels)
        loss = loss_fn(out, labels)  # your own loss, on this side: logits and labels stay here
        if not (torch.is_tensor(loss) and loss.dim() == 0 and loss.is_floating_point()):
            raise ValueError(f"loss_fn must return a scalar float tensor, got {type(loss).__name__}"
                             + (f" of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else ""))  # fmt: skip
        return loss

    @staticmethod
    def _reply(stage: Stage, expect, step: int | None = None):
        """The reply of type ``expect`` (to request ``step``, or to one that names none: an
        adapter's load or export). A late reply to a request given up on (it timed out, or was
        interrupted) is skipped: a step's forward and backward share its number, so the type
        tells them apart."""
        while True:
            reply, tensors = stage.chan.recv((expect, *STEPPED))
            if isinstance(reply, expect) and (step is None or reply.step == step):
                return reply, tensors

    def _round_trip(self, msg, tensor, expect, stages: list[Stage] | None = None):
        """Send one request, wait for its reply; returns (reply, tensors, server s, comm s).
        Over a chain the request visits every stage (or ``stages``), the client relaying the
        tensor: a forward's activations from the first stage to the last, a backward's gradients
        from the last to the first (``menos.chain.combine`` says what the one reply holds)."""
        if self._driver is not None and isinstance(msg, Forward) and not msg.cached:
            self._driver.push()  # a trainer's step, before the server computes with its part
        t0 = time.perf_counter()
        stages = self._open() if stages is None else stages
        if isinstance(msg, Backward):
            stages = stages[::-1]
        replies, tensors = [], []
        for k, stage in enumerate(stages):
            # A backward's gradient for its input goes on to the stage before, which needs it.
            ask = replace_struct(msg, want_input_grad=True) if isinstance(msg, Backward) and k + 1 < len(stages) else msg
            try:
                reply, tensors = self._exchange(stage, ask, tensor, expect)
            except BaseException:
                if replies and isinstance(msg, Backward):  # the stages after this one took the step, it did not
                    self._out_of_step = (f"step {msg.step}'s backward failed at blocks {blocks_text(stage.blocks)} "
                                         "after the stages behind them took it")  # fmt: skip
                raise
            replies.append(reply)
            tensor = tensors[0] if tensors else None
        try:
            reply = combine(replies)
        except MenosError:
            if isinstance(msg, Backward):  # every stage took it, and they disagree on the optimizer step
                self._out_of_step = f"step {msg.step}'s backward: the stages' optimizers are out of step"
            raise
        server = sum(r.compute_s + r.queue_s + r.swap_s for r in replies)
        return reply, tensors, server, max(0.0, time.perf_counter() - t0 - server)

    def _exchange(self, stage: Stage, msg, tensor, expect):
        """One request to one stage and its reply: (reply, tensors decoded)."""
        stage.chan.send(msg, [] if tensor is None else codecs.encode(tensor, self.codec))
        reply, tensors = self._reply(stage, expect, msg.step)
        # A driven session's adapter gradients come last, raw (menos.driven).
        n_raw = getattr(reply, "adapter_grads", 0)
        cut, raw = tensors[:len(tensors) - n_raw], tensors[len(tensors) - n_raw:]
        if len(raw) != n_raw:
            raise MenosError(ErrorCode.PROTOCOL, f"the server's {type(reply).__name__} names {n_raw} adapter "
                             f"gradients but carries {len(tensors)} tensors")  # fmt: skip
        tensors = raw
        if cut:  # an activation or a gradient, in the cut layer's codec
            try:
                tensors = [codecs.decode(cut, self.codec, self.dtype), *raw]
            except codecs.CodecError as exc:
                raise MenosError(ErrorCode.PROTOCOL, f"the server's {type(reply).__name__}: {exc}") from None
        return reply, tensors

    def forward_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, loss_fn=None) -> "PendingStep":
        """First half of ``train_step``: forward through all sections and the loss
        (``loss_fn(logits, labels) -> scalar``, default: causal-LM cross entropy).

        The server keeps what its backward needs until ``backward_step``; steps must
        alternate forward_step, backward_step."""
        if self._driver is not None:
            raise MenosError(ErrorCode.BAD_REQUEST, "this session's adapter is stepped by the optimizer of its "
                             "hf_model() (a trainer): train through it, or connect another session")  # fmt: skip
        input_ids, labels = self._check_batch(input_ids, labels)
        self._finish_step()
        t0 = time.perf_counter()
        sent, received = self.bytes_sent, self.bytes_received
        self._step += 1
        set_dropout_step(self.model, self.steps)  # LoRA dropout: this micro-batch's masks
        hidden, x_c = self._embed_head(input_ids)
        nopeek = defences.nopeek_term(self.defence, hidden, x_c)
        self.last_nopeek = None if nopeek is None else nopeek.item()
        reply, (x_s,), server, comm = self._round_trip(Forward(step=self._step, train=True), x_c.detach(), Activations)
        x_s.requires_grad_(True)
        loss = self._tail_loss(x_s, labels, loss_fn)
        return PendingStep(self._step, x_c, x_s, loss, t0, reply.compute_s, reply.queue_s, reply.swap_s, comm,
                           sent, received, nopeek)  # fmt: skip

    def backward_step(self, pending: "PendingStep") -> float:
        """Second half of ``train_step``: backward on both sides, adapter steps. Returns the loss
        (the task's: NoPeek's term trains the head but is not in it; see ``last_nopeek``)."""
        if pending.step != self._step:
            raise ValueError(f"backward_step for step {pending.step}, but the last forward_step was {self._step}")
        # A failed round trip leaves this side's gradients as they were (the server's too),
        # so that the micro-batch can be sent again.
        with self.opt.undone_on_failure():
            # Accumulation: each micro-batch's loss / k, as the transformers Trainer.
            (pending.loss / self.opt.recipe.grad_accum_steps).backward()  # reaches x_s: g_c = dloss/dx_s
            want_input_grad = pending.x_c.requires_grad  # False when nothing before the server trains
            reply, grads, server, comm = self._round_trip(
                Backward(step=pending.step, want_input_grad=want_input_grad), self._defend_gradient(pending), Gradients
            )
            if want_input_grad:  # NoPeek's term, when on, reaches the head beside the server's gradient
                extra = [] if pending.nopeek is None else [pending.nopeek / self.opt.recipe.grad_accum_steps]
                torch.autograd.backward([pending.x_c, *extra], [grads[0], *(None for _ in extra)])
        ends = self.opt.ends_step()
        if (reply.grad_sq_norm is not None) != (ends and self.opt.clipping):
            raise MenosError(ErrorCode.PROTOCOL, f"step {pending.step}: the server's optimizer is out of step with ours")
        if reply.grad_sq_norm is not None:
            # The global norm over every side's gradients; the servers step first, one stage at a
            # time, so a failure leaves this side before the step and the stages that did not
            # apply it yet to be sent it again (by the next call).
            self._unapplied = (pending.step, clip_scale(self.opt.recipe.max_grad_norm,
                                                        [self.opt.grad_sq_norm(), reply.grad_sq_norm]),
                               list(self.stages), [])  # fmt: skip
            stepped, c2 = self._apply_step()
            reply = msgspec.structs.replace(
                reply, checkpoint=stepped.checkpoint, compute_s=reply.compute_s + stepped.compute_s,
                queue_s=reply.queue_s + stepped.queue_s, swap_s=reply.swap_s + stepped.swap_s)  # fmt: skip
            comm += c2
        elif ends:
            self.opt.step()
        else:
            self.opt.accumulate()
        self._checkpoint_with_server(reply.checkpoint)
        self.times.server_compute.append(pending.compute_s + reply.compute_s)
        self.times.server_queue.append(pending.queue_s + reply.queue_s)
        self.times.server_swap.append(pending.swap_s + reply.swap_s)
        self.times.communication.append(pending.comm_s + comm)
        self.times.total.append(time.perf_counter() - pending.t0)
        self.times.bytes_sent.append(self.bytes_sent - pending.bytes_sent)
        self.times.bytes_received.append(self.bytes_received - pending.bytes_received)
        return pending.loss.item()

    def _apply_step(self):
        """The clipped optimizer step: the server's first, then this side's. Returns
        (StepApplied, communication seconds)."""
        step, scale, waiting, replies = self._unapplied
        comm = 0.0
        while waiting:  # one stage at a time: a failure leaves those not yet stepped to send it again
            stepped, _, _, c = self._round_trip(ApplyStep(step=step, scale=scale), None, StepApplied, waiting[:1])
            waiting.pop(0)
            replies.append(stepped)  # kept across a retry: the checkpoint every stage saved is the least
            comm += c
        self._unapplied = None
        self.opt.step(scale)
        return combine(replies), comm

    def _finish_step(self) -> None:
        """A clipped step whose ApplyStep failed: send it again before anything else."""
        if self._unapplied is not None:
            stepped, _ = self._apply_step()
            self._checkpoint_with_server(stepped.checkpoint)

    def _checkpoint_with_server(self, saved: int) -> None:
        """The server saved step ``saved``: when it is ours too, save this side, so both
        sides have a checkpoint of it."""
        if saved == self.steps and self.state_dir:
            self.save_state()

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, loss_fn=None) -> float:
        """One split iteration: forward, loss, backward, adapter steps on both sides.
        ``loss_fn(logits, labels) -> scalar tensor`` replaces causal-LM cross entropy; it runs
        here, and accumulation and clipping apply to it unchanged. Returns that loss (without
        NoPeek's term, which ``last_nopeek`` reports)."""
        return self.backward_step(self.forward_step(input_ids, labels, loss_fn))

    def logprobs(self, input_ids, labels=None, attention_mask=None, adapter: bool = True) -> torch.Tensor:
        """The log-probability of each label token, (batch, seq - 1), forward only (menos.scoring);
        ``adapter=False``: the frozen base alone on both sides."""
        return logprobs(self, input_ids, labels, attention_mask, adapter)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Prompts plus new tokens, as ``transformers``' ``generate`` (``menos.generation``: its
        keyword arguments); the server's blocks keep their cache on the server."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def fit(self, batches, steps: int | None = None, eval_batches=None, progress: bool | None = None,
            tokenizer=None, text_column: str = "text", loss_fn=None) -> list[float]:  # fmt: skip
        """Train on ``batches`` for ``steps`` steps (default: until they end); returns each step's
        loss. ``batches``: input_ids, (input_ids, labels), or records such as a ``datasets.Dataset``
        (``menos.fitting.fit``, which says more)."""
        return fit(self, batches, steps, eval_batches, progress, tokenizer, text_column, loss_fn)

    @torch.no_grad()
    def eval_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, loss_fn=None) -> float:
        """Loss of the current split model on a batch; nothing is trained."""
        input_ids, labels = self._check_batch(input_ids, labels)
        self._finish_step()
        self._step += 1
        set_dropout_step(self.model, None)
        _, (x_s,), _, _ = self._round_trip(Forward(step=self._step, train=False), self._head(input_ids), Activations)
        return self._tail_loss(x_s, labels, loss_fn).item()

    # ---------------------------------------------------------------- life cycle

    def close(self) -> None:
        """End the session: every side checkpoints (with a state_dir), the workers exit."""
        if self._closed:
            return
        try:
            if self.state_dir and self.steps > self._saved and self._unapplied is None and not self._out_of_step:
                self.save_state()
        except MenosError as exc:  # a server is gone: the others still get their goodbye
            if exc.code not in (ErrorCode.DISCONNECTED, ErrorCode.TIMEOUT):
                raise
        finally:
            self._closed = True
            first = self._close_stages()
            if first is not None:
                raise first

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(endpoint: str | list[str] = "tcp://127.0.0.1:5555", config: ClientConfig | None = None,
            **kwargs) -> Client:  # fmt: skip
    """Open a fine-tuning session; the arguments are ``menos.ClientConfig``'s fields. ``endpoint``:
    a manager's or a cluster gateway's, or a list of managers' that serve the base's blocks as a
    chain (each started with ``--blocks A:B``; ``menos.chain``)."""
    return Client(endpoint, config, **kwargs)
