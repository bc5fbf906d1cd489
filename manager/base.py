"""The base model the manager serves: loaded once, published as the one block workers map
(shared memory on CPU, CUDA IPC on GPU; the vanilla baseline: a file), then dropped."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from menos.models import load_base, tensor_digest
from menos.sharing import FileWeights, SharedWeights, select_entries
from menos.surgery import config_to_json, section_keys


@dataclass
class Base:
    name: str
    config: object  # the transformers config
    config_json: str
    weights: SharedWeights | FileWeights
    digests: dict[str, str] = field(default_factory=dict)  # tensor name -> tensor_digest, taken at load

    def client_sections(self, blocks, send: bool) -> tuple[list[torch.Tensor], tuple, dict[str, str]]:
        """What a Welcome carries for a client holding ``blocks`` and the ends: its section's
        tensors and their aliases if it asked for them; else their digests, so that it can
        check its own checkpoint is this base."""
        wanted = set(section_keys(self.weights.tensors, self.config, blocks, client_modules=True))
        if not send:
            return [], (), {k: self.digests[k] for k in sorted(wanted)}
        tensors, aliases = select_entries(self.weights, wanted)
        return tensors, tuple(aliases), {}

    def block_bytes(self, blocks: range) -> int:
        """Base bytes of the given blocks (a vanilla task's own copy)."""
        keys = section_keys(self.weights.tensors, self.config, blocks, False)
        return sum(self.weights.tensors.nbytes(k) if isinstance(self.weights, FileWeights)
                   else self.weights.tensors[k].nbytes for k in keys)  # fmt: skip


def publish(model: str | None, dtype: torch.dtype, device: torch.device, run_dir: str, vanilla: bool) -> Base:
    name, m = load_base(model, dtype)
    digests = {k: tensor_digest(t) for k, t in m.state_dict().items()}
    if vanilla:  # nothing shared: workers read their own copies from a file
        weights = FileWeights(m.state_dict(), os.path.join(run_dir, "base.weights"))
    else:
        weights = SharedWeights(m.state_dict(), device)
    # the block (vanilla: the file) is now the only copy once ``m`` goes
    return Base(name, m.config, config_to_json(m.config), weights, digests)
