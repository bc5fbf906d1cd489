"""The manager's shared block holds only what a server range can run; what only clients
run is read from a file when a client without a checkpoint asks for its sections."""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch

import menos
from manager.base import publish
from menos.codecs import Codec
from menos.messages import SectionRequest
from menos.models import load_base, tensor_digest
from menos.sections import chunk
from menos.surgery import section_keys


def _read_all(t) -> torch.Tensor:
    """A section as a client reassembles it, chunk by chunk (small chunks: several per tensor)."""
    shape = tuple(t.shape)
    n = math.prod(shape)
    row_len = shape[-1] if len(shape) >= 2 else n
    parts, row = [], 0
    while row * row_len < n:
        reply, tensors = chunk([t], SectionRequest(index=0, row=row), Codec.NONE, chunk_bytes=256)
        parts.append(tensors[0])
        row += reply.rows
    return torch.cat(parts).reshape(shape)


@pytest.mark.parametrize("name, min_head", [("llama", 1), ("opt", 2), ("llama", 0)])
def test_the_block_holds_exactly_what_admitted_server_ranges_run(checkpoints, tmp_path, name, min_head):
    path = checkpoints(name)
    _, full = load_base(path, torch.float32)
    state, layers = full.state_dict(), full.config.num_hidden_layers
    base = publish(path, torch.float32, torch.device("cpu"), str(tmp_path), vanilla=False, min_head=min_head)
    try:
        in_block = set(base.weights.tensors)
        # a tensor no admitted range (head >= min_head, any tail) can use fails this
        assert in_block == set(section_keys(state, full.config, range(min_head, layers), client_modules=False))
        assert not any(k.startswith(("model.embed", "model.norm", "lm_head", "model.decoder.embed",
                                     "model.decoder.final", "model.decoder.project")) for k in in_block)  # fmt: skip
        ends = {n for e in base.ends.entries for n in e.names}
        assert ends == set(state) - in_block and ends.isdisjoint(in_block)
        # a client without a checkpoint: head blocks and ends from the file, its tail from the block
        tensors, aliases, _ = base.client_sections([*range(min_head), layers - 1], send=True)
        got = {n for names in aliases for n in names}
        assert got == set(section_keys(state, full.config, [*range(min_head), layers - 1], client_modules=True))
        for t, names in zip(tensors, aliases):
            assert all(tensor_digest(_read_all(t)) == tensor_digest(state[n]) for n in names), names
        assert base.weights.size < sum(t.nbytes for t in state.values())
    finally:
        base.close()
    assert not os.listdir(tmp_path) and not glob.glob(f"/dev/shm/menos_{os.getpid()}_*")


def test_a_client_with_fewer_head_blocks_than_the_server_keeps_is_refused(shared_manager, checkpoints, tmp_path):
    mgr = shared_manager("llama")
    with pytest.raises(menos.MenosError, match="--min-head-layers 1") as err:
        menos.connect(mgr.endpoint, head_layers=0, batch_size=2, seq_len=16)
    assert err.value.code == "bad_request"
    expect = publish(checkpoints("llama"), torch.float32, torch.device("cpu"), str(tmp_path), vanilla=False)
    try:
        assert menos.status(mgr.endpoint).shared_bytes == expect.weights.size  # the running manager keeps the rule
    finally:
        expect.close()
