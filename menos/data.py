"""A small built-in data set and byte-level batching, for the demo and tests."""

from __future__ import annotations

import torch

# Three private "corpora", one per demo client: each client fine-tunes on its own.
BUILTIN_TEXTS = (
    # recipes
    "Whisk two eggs with a pinch of salt. Melt butter in a pan over low heat. "
    "Pour in the eggs and stir slowly until they set. Serve warm with bread. "
    "For a soup, simmer onions, carrots and celery in stock for twenty minutes, "
    "then add lentils and cook until soft. Season with pepper and lemon. ",
    # weather log
    "Monday: cloudy, wind from the west, eleven degrees, light rain in the evening. "
    "Tuesday: clear, calm, fourteen degrees, dry. Wednesday: fog in the morning, "
    "sun by noon, sixteen degrees. Thursday: showers, wind from the north, nine degrees. ",
    # code comments
    "def add(a, b):\n    return a + b\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n\n"
    "for i in range(10):\n    print(i, add(i, i), mean([i, i + 1]))\n\n"
    "class Counter:\n    def __init__(self):\n        self.n = 0\n",
)

VOCAB_SIZE = 256  # bytes


def encode_bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def byte_batches(text: str, batch_size: int, seq_len: int, seed: int = 0):
    """Endless (B, T) batches of random windows of ``text``'s bytes."""
    ids = encode_bytes(text)
    while ids.numel() < seq_len + 1:
        ids = torch.cat([ids, ids])
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=gen)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # (B, T)
