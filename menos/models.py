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
