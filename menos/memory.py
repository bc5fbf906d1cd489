"""Memory sizes: parsing, and the per-request token sizes the scheduler grants.

``token_sizes`` estimates from the config alone how many bytes one no-grad forward
(M_f) and one re-forward + backward + step (M_b) of a server range take. It is an
analytic upper-bound-style estimate (activations an eager block keeps or creates),
used until the worker's start-up profile measures them.
"""

from __future__ import annotations

import re

from transformers import PretrainedConfig

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'6GiB', '512MB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 6GiB, 512MB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _dims(config: PretrainedConfig) -> tuple[int, int, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * hidden)
    return hidden, heads, inter


def token_sizes(config: PretrainedConfig, n_blocks: int, batch: int, seq: int, elem_bytes: int) -> tuple[int, int]:
    """(M_f, M_b) in bytes for ``n_blocks`` server blocks at (batch, seq)."""
    h, nh, i = _dims(config)
    bt = batch * seq
    scores = batch * nh * seq * seq
    # one block's transient peak: in/out/residual, q k v, scores, MLP intermediates
    block_peak = elem_bytes * (6 * bt * h + 2 * scores + 3 * bt * i)
    io = elem_bytes * 2 * bt * h  # the kept input and the output
    m_f = io + block_peak
    # backward keeps what autograd saves in every block, then one block's transient
    saved_per_block = elem_bytes * (10 * bt * h + 2 * scores + 4 * bt * i)
    m_b = io * 2 + n_blocks * saved_per_block + 2 * block_peak
    return m_f, m_b
