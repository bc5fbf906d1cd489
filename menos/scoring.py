"""Using a trained split model without holding its base: the log-probability of each label.

The client runs its sections, the server its blocks, forward only (an evaluation token,
nothing kept); the labels never leave the client. ``adapter=False`` runs the frozen
base alone on both sides: the reference model of DPO, free since the base is shared.
"""

from __future__ import annotations

import contextlib

import torch

from menos.adapters import disabled, set_dropout_step
from menos.batches import check_mask
from menos.messages import Activations, Forward
from menos.surgery import logits


@torch.no_grad()
def logprobs(client, input_ids, labels=None, attention_mask=None, adapter: bool = True) -> torch.Tensor:
    """log p(labels[:, t + 1] | input_ids[:, : t + 1]) for t < seq - 1: (batch, seq - 1), float32;
    0 where the label is -100 or the mask is 0 (right padding only)."""
    input_ids, labels = client._check_batch(input_ids, labels)  # noqa: SLF001
    mask = check_mask(attention_mask, input_ids.shape)
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    client._finish_step()  # noqa: SLF001  a clipped step that waits goes first
    client._step += 1  # noqa: SLF001
    set_dropout_step(client.model, None)
    with contextlib.nullcontext() if adapter else disabled(client.model):
        _, x_c = client._embed_head(input_ids, adapter=adapter)  # noqa: SLF001  what is sent, as in training
        msg = Forward(step=client._step, train=False, adapter=adapter)  # noqa: SLF001
        _, (x_s,), _, _ = client._round_trip(msg, x_c, Activations)  # noqa: SLF001
        out = logits(client.model, client.runner.run(x_s, client.tail_blocks))
    return token_logprobs(out, labels)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> log p(labels[:, t + 1]) at each t < T - 1, (B, T - 1)
    float32, 0 where the label is -100; differentiable, for your own ``loss_fn`` (e.g. DPO)."""
    target = labels[:, 1:]
    got = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return got.masked_fill(target == -100, 0.0)
