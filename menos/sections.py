"""A client's base sections (embeddings, its blocks, the output head) sent in chunks.

A client without a local checkpoint gets its sections from the manager: from the shared
block (blocks a server range may run) or from a file the manager wrote at start (what
only clients run: embeddings, the first blocks, the head), a chunk of rows at a time. Over a slow link
that is minutes (67 MB at 10 Mbit/s: 54 s), so they do not ride in the Welcome: the
Welcome lists them (``TensorMeta`` each), and the client asks for them a chunk at a time
(``SectionRequest`` -> ``SectionChunk``, about ``CHUNK_BYTES`` of whole rows each) with a
progress bar, its heartbeats already flowing from their own thread. A client with a
lossy cut-layer codec gets its sections in 16 bits (bf16 or fp16; int8: bf16, since
per-row int8 would visibly change the weights), halving an fp32 transfer.
"""

from __future__ import annotations

import math

import torch

from menos import wire
from menos.codecs import Codec
from menos.messages import Error, ErrorCode, SectionChunk, SectionRequest, TensorMeta
from menos.weight_files import row_shape

CHUNK_BYTES = 4 << 20


def send_dtype(dtype: torch.dtype, codec: Codec) -> torch.dtype:
    """The dtype a section travels in for a client of ``codec``."""
    if codec is Codec.FP16:
        return torch.float16 if dtype.is_floating_point else dtype
    if codec in (Codec.BF16, Codec.INT8):
        return torch.bfloat16 if dtype.is_floating_point else dtype
    return dtype


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, row length): chunks are whole rows."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def metas(tensors: list[torch.Tensor], codec: Codec) -> tuple[TensorMeta, ...]:
    return tuple(TensorMeta(wire.dtype_name(send_dtype(t.dtype, codec)), tuple(t.shape)) for t in tensors)


def chunk(tensors: list[torch.Tensor], req: SectionRequest, codec: Codec, chunk_bytes: int = CHUNK_BYTES):
    """(SectionChunk, [rows]) answering ``req``, or an Error for a request out of range."""
    if not 0 <= req.index < len(tensors):
        return Error(code=ErrorCode.BAD_REQUEST, message=f"section {req.index}: there are {len(tensors)}"), []
    t = tensors[req.index]  # a tensor, or rows read from a file when asked (menos.sharing.FileRows)
    n_rows, row_len = row_shape(t.shape)
    if not 0 <= req.row < max(n_rows, 1):
        return Error(code=ErrorCode.BAD_REQUEST, message=f"section {req.index} has {n_rows} rows, not {req.row}"), []
    dtype = send_dtype(t.dtype, codec)
    n = max(1, chunk_bytes // max(1, row_len * dtype.itemsize))
    part = t.read_rows(req.row, req.row + n) if hasattr(t, "read_rows") else rows(t)[req.row : req.row + n]
    part = part.to(dtype)
    return SectionChunk(index=req.index, row=req.row, rows=part.shape[0]), [part]


def fetch(chan, sections: tuple[TensorMeta, ...], dtype: torch.dtype, progress: bool | None = None,
          indices: list[int] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Every section (or those at ``indices``), chunk by chunk, in ``dtype`` (a tqdm bar unless
    not on a terminal)."""
    from tqdm.auto import tqdm

    from menos.errors import MenosError

    out = []
    indices = range(len(sections)) if indices is None else indices
    total = sum(wire.dtype_from_name(sections[i].dtype).itemsize * math.prod(sections[i].shape) for i in indices)
    with tqdm(total=total, unit="B", unit_scale=True, desc="menos: base sections",
              disable=None if progress is None else not progress) as bar:  # fmt: skip
        for i in indices:
            meta = sections[i]
            dst = torch.empty(meta.shape, dtype=dtype)
            view, row = rows(dst), 0
            while row < view.shape[0]:
                chan.send(SectionRequest(index=i, row=row))
                reply, tensors = chan.recv(SectionChunk)
                if (reply.index, reply.row) != (i, row) or len(tensors) != 1 or reply.rows < 1 or \
                        tuple(tensors[0].shape) != (reply.rows, view.shape[1]) or row + reply.rows > view.shape[0]:
                    raise MenosError(ErrorCode.PROTOCOL, f"section {i}: a chunk that does not fit row {row}")
                view[row : row + reply.rows] = tensors[0]
                row += reply.rows
                bar.update(tensors[0].nbytes)
            out.append(dst)
    return out

