"""What a client checks in a batch before anything is computed or sent: the types, the
sizes it declared at connect, and that every id and label is one of the vocabulary's."""

from __future__ import annotations

import torch


def check_batch(input_ids, labels, batch_size: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) as (B, T) int64 tensors; labels default to input_ids."""
    input_ids = _checked_ids(input_ids, batch_size, seq_len, vocab, min_len=2)
    labels = input_ids if labels is None else _token_tensor(labels, "labels")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    bad = labels[((labels < 0) & (labels != -100)) | (labels >= vocab)]
    if bad.numel():
        raise ValueError(f"labels holds {int(bad[0])}: labels are token ids (0..{vocab - 1}) or -100 (no loss)")
    if not (labels[:, 1:] != -100).any():  # the loss would be 0/0: NaN into both adapters
        raise ValueError("labels are all -100 after the first position: no token to learn from in this batch")
    return input_ids, labels


def check_prompt(input_ids, attention_mask, batch_size: int, seq_len: int, vocab: int):
    """(input_ids, each row's left pads) of prompts to generate from: left-padded, as
    ``transformers``' ``generate`` wants them (menos.kv_cache)."""
    from menos.kv_cache import left_pads

    input_ids = _checked_ids(input_ids, batch_size, seq_len, vocab, min_len=1)
    if attention_mask is None:
        return input_ids, (0,) * input_ids.shape[0]
    return input_ids, left_pads(mask_tensor(attention_mask, input_ids.shape))


def _checked_ids(input_ids, batch_size: int, seq_len: int, vocab: int, min_len: int) -> torch.Tensor:
    input_ids = _token_tensor(input_ids, "input_ids")
    b, t = input_ids.shape
    if not (0 < b <= batch_size and min_len <= t <= seq_len):
        raise ValueError(f"batch {b} x seq {t} exceeds what this client declared ({batch_size} x {seq_len})"
                         + ("" if t >= min_len else f" or is shorter than {min_len}"))  # fmt: skip
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
    if bad.numel():
        raise ValueError(f"input_ids holds token id {int(bad[0])}, outside the vocabulary (0..{vocab - 1})")
    return input_ids


def _token_tensor(x, what: str) -> torch.Tensor:
    """A (B, T) integer tensor from a tensor, a numpy array or nested lists of ints."""
    if not torch.is_tensor(x):
        try:
            import numpy as np

            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what} must be a (batch, seq) tensor, numpy array or list of lists of token ids, "
                            f"not {type(x).__name__}") from None  # fmt: skip
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or x.dim() != 2:
        raise TypeError(f"{what} must be (batch, seq) integer token ids, got {x.dtype} {tuple(x.shape)}")
    return x.long()


def check_mask(attention_mask, shape) -> torch.Tensor | None:
    """A (B, T) 0/1 mask of right-padded rows (ones, then zeros), or None."""
    if attention_mask is None:
        return None
    mask = mask_tensor(attention_mask, shape)
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("attention_mask: a row pads on the left; the split model takes right padding only (pad after "
                         "the text: menos.data.pad_batch)")  # fmt: skip
    return mask


def mask_tensor(attention_mask, shape) -> torch.Tensor:
    mask = _token_tensor(attention_mask, "attention_mask")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(shape)}")
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask holds values other than 0 and 1")
    return mask
