"""Wire codec: a message plus tensors <-> a list of ZeroMQ frames.

Frame 0 is a msgpack ``Header`` (the typed message and one ``TensorMeta`` per
tensor); each tensor follows as one raw frame of its bytes. Decoding validates the
header against the message schema and every tensor frame against its declared dtype
and shape, so a malformed message raises ``WireError`` before anything uses it.
Nothing is unpickled: the decoder only ever builds the structs in ``menos.messages``
and flat tensors from raw bytes.
"""

from __future__ import annotations

import math
from typing import Sequence

import msgspec
import torch

from menos.messages import Header, Message, TensorMeta

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_NDIM = 8

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


class WireError(ValueError):
    """A message that does not decode or does not match what it declares."""


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} is not supported on the wire") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise WireError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (made contiguous first if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    # numpy has no bfloat16: view every dtype as bytes first.
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def encode(msg: Message, tensors: Sequence[torch.Tensor] = ()) -> list:
    """Frames for ``msg`` with ``tensors`` as raw frames after the header."""
    metas = tuple(TensorMeta(dtype_name(t.dtype), tuple(t.shape)) for t in tensors)
    return [_encoder.encode(Header(msg=msg, tensors=metas)), *(tensor_bytes(t) for t in tensors)]


def decode_header(frame) -> Header:
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"malformed message header: {exc}") from None


def decode(frames: Sequence) -> tuple[Message, list[torch.Tensor]]:
    """Validate and decode ``frames``; tensors are fresh, writable CPU tensors."""
    if not frames:
        raise WireError("empty message")
    header = decode_header(frames[0])
    return header.msg, decode_tensors(header, frames[1:])


def decode_tensors(header: Header, frames: Sequence) -> list[torch.Tensor]:
    if len(frames) != len(header.tensors):
        raise WireError(f"header declares {len(header.tensors)} tensor frame(s), got {len(frames)}")
    out = []
    for i, (meta, frame) in enumerate(zip(header.tensors, frames)):
        dtype = dtype_from_name(meta.dtype)
        if len(meta.shape) > MAX_NDIM or any(d < 0 for d in meta.shape):
            raise WireError(f"tensor {i}: invalid shape {meta.shape}")
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        expected = math.prod(meta.shape) * dtype.itemsize
        if buf.nbytes != expected:
            raise WireError(
                f"tensor {i}: {meta.dtype}{list(meta.shape)} needs {expected} bytes, frame has {buf.nbytes}"
            )
        if expected == 0:
            out.append(torch.empty(meta.shape, dtype=dtype))
            continue
        # bytearray: one copy into memory we own, so the tensor is writable and
        # outlives the ZeroMQ frame.
        data = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
        out.append(data.view(dtype).reshape(meta.shape))
    return out
