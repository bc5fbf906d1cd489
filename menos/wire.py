"""Wire codec: a message plus tensors <-> a list of ZeroMQ frames.

Frame 0 is a msgpack ``Header`` (the typed message and one ``TensorMeta`` per
tensor); each tensor follows as one raw frame of its bytes. Decoding validates the
header against the message schema and every tensor frame against its declared dtype
and shape, so a malformed message raises ``WireError`` before anything uses it.
Nothing is unpickled: the decoder only ever builds the structs in ``menos.messages``
and flat tensors from raw bytes.

torch is imported only when a tensor is encoded or decoded, so tools that speak the
protocol without tensors (``menos-manager status``, ``keys``) start without it.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Sequence

import msgspec

from menos.messages import Header, Message, TensorMeta

DTYPE_NAMES = ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "int8")
MAX_NDIM = 8

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


class WireError(ValueError):
    """A message that does not decode or does not match what it declares."""


@functools.cache
def _dtypes() -> dict:
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}


def dtype_name(dtype) -> str:
    for name, d in _dtypes().items():
        if d == dtype:
            return name
    raise WireError(f"dtype {dtype} is not supported on the wire")


def dtype_from_name(name: str):
    try:
        return _dtypes()[name]
    except KeyError:
        raise WireError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}") from None


def tensor_bytes(t) -> memoryview:
    """A zero-copy byte view of a CPU tensor (made contiguous first if needed)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    # numpy has no bfloat16: view every dtype as bytes first.
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def encode(msg: Message, tensors: Sequence = ()) -> list:
    """Frames for ``msg`` with ``tensors`` as raw frames after the header."""
    metas = tuple(TensorMeta(dtype_name(t.dtype), tuple(t.shape)) for t in tensors)
    return [_encoder.encode(Header(msg=msg, tensors=metas)), *(tensor_bytes(t) for t in tensors)]


def decode_header(frame) -> Header:
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"malformed message header: {exc}") from None


def decode(frames: Sequence) -> tuple[Message, list]:
    """Validate and decode ``frames``; tensors are fresh, writable CPU tensors."""
    if not frames:
        raise WireError("empty message")
    header = decode_header(frames[0])
    return header.msg, decode_tensors(header, frames[1:])


def decode_tensors(header: Header, frames: Sequence) -> list:
    if len(frames) != len(header.tensors):
        raise WireError(f"header declares {len(header.tensors)} tensor frame(s), got {len(frames)}")
    out = []
    for i, (meta, frame) in enumerate(zip(header.tensors, frames)):
        import torch

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


# --------------------------------------------------------------------------- pipes

_LENGTH = struct.Struct(">I")
MAX_PIPE_MESSAGE = 1 << 20


def write_message(stream, msg: Message) -> None:
    """One tensorless message on a byte stream (a pipe), length-prefixed."""
    (frame,) = encode(msg)
    stream.write(_LENGTH.pack(len(frame)) + frame)
    stream.flush()


def read_message(stream) -> Message | None:
    """The next message written by ``write_message``; None at end of stream."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (n,) = _LENGTH.unpack(head)
    if n > MAX_PIPE_MESSAGE:
        raise WireError(f"pipe message of {n} bytes exceeds {MAX_PIPE_MESSAGE}")
    body = stream.read(n)
    if len(body) < n:
        return None
    return decode_header(body).msg
