"""Prefix tuning across the cut: each section holds the virtual keys and values of its own blocks.

PEFT's prefix tuning keeps every layer's prefix in one embedding of shape
(N, layers x 2 x kv_heads x head_dim) and hands it to the model as a key/value cache,
so each attention sees N extra keys and values in front of the real tokens and every
real token's position is shifted by N. Here each block owns its slice as a parameter
of shape (N, 2, kv_heads, head_dim) (keys, then values), so the client's blocks and the
server's train their own parts, and ``PrefixCache`` stands in for the cache during a
run. ``assemble`` puts the slices back into PEFT's one embedding for export.
"""

from __future__ import annotations

import torch
from torch import nn

MODULE = "prefix_tuning"  # the submodule each block gets
PARAM = f"{MODULE}.weight"


def kv_shape(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of one block's attention, as PEFT provisions prefixes for GQA."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


class PrefixKV(nn.Module):
    """One block's N virtual keys and values."""

    enabled = True  # off: the block runs as the frozen base (menos.adapters.disabled)

    def __init__(self, n: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, 2, kv_heads, head_dim, dtype=dtype, device=device))

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]


def attach(blocks: nn.ModuleDict, config, n: int, dtype: torch.dtype) -> None:
    kv_heads, head_dim = kv_shape(config)
    for block in blocks.values():
        device = next(block.parameters()).device
        block.add_module(MODULE, PrefixKV(n, kv_heads, head_dim, dtype, device))


def of(blocks: nn.ModuleDict) -> dict[int, PrefixKV]:
    """The blocks' prefixes by global block index (empty without prefix tuning)."""
    return {int(k): getattr(b, MODULE) for k, b in blocks.items() if hasattr(b, MODULE) and getattr(b, MODULE).enabled}


class PrefixCache:
    """What the attention layers see as their cache during one run: ``update`` puts the
    block's prefix in front of the new keys and values and stores nothing (so the
    prefix's gradient flows through the concatenation)."""

    def __init__(self, prefixes: dict[int, PrefixKV], batch: int):
        self.prefixes, self.batch = prefixes, batch

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        w = self.prefixes[layer_idx].weight.to(key_states.dtype)  # (N, 2, kv_heads, head_dim)
        k, v = (w[:, i].transpose(0, 1).unsqueeze(0).expand(self.batch, -1, -1, -1) for i in (0, 1))
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return next(iter(self.prefixes.values())).num_virtual_tokens


def assemble(state: dict[str, torch.Tensor], layers_prefix: str, num_layers: int) -> torch.Tensor:
    """PEFT's prompt embedding (N, layers x 2 x kv_heads x head_dim) from every block's slice."""
    parts = [state[f"{layers_prefix}{i}.{PARAM}"] for i in range(num_layers)]
    n = parts[0].shape[0]
    return torch.stack(parts, dim=1).reshape(n, -1)  # (N, L, 2, H, D): PEFT's view is (N, L*2, H, D)


def disassemble(weight: torch.Tensor, layers_prefix: str, config) -> dict[str, torch.Tensor]:
    """The inverse of ``assemble``: each block's (N, 2, kv_heads, head_dim) slice, by full name."""
    kv_heads, head_dim = kv_shape(config)
    n, layers = weight.shape[0], config.num_hidden_layers
    if weight.shape[1] != layers * 2 * kv_heads * head_dim:
        raise ValueError(f"prefix embedding {tuple(weight.shape)} does not fit {layers} layers of "
                         f"{kv_heads} x {head_dim} keys and values")  # fmt: skip
    parts = weight.reshape(n, layers, 2, kv_heads, head_dim)
    return {f"{layers_prefix}{i}.{PARAM}": parts[:, i].clone() for i in range(layers)}
