"""Generating text through the split: the base stays on the server, the prompt and the
sampled tokens with the client.

The prompt crosses the cut once: the worker opens a key/value cache of the server's
blocks for the generation's whole length, under one memory token it holds until the
end (``Forward.generate``). Each new token is then one round trip of one position's
activations (``Forward.cached``), while each side keeps the cache of its own blocks.
``GenerationEnd`` frees the worker's cache and its token; so does any other request,
and the session's end. Results equal ``transformers``' ``generate`` on the whole model:
greedy token for token, and the same sampling warpers (temperature, top-k, top-p).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from menos import kv_cache
from menos.adapters import disabled, set_dropout_step
from menos.batches import check_prompt
from menos.errors import MenosError
from menos.kv_cache import KVCache
from menos.messages import Activations, Forward, GenerationEnd
from menos.prefix import kv_shape
from menos.surgery import embed, family_of, logits


@torch.no_grad()
def generate(client, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             pad_token_id: int | None = None, seed: int | None = None, adapter: bool = True,
             streamer=None) -> torch.Tensor:  # fmt: skip
    """The prompts (left-padded, with their ``attention_mask``) followed by up to
    ``max_new_tokens`` new tokens each, (batch, prompt + new); after a row's eos (default:
    the model config's), its tokens are ``pad_token_id`` (default: the config's, else the
    eos), and generation stops early once every row has ended. ``seed`` makes sampling
    reproducible; ``adapter=False`` generates with the frozen base; ``streamer`` is a
    ``transformers`` streamer (e.g. ``TextStreamer``)."""
    _check_streamer(streamer)
    if client.position_offset:
        raise ValueError("generate does not support prefix tuning yet (LoRA, DoRA, rsLoRA and IA3 generate)")
    ids, pads = check_prompt(input_ids, attention_mask, client.batch_size, client.seq_len, client.config.vocab_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    b, t = ids.shape
    total = t + max_new_tokens
    longest = total - min(pads)  # real tokens of the longest row, at the end
    if family_of(client.config).name == "opt" and longest > client.config.max_position_embeddings:
        raise ValueError(f"{longest} positions exceed this model's max_position_embeddings "
                         f"({client.config.max_position_embeddings}): shorten the prompt or max_new_tokens")  # fmt: skip
    pick = _sampler(do_sample, temperature, top_k, top_p, seed)
    if eos_token_id is None:  # transformers' defaults: the model's own
        eos_token_id = getattr(client.config, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(client.config, "pad_token_id", None)
    eos = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                       else list(eos_token_id), dtype=torch.long)  # fmt: skip
    if eos.numel() and pad_token_id is None:
        pad_token_id = int(eos[0])  # as transformers does
    client._finish_step()  # noqa: SLF001  a clipped step that waits goes first
    kv_heads, head_dim = kv_shape(client.config)
    cache = KVCache([*client.head_blocks, *client.tail_blocks], b, total, kv_heads, head_dim, client.dtype)
    set_dropout_step(client.model, None)
    out, x, unfinished, opened = ids, ids, torch.ones(b, dtype=torch.bool), False
    if streamer is not None:
        streamer.put(ids)
    try:
        with contextlib.nullcontext() if adapter else disabled(client.model):
            for i in range(max_new_tokens):
                start = out.shape[1] - x.shape[1]
                hidden = embed(client.model, x, position_ids=kv_cache.positions(pads, start, x.shape[1]))
                x_c = client.runner.run(hidden, client.head_blocks, cache=cache, pads=pads)
                client._step += 1  # noqa: SLF001
                msg = Forward(step=client._step, train=False, adapter=adapter, generate=0 if i else total,  # noqa: SLF001
                              pads=() if i else pads, cached=i > 0)  # fmt: skip
                opened = True  # from the prompt's send on: any way out ends the generation on the server too
                _, (x_s,), _, _ = client._round_trip(msg, client._defend(x_c, x), Activations)  # noqa: SLF001
                y = client.runner.run(x_s, client.tail_blocks, cache=cache, pads=pads)
                scores = logits(client.model, y[:, -1:])[:, -1].float()
                nxt = pick(out, scores)
                if eos.numel():
                    nxt = torch.where(unfinished, nxt, pad_token_id)
                    unfinished &= ~torch.isin(nxt, eos)
                out = torch.cat([out, nxt[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(nxt)
                if not unfinished.any():
                    break
                x = nxt[:, None]
    finally:
        if opened:
            _end(client)
        if streamer is not None:
            streamer.end()
    return out


def _check_streamer(streamer) -> None:
    """Before anything runs: a streamer is called ``put(token_ids)`` and ``end()``, as transformers' are."""
    lacks = [m for m in ("put", "end") if not callable(getattr(streamer, m, None))]
    if lacks and streamer is not None:
        raise TypeError(f"streamer={streamer!r} has no {' or '.join(f'{m}()' for m in lacks)}: pass a transformers "
                        "streamer such as TextStreamer(tokenizer), or an object with put(token_ids) and end()")  # fmt: skip


def _end(client) -> None:
    """Free the worker's cache now (it goes anyway at the next request or the session's end)."""
    try:
        client._send_all(GenerationEnd())  # noqa: SLF001  (a chain's: every stage's cache)
    except MenosError:  # closed or disconnected: nothing is held any more
        pass


def _sampler(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, seed: int | None):
    """(tokens so far, scores (B, V)) -> next tokens (B,): argmax, or a draw after
    ``transformers``' own warpers, in its order."""
    if not do_sample:
        return lambda ids, scores: scores.argmax(dim=-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    rng = None if seed is None else torch.Generator().manual_seed(seed)

    def pick(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in warpers:
            scores = warp(ids, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=rng).squeeze(1)

    return pick
