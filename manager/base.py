"""The base model the manager serves: loaded once, published as the one block workers map
(shared memory on CPU, CUDA IPC on GPU; the vanilla baseline: a file), then dropped.

The block holds only what a server range can run: blocks ``min_head`` .. L - 1 (the
manager admits no client with fewer head blocks). What only clients run (embeddings,
blocks 0 .. min_head - 1, the final norm, the output head) goes to a file in the run
directory, from which a client without a checkpoint of its own gets its sections, a
chunk at a time; a client's tail blocks come from the block itself."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch

from menos.models import load_base, tensor_digest
from menos.procs import malloc_trim
from menos.sharing import FileWeights, SharedWeights, select_entries
from menos.surgery import config_to_json, section_keys


@dataclass
class Base:
    name: str
    config: object  # the transformers config
    config_json: str
    weights: SharedWeights | FileWeights
    ends: FileWeights | None = None  # what no server range runs (vanilla: the weights file holds all)
    digests: dict[str, str] = field(default_factory=dict)  # tensor name -> tensor_digest, taken at load
    min_head: int = 1

    def client_sections(self, blocks, send: bool) -> tuple[list, tuple, dict[str, str]]:
        """What a Welcome carries for a client holding ``blocks`` and the ends: its section's
        tensors (views of the block, or rows read from the ends' file when asked) and their
        aliases if it asked for them; else their digests, so that it can check its own
        checkpoint is this base."""
        wanted = set(section_keys(self.digests, self.config, blocks, client_modules=True))
        if not send:
            return [], (), {k: self.digests[k] for k in sorted(wanted)}
        tensors, aliases = select_entries(self.weights, wanted)
        if self.ends is not None:
            more, more_aliases = select_entries(self.ends, wanted)
            tensors, aliases = tensors + more, aliases + more_aliases
        return tensors, tuple(aliases), {}

    def close(self) -> None:
        self.weights.close()
        if self.ends is not None:
            self.ends.close()

    def block_bytes(self, blocks: range) -> int:
        """Base bytes of the given blocks (a vanilla task's own copy)."""
        keys = section_keys(self.weights.tensors, self.config, blocks, False)
        return sum(self.weights.tensors.nbytes(k) if isinstance(self.weights, FileWeights)
                   else self.weights.tensors[k].nbytes for k in keys)  # fmt: skip


def publish(model: str | None, dtype: torch.dtype, device: torch.device, run_dir: str, vanilla: bool,
            min_head: int = 1) -> Base:  # fmt: skip
    name, m = load_base(model, dtype)
    state = m.state_dict()
    layers = m.config.num_hidden_layers
    if not 0 <= min_head < layers:
        raise ValueError(f"--min-head-layers {min_head}: the model has {layers} blocks (0 .. {layers - 1})")
    digests = {k: tensor_digest(t) for k, t in state.items()}
    ends = None
    if vanilla:  # nothing shared: workers read their own copies from a file
        weights = FileWeights(state, os.path.join(run_dir, "base.weights"))
    else:
        served = set(section_keys(state, m.config, range(min_head, layers), client_modules=False))
        weights = SharedWeights({k: t for k, t in state.items() if k in served}, device)
        try:
            ends = FileWeights({k: t for k, t in state.items() if k not in served}, os.path.join(run_dir, "ends.weights"))
        except BaseException:  # a full disk, say: the block must not outlive the failed start
            weights.close()
            raise
    base = Base(name, m.config, config_to_json(m.config), weights, ends, digests, min_head)
    # The block and the files are now the only copies: let the loaded model's pages go
    # back to the kernel (glibc keeps a large load's freed heap otherwise).
    del m, state
    gc.collect()
    malloc_trim()
    return base
