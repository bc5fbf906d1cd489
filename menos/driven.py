"""A driven session: the client's optimizer (a trainer's, ``menos.hf_model``) steps the
server's part of the adapter, through mirrors of it here.

- ``drive(client)`` asks the worker to stop its own optimizer (``AdapterRequest(drive=True)``)
  and makes the mirrors from the server's adapter as it is: ordinary ``nn.Parameter``s;
- ``ServerBlocks`` is the server's range as one autograd node: its forward and backward
  are round trips, and the mirrors are its inputs, so that autograd adds the server's
  adapter gradients (sent with the cut's gradient, once an accumulation ends) into their
  ``.grad`` as it does for local parameters;
- ``DrivenLink.push`` sends the stepped mirrors back (``AdapterLoad``) before the server's
  next forward.
"""

from __future__ import annotations

import torch
from torch import nn

from menos import defences
from menos.errors import MenosError
from menos.messages import (Activations, AdapterLoad, AdapterLoaded, AdapterRequest, AdapterState, Backward, ErrorCode,
                            Forward, Gradients)  # fmt: skip


class ServerAdapter(nn.Module):
    """The mirrors of the server's adapter parameters, under their own names (a module tree
    keeps each dotted name whole, so name-based rules such as weight decay's see them)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.names = tuple(state)
        for name, t in state.items():
            *path, leaf = name.split(".")
            node = self
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, nn.Module())
                node = getattr(node, part)
            node.register_parameter(leaf, nn.Parameter(t.detach().clone()))
        self._sent = [t.detach().clone() for t in state.values()]  # what the server holds

    def mirrors(self) -> list[nn.Parameter]:
        return [self.get_parameter(n) for n in self.names]

    def stepped(self) -> bool:
        """Whether a mirror changed since the server last had it (an optimizer step, a load).
        Compared by value: fused optimizers update in place without bumping version counters."""
        return not all(torch.equal(p, s) for p, s in zip(self.mirrors(), self._sent))

    def synced(self) -> None:
        for p, s in zip(self.mirrors(), self._sent):
            s.copy_(p.detach())


def _syncs_now(under_trainer: bool) -> bool:
    """Whether this micro-batch ends an optimizer step's accumulation: a Trainer sets it in
    accelerate's gradient state before each micro-batch (it syncs the last one); in a loop
    of your own every backward takes the server's gradients (always exact, more bytes)."""
    if not under_trainer:
        return True
    from accelerate.state import GradientState

    return bool(GradientState._shared_state.get("sync_gradients", True))  # noqa: SLF001  read, never create


class ServerBlocks(torch.autograd.Function):
    """The server's blocks as one autograd node; the mirrors are inputs, so that autograd
    adds the server's adapter gradients into their ``.grad`` as it does for local ones."""

    @staticmethod
    def forward(ctx, x_c, link, step, pads, *mirrors):
        ctx.link, ctx.step = link, step
        x_s = server_forward(link.client, step, x_c, train=True, pads=pads)  # (pushes stepped mirrors first)
        link.open_step = step  # the server keeps this forward for its backward, and only this one
        return x_s

    @staticmethod
    def backward(ctx, g):
        g_c, grads = ctx.link.backward(ctx.step, g, ctx.needs_input_grad[0])
        return (g_c, None, None, None, *(grads or (None,) * len(ctx.link.adapter.names)))


def drive(client) -> "DrivenLink":
    """Hand the session's server adapter to a trainer's optimizer (once): its mirrors here."""
    if client._driver is None:  # noqa: SLF001
        if client.steps:
            raise MenosError(ErrorCode.BAD_REQUEST, f"hf_model(): this session trained {client.steps} steps with its "
                             "own optimizer (train_step/fit); save_adapter and connect a new session with "
                             "init_adapter= to go on with a trainer")  # fmt: skip
        if client.defence.nopeek:
            raise ValueError("hf_model(): the nopeek defence adds its term in train_step only; use clip, noise or "
                             "gradnoise with a trainer")  # fmt: skip
        (stage,) = client._open()  # noqa: SLF001  (hf_model refuses a chain)
        stage.chan.send(AdapterRequest(drive=True))
        reply, tensors = client._reply(stage, AdapterState)  # noqa: SLF001
        client._driver = DrivenLink(client, ServerAdapter(dict(zip(reply.names, tensors, strict=True))))  # noqa: SLF001
    return client._driver  # noqa: SLF001


class DrivenLink:
    """The round trips of a driven session (the client's channel, step ids, codec, defences)."""

    def __init__(self, client, adapter: ServerAdapter):
        self.client, self.adapter = client, adapter
        self.under_trainer = False  # the last forward was a Trainer's (SplitCausalLM.forward)
        self.open_step: int | None = None  # the training forward the server keeps
        self.fresh = False  # the client zeroed its gradients: the server forgets those it holds

    def push(self) -> None:
        """The stepped mirrors to the server, before anything it computes depends on them."""
        if self.adapter.stepped():
            c = self.client
            mirrors = [p.detach() for p in self.adapter.mirrors()]
            (stage,) = c._open()  # noqa: SLF001
            stage.chan.send(AdapterLoad(names=self.adapter.names), mirrors)
            c._reply(stage, AdapterLoaded)  # noqa: SLF001
            self.adapter.synced()
            self.open_step = None  # new weights: the server dropped a training forward it kept

    def backward(self, step: int, g: torch.Tensor, want_input_grad: bool):
        if step != self.open_step:
            raise ValueError(f"hf_model(): a backward through the split forward of request {step}, which a later "
                             "training forward replaced: the server keeps one training forward at a time, so "
                             "backpropagate each loss before the next forward with gradients (or run that one "
                             "under torch.no_grad())")  # fmt: skip
        c = self.client
        gen = defences.generator(c.defence, c.cfg.seed, step, g, gradient=True)
        g = defences.apply_to_gradient(g.contiguous(), c.defence, gen)
        take = _syncs_now(self.under_trainer)
        msg = Backward(step=step, want_input_grad=want_input_grad, adapter_grads=take, fresh=self.fresh)
        reply, tensors, _, _ = c._round_trip(msg, g, Gradients)  # noqa: SLF001
        self.fresh, self.open_step = False, None
        cut, raw = tensors[:len(tensors) - reply.adapter_grads], tensors[len(tensors) - reply.adapter_grads:]
        grads = None
        if take:
            mirrors = self.adapter.mirrors()
            if len(raw) != len(mirrors) or any(t.shape != p.shape for t, p in zip(raw, mirrors)):
                raise MenosError(ErrorCode.PROTOCOL, f"step {step}: the server sent {len(raw)} adapter gradients "
                                 f"for {len(mirrors)} parameters, or of other shapes")  # fmt: skip
            grads = [t.to(p.device, p.dtype) for t, p in zip(raw, mirrors)]
        return (cut[0] if want_input_grad and cut else None), grads


def server_forward(client, step: int, x_c: torch.Tensor, train: bool, adapter: bool = True,
                    pads: tuple[int, ...] = ()) -> torch.Tensor:  # fmt: skip
    msg = Forward(step=step, train=train, adapter=adapter, pads=pads)
    _, (x_s,), _, _ = client._round_trip(msg, x_c.detach(), Activations)  # noqa: SLF001
    return x_s
