"""Base models: the built-in default, seeded random models, and local checkpoints.

Nothing is ever downloaded: a model is either a local Hugging Face checkpoint
directory (config.json + safetensors) or built from a config with seeded random
weights (the built-in default, tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from menos.errors import MenosError
from menos.vocabulary import ErrorCode

BUILTIN_NAME = "menos-builtin-llama"


def builtin_config() -> LlamaConfig:
    """A small Llama (about 6M parameters) over bytes: vocab 256 matches menos.data."""
    return LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def random_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``config``'s causal LM with weights drawn from ``seed`` (the process RNG is left alone)."""
    config._attn_implementation = "sdpa"  # noqa: SLF001
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_checkpoint(model: nn.Module, directory: str) -> str:
    """Write ``model`` as a Hugging Face checkpoint (config.json + model.safetensors)."""
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_base(path: str | None, dtype: torch.dtype) -> tuple[str, nn.Module]:
    """(name, model) from a local checkpoint dir, or the built-in default if ``path`` is None."""
    if path is None:
        return BUILTIN_NAME, random_model(builtin_config(), seed=0, dtype=dtype)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return os.path.basename(os.path.normpath(path)), model.eval()


def tensor_digest(t: torch.Tensor) -> str:
    """A short hash of a tensor's bytes, in its dtype's layout: the manager publishes those of
    its base, and a client with its own checkpoint checks that it holds the same base."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    return hashlib.blake2b(flat.view(torch.uint8).numpy().data, digest_size=12).hexdigest()


def base_digest(digests: dict[str, str]) -> str:
    """One hash of a base from its tensors' digests (name -> ``tensor_digest``)."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()


# Fields that must agree between a client's local checkpoint and the server's model.
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")


def local_sections(path: str, dtype: torch.dtype, config, digests: dict[str, str]) -> dict[str, torch.Tensor]:
    """A client's base tensors from its own checkpoint, which must be the server's base
    (``config``): the same shapes and, tensor by tensor, the same weights (``digests``)."""
    _, full = load_base(path, dtype)
    for f in _SHAPE_FIELDS:
        mine, theirs = getattr(full.config, f, None), getattr(config, f, None)
        if mine != theirs:
            raise MenosError(ErrorCode.MODEL_MISMATCH, f"local checkpoint {path} has {f}={mine}, the server's model {theirs}")
    state = dict(full.state_dict())
    for name, digest in digests.items():
        if name not in state:
            raise MenosError(ErrorCode.MODEL_MISMATCH, f"local checkpoint {path} has no {name}, the server's base has")
        if tensor_digest(state[name]) != digest:
            raise MenosError(ErrorCode.MODEL_MISMATCH, f"local checkpoint {path}: {name} differs from the server's "
                             "base (the same architecture, other weights: another fine-tune?)")  # fmt: skip
    return state
