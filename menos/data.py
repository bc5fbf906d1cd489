"""Data for clients: a small built-in data set, text files, tokenizers, batches."""

from __future__ import annotations

import json
import os

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


def byte_batches(text: str, batch_size: int, seq_len: int, seed: int = 0):
    """Endless (B, T) batches of random windows of ``text``'s bytes."""
    return text_batches([text], ByteTokenizer(), batch_size, seq_len, seed)


class ByteTokenizer:
    """The fallback when a checkpoint has no tokenizer: UTF-8 bytes are the tokens (vocab 256)."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def tokenizer_for(model_dir: str | None):
    """The checkpoint's own tokenizer when it ships one, else ByteTokenizer."""
    if model_dir and any(
        os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    return ByteTokenizer()


def load_texts(path: str) -> list[str]:
    """A plain text file (one document) or JSONL with a "text" field per line."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith((".jsonl", ".json")):
            return [f.read()]
        texts = []
        for i, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{i}: expected a JSON object with a string 'text'")
                texts.append(record["text"])
        return texts


def text_batches(texts: list[str], tokenizer, batch_size: int, seq_len: int, seed: int = 0):
    """Endless (B, T) batches of random windows over the tokenized, concatenated texts."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t)
    if not ids:
        raise ValueError("no tokens in the texts")
    flat = torch.tensor(ids, dtype=torch.long)
    while flat.numel() < seq_len + 1:
        flat = torch.cat([flat, flat])
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, flat.numel() - seq_len, (batch_size,), generator=gen)
        yield torch.stack([flat[s : s + seq_len] for s in starts.tolist()])  # (B, T)
