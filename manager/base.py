"""The base model the manager serves: loaded once, by a loader process the launcher forks
(``menos.packing.pack``), published as the one block workers map (shared memory on CPU, CUDA IPC on
GPU; the vanilla baseline: a file), which the manager adopts (``publish``).

The block holds only what a server range can run: blocks ``min_head`` .. ``stop`` - 1 (L - 1
unless the manager is one stage of a chain, ``--blocks A:B``; it admits no client range outside
them). What only clients run (embeddings, blocks 0 .. min_head - 1, a stage's later blocks, the
final norm, the output head) goes to a file in the run directory, from which a client without a checkpoint of its own gets its sections, a
chunk at a time; a client's tail blocks come from the block itself (with a quantization, from the
file too, which then holds the whole model as loaded)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from functools import cached_property

import torch

from menos.messages import LoadBase
from menos.models import base_digest
from menos.packing import pack_reply
from menos.procs import malloc_trim
from menos.quantization import Quantization
from menos.sharing import SharedWeights, select_entries, unlink_segment
from menos.surgery import config_from_json, section_keys
from menos.weight_files import FileWeights
from menos.wire import dtype_name


@dataclass
class Base:
    name: str
    config: object  # the transformers config
    config_json: str
    weights: SharedWeights | FileWeights
    ends: FileWeights | None = None  # what no server range runs (vanilla: the weights file holds all)
    digests: dict[str, str] = field(default_factory=dict)  # tensor name -> tensor_digest, taken at load
    min_head: int = 1
    stop: int = 0  # the block after the last served one (0: the model's last is served)
    quantization: Quantization = Quantization.NONE  # the block's Linears; the ends' file then holds all as loaded

    def client_sections(self, blocks, send: bool) -> tuple[list, tuple, dict[str, str]]:
        """What a Welcome carries for a client holding ``blocks`` and the ends: its section's
        tensors (views of the block, or rows read from the ends' file when asked) and their
        aliases if it asked for them; else their digests, so that it can check its own
        checkpoint is this base."""
        wanted = set(section_keys(self.digests, self.config, blocks, client_modules=True))
        if not send:
            return [], (), {k: self.digests[k] for k in sorted(wanted)}
        if self.quantization is not Quantization.NONE:  # the client's sections keep the base's dtype
            tensors, aliases = select_entries(self.ends, wanted)
            return tensors, tuple(aliases), {}
        tensors, aliases = select_entries(self.weights, wanted)
        if self.ends is not None:
            more, more_aliases = select_entries(self.ends, wanted)
            tensors, aliases = tensors + more, aliases + more_aliases
        return tensors, tuple(aliases), {}

    @cached_property
    def digest(self) -> str:
        """The whole base's one hash: the stages of a chain must serve the same base."""
        return base_digest(self.digests)

    @property
    def served(self) -> tuple[int, int]:
        """The blocks this manager serves, [start, stop)."""
        return self.min_head, self.stop or self.config.num_hidden_layers

    def close(self) -> None:
        self.weights.close()
        if self.ends is not None:
            self.ends.close()

    def block_bytes(self, blocks: range) -> int:
        """Base bytes of the given blocks (a vanilla task's own copy)."""
        keys = section_keys(self.weights.tensors, self.config, blocks, False)
        return sum(self.weights.tensors.nbytes(k) if isinstance(self.weights, FileWeights)
                   else self.weights.tensors[k].nbytes for k in keys)  # fmt: skip


class BaseLoadError(RuntimeError):
    """The base did not load (a model that does not parse, a full disk, ...): the loader's reason."""


def publish(model: str | None, dtype: torch.dtype, device: torch.device, run_dir: str, vanilla: bool,
            min_head: int = 1, loader=None, quantization: Quantization = Quantization.NONE, stop: int = 0) -> Base:  # fmt: skip
    """The base, packed by ``loader`` (a LoadBase -> BaseLoaded call into a process of its
    own: ``WorkerSpawner.load_base``), or here; then adopted: this process owns the block
    (on CUDA: copies it to the device) and the files."""
    req = LoadBase(model=model, dtype=dtype_name(dtype), run_dir=run_dir, vanilla=vanilla, min_head=min_head,
                   stop=stop, owner_pid=os.getpid(), quantization=quantization.value)  # fmt: skip
    loaded = loader(req) if loader is not None else None
    if loaded is None:
        loaded = pack_reply(req)
        # The block and the files are now the only copies: let the loaded model's pages go
        # back to the kernel (glibc keeps a large load's freed heap otherwise).
        gc.collect()
        malloc_trim()
    if loaded.error:
        raise BaseLoadError(loaded.error)
    ends = FileWeights.open(loaded.ends) if loaded.ends is not None else None
    try:
        weights = FileWeights.open(loaded.weights) if vanilla else SharedWeights.adopt(loaded.weights, device)
    except BaseException:  # a device without room, say: nothing packed may outlive the failed start
        if ends is not None:
            ends.close()
        if not vanilla:
            unlink_segment(loaded.weights.segment)
        raise
    return Base(loaded.name, config_from_json(loaded.config_json), loaded.config_json, weights, ends,
                dict(loaded.digests), min_head, stop, quantization)  # fmt: skip
