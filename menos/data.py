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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))


def char_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A transformers tokenizer (what trainers take as ``processing_class``) for models without
    one: each character is its code point (below ``vocab_size``); "\\x00" pads, "\\x02" and
    "\\x03" begin and end a text. ASCII text gets ByteTokenizer's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={chr(i): i for i in range(vocab_size)}, unk_token="\x1a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="\x00", bos_token="\x02", eos_token="\x03",
                                   unk_token="\x1a")  # fmt: skip


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


def check_sizes(batch_size, seq_len) -> None:
    """A batch builder's sizes: at least one row, and two tokens (one to predict from)."""
    for name, value, least in (("batch_size", batch_size, 1), ("seq_len", seq_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r}: an int of at least {least}")


def text_batches(texts: list[str], tokenizer, batch_size: int, seq_len: int, seed: int = 0):
    """Endless (B, T) batches of random windows over the tokenized, concatenated texts."""
    check_sizes(batch_size, seq_len)
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


# --------------------------------------------------------------------------- supervised fine-tuning


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens (Hugging Face tokenizers and ByteTokenizer)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def sft_example(prompt: str, response: str, tokenizer, seq_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one prompt/response pair: BOS + prompt + response + EOS (when
    the tokenizer has them), labels -100 on BOS and the prompt, truncated to ``seq_len``."""
    head, tail = _sft_parts(prompt, response, tokenizer)
    return (head + tail)[:seq_len], ([-100] * len(head) + tail)[:seq_len]


def _sft_parts(prompt: str, response: str, tokenizer) -> tuple[list[int], list[int]]:
    """(BOS + prompt, response + EOS) token ids: the part without loss, the part with it."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    head = ([bos] if bos is not None else []) + _encode(tokenizer, prompt)
    return head, _encode(tokenizer, response) + ([eos] if eos is not None else [])


def pad_batch(rows, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (input_ids, labels) rows to the batch's longest: (B, T) tensors, labels -100
    on the padding. Right padding needs no attention mask: under the causal mask no real
    token attends to a pad after it, and pads carry no loss."""
    t = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        if len(ids) != len(lab):
            raise ValueError(f"row {i}: {len(ids)} input_ids but {len(lab)} labels")
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
    return input_ids, labels


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return value
    return 0


def sft_batches(pairs, tokenizer, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for ``Client.fit`` from (prompt, response) pairs: the loss on the response only.
    A pair with no response token within ``seq_len`` is refused, naming it: it would train
    nothing (and a batch of only such pairs fails in ``train_step``)."""
    check_sizes(batch_size, seq_len)
    rows = [_sft_row(i, pair, tokenizer, seq_len) for i, pair in enumerate(pairs)]
    if not rows:
        raise ValueError("no prompt/response pairs")
    pad = _pad_id(tokenizer)
    return [pad_batch(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]


def _sft_row(i: int, pair, tokenizer, seq_len: int) -> tuple[list[int], list[int]]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
        raise ValueError(f"example {i}: expected a (prompt, response) pair of strings, got {pair!r:.80}")
    head, tail = _sft_parts(*pair, tokenizer)
    ids, labels = (head + tail)[:seq_len], ([-100] * len(head) + tail)[:seq_len]
    if not _learnable(labels):
        if len(head) >= seq_len:
            raise ValueError(f"example {i}: its prompt is {len(head)} tokens and seq_len is {seq_len}: no response "
                             "token is left to learn from; shorten the prompt or raise seq_len")  # fmt: skip
        raise ValueError(f"example {i}: its response {pair[1]!r:.40} gives no token to learn from: give it some text")
    return ids, labels


def _learnable(labels) -> bool:
    """Some label the causal loss counts (the first position predicts nothing)."""
    return any(x != -100 for x in labels[1:])


def rows_batches(rows, batch_size: int, seq_len: int, tokenizer=None, text_column: str = "text"):
    """Batches from records, e.g. a Hugging Face ``datasets.Dataset``: each with
    ``input_ids`` (and ``labels``, else the loss is on every token), or with a text column
    and a ``tokenizer``. Rows longer than ``seq_len`` are truncated; one left with no label is refused."""
    check_sizes(batch_size, seq_len)
    batch: list = []
    pad = _pad_id(tokenizer) if tokenizer is not None else 0
    for i, row in enumerate(rows):
        if "input_ids" in row:
            ids = list(row["input_ids"])
            labels = list(row["labels"]) if row.get("labels") is not None else list(ids)
        elif text_column in row and tokenizer is not None:
            ids = _encode(tokenizer, row[text_column])
            labels = list(ids)
        else:
            raise ValueError(f"row {i} has neither input_ids nor a {text_column!r} column with a tokenizer "
                             f"(columns: {sorted(row)})")  # fmt: skip
        if len(ids) < 2:
            raise ValueError(f"row {i}: {len(ids)} tokens; a causal LM loss needs at least 2")
        if not _learnable(labels[:seq_len]):
            raise ValueError(f"row {i}: its labels are all -100 within seq_len={seq_len}: nothing to learn "
                             "from; shorten its prompt or raise seq_len")  # fmt: skip
        batch.append((ids[:seq_len], labels[:seq_len]))
        if len(batch) == batch_size:
            yield pad_batch(batch, pad)
            batch = []
    if batch:
        yield pad_batch(batch, pad)


def is_rows(data) -> bool:
    """A ``datasets.Dataset`` (or a list of dict records) rather than an iterable of tensor batches."""
    if hasattr(data, "column_names") and hasattr(data, "features"):
        return True
    return isinstance(data, (list, tuple)) and bool(data) and isinstance(data[0], dict)
