"""Cut-layer codecs: how activations and gradients (B, T, H) travel between client and server.

Beside the frame codec (``menos.wire``): a codec turns one (B, T, H) tensor into the
tensor frames of a message and back, to the model's dtype on arrival.

    none   the tensor as it is
    bf16   bfloat16: 2 bytes a value, 8 bits of mantissa (relative error <= 2**-8)
    fp16   float16: 2 bytes a value, 11 bits of mantissa (relative error <= 2**-11;
           values beyond 65504 overflow, so it suits activations of small models)
    int8   symmetric per-row (token) absmax: int8 values and one float32 scale per row;
           |error| <= scale / 2 = absmax(row) / 254 per element

Decoding checks what arrives against the declared codec (frame count, dtypes, shapes,
finite and positive scales) and raises ``CodecError`` naming what does not match.
"""

from __future__ import annotations

import enum


class Codec(str, enum.Enum):
    NONE = "none"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"

    @classmethod
    def parse(cls, value) -> "Codec":
        if value is None:
            return cls.NONE
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"compression={value!r}: one of None, {', '.join(repr(c.value) for c in cls)}") from None


class CodecError(ValueError):
    """Frames that do not match the declared codec."""


_HALF = {Codec.BF16: "bfloat16", Codec.FP16: "float16"}
INT8_MAX = 127


def encode(x, codec: Codec) -> list:
    """The tensor frames that carry ``x`` (B, T, H) under ``codec``."""
    import torch

    codec = Codec(codec)
    if codec is Codec.NONE:
        return [x]
    if codec in _HALF:
        return [x.to(getattr(torch, _HALF[codec]))]
    xf = x.detach().float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)  # (B, T, 1)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return [q, scale]


def decode(tensors, codec: Codec, dtype):
    """The (B, T, H) tensor in ``dtype`` from the frames of ``codec``; CodecError if they do not match."""
    import torch

    codec = Codec(codec)
    want = 2 if codec is Codec.INT8 else 1
    if len(tensors) != want:
        raise CodecError(f"codec {codec.value} carries {want} tensor frame(s), got {len(tensors)}")
    if codec is Codec.NONE:
        return tensors[0]  # the dtype is checked by the receiver, as before codecs
    if codec in _HALF:
        (t,) = tensors
        expected = getattr(torch, _HALF[codec])
        if t.dtype != expected:
            raise CodecError(f"codec {codec.value}: a {t.dtype} frame, expected {expected}")
        return t.to(dtype)
    q, scale = tensors
    if q.dtype != torch.int8 or scale.dtype != torch.float32:
        raise CodecError(f"codec int8: frames {q.dtype} and {scale.dtype}, expected torch.int8 and torch.float32")
    if q.dim() != 3 or tuple(scale.shape) != (*q.shape[:-1], 1):
        raise CodecError(f"codec int8: values {tuple(q.shape)} with scales {tuple(scale.shape)}, expected scales (B, T, 1)")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise CodecError("codec int8: a scale that is not finite and positive")
    if (q == -128).any():
        raise CodecError("codec int8: value -128 is outside the symmetric range")
    return (q.float() * scale).to(dtype)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
