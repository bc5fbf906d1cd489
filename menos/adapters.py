"""LoRA adapters on any section of the model, with initial weights that do not depend on the cut.

PEFT's own initialisation draws from the global RNG in module order, so the same seed
gives different weights to a block depending on which process builds it and what it
built before. Here every LoRA tensor is drawn from a generator seeded by (seed, full
parameter name) instead: the client's sections, the server's range and a local
reference model all start from identical adapters, wherever the cut is.
"""

from __future__ import annotations

import math
import os
import zlib

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from menos.messages import LoraSpec
from menos.surgery import decoder_blocks


def inject_lora(model: nn.Module, spec: LoraSpec, seed: int) -> list[nn.Parameter]:
    """Add ``spec``'s adapter to the targeted Linears of ``model``'s blocks; return the trainable params.

    PEFT works on the block container alone (no embedding or head needed there, and
    the server's sections have none); the modules change in place, so the model's
    parameter names stay the full model's.
    """
    if spec.r <= 0:
        raise ValueError("LoRA rank must be positive")
    blocks = decoder_blocks(model)
    if not any(n.rsplit(".", 1)[-1] in spec.target_modules for n, _ in blocks.named_modules()):
        return []  # e.g. a client section with no blocks: nothing to adapt
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,  # sections run in eval mode: the re-forward must equal the forward
        target_modules=list(spec.target_modules),
        bias="none",
    )
    inject_adapter_in_model(config, blocks)
    params = []
    for name, p in model.named_parameters():
        trainable = "lora_" in name
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    reset_lora(model, seed)
    return params


@torch.no_grad()
def reset_lora(model: nn.Module, seed: int) -> None:
    """PEFT's default init (A: kaiming-uniform, B: zero), drawn per full parameter name."""
    for name, p in model.named_parameters():
        if "lora_A" in name:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            # kaiming_uniform_(a=sqrt(5)) on a (r, in) matrix: bound = 1 / sqrt(in)
            bound = 1.0 / math.sqrt(p.shape[1])
            w = torch.rand(p.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
            p.copy_(w.to(p.dtype))
        elif "lora_B" in name:
            p.zero_()


def persistent_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> int:
    """A + O in the paper's memory model, as held now: the adapter's bytes and every tensor
    of the optimizer's state (AdamW: two moments and a step counter per parameter; none
    before its first step)."""
    state = optimizer.state.values() if optimizer is not None else ()
    tensors = [*params, *(t for s in state for t in s.values() if torch.is_tensor(t))]
    return sum(t.numel() * t.element_size() for t in tensors)


def make_optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
    """Adam without weight decay: elementwise, so split optimizers equal one over all params."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


def save_peft_adapter(directory: str, spec: LoraSpec, state: dict[str, torch.Tensor], base_model: str | None) -> None:
    """Write ``state`` (full parameter names, e.g. ``model.layers.3.self_attn.q_proj.lora_A.default.weight``)
    as ONE PEFT adapter, loadable with ``PeftModel.from_pretrained(full_model, directory)``."""
    from safetensors.torch import save_file

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(spec.target_modules),
                        bias="none", base_model_name_or_path=base_model)  # fmt: skip
    config.save_pretrained(directory)
    # PEFT's on-disk names: under base_model.model., without the adapter's name.
    tensors = {"base_model.model." + name.replace(".default.", "."): t.detach().cpu().contiguous()
               for name, t in state.items()}  # fmt: skip
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
