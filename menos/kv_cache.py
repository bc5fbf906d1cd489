"""Generation through the split: a key/value cache for a set of blocks, and the mask and
positions of left-padded prompts. Used alike by the client (its own blocks) and by the
worker (the server's blocks), so both sides attend and count positions the same way.

The cache is allocated once, for the whole generation (batch x its length), so what it
holds is known before the prompt runs: the worker's memory token for a generation is
its size (``menos.estimator.kv_cache_bytes``) plus one forward's working memory.
Prompts are left-padded, as ``transformers``' ``generate`` wants them: row b has
``pad[b]`` pad tokens in front. A pad is never attended to; a real token's position is
the number of real tokens before it, as ``generate`` computes positions from the mask.
"""

from __future__ import annotations

from typing import Iterable

import torch


class KVCache:
    """What the attention layers see as their cache (``cache.update``): each block's keys and
    values of every position so far, in buffers of the generation's full length."""

    def __init__(self, blocks: Iterable[int], batch: int, length: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):  # fmt: skip
        shape = (batch, kv_heads, length, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in blocks}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in blocks}
        self.filled = dict.fromkeys(self.k, 0)  # positions written, per block
        self.length = length

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        start = self.filled[layer_idx]
        stop = start + key_states.shape[-2]
        if stop > self.length:
            raise ValueError(f"the generation's cache holds {self.length} positions; position {stop - 1} is past it")
        self.k[layer_idx][:, :, start:stop] = key_states
        self.v[layer_idx][:, :, start:stop] = value_states
        self.filled[layer_idx] = stop
        return self.k[layer_idx][:, :, :stop], self.v[layer_idx][:, :, :stop]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled.get(layer_idx, 0)


def left_pads(mask: torch.Tensor) -> tuple[int, ...]:
    """Each row's number of leading pads, for a (B, T) mask of 0 and 1 that is left-padded
    (zeros, then ones, at least one); ValueError otherwise."""
    pads = (mask == 0).sum(dim=1)
    t = mask.shape[1]
    want = torch.arange(t).unsqueeze(0) >= pads.unsqueeze(1)  # ones after each row's pads
    if not bool((mask.bool() == want).all()) or bool((pads == t).any()):
        raise ValueError("generate needs left-padded prompts (pads first, then at least one token; "
                         "a tokenizer does this with padding_side='left')")  # fmt: skip
    return tuple(int(p) for p in pads)


def positions(pads: tuple[int, ...], start: int, t: int, device=None) -> torch.Tensor:
    """(B, t) position ids of sequence indices start..start+t: a real token's is the number
    of real tokens before it; a pad's is 0 (it is never attended to)."""
    idx = torch.arange(start, start + t, device=device).unsqueeze(0)
    pad = torch.tensor(pads, device=device).unsqueeze(1)
    return (idx - pad).clamp(min=0)


def attention_mask(pads: tuple[int, ...], start: int, t: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive mask (B, 1, t, start + t): query i (sequence index start + i) sees key j when
    j <= start + i and j is not a pad; else dtype's min (finite: a pad's own row stays finite)."""
    q = torch.arange(start, start + t, device=device).view(1, t, 1)
    k = torch.arange(start + t, device=device).view(1, 1, start + t)
    pad = torch.tensor(pads, device=device).view(-1, 1, 1)
    seen = (k <= q) & (k >= pad)  # (B, t, start + t)
    mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill(~seen, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
