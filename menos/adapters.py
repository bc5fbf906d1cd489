"""Adapters on any section of the model, per client: LoRA (plain, DoRA, rsLoRA), IA3 and
prefix tuning, with initial weights that do not depend on the cut.

The client's choice arrives as a spec (``menos.adapter_spec``); ``peft_config`` turns it
back into PEFT's config, with every default resolved for the model type: the client's
sections, the server's blocks, the exported adapter and a local reference all use that
one config.

PEFT's own initialisation draws from the global RNG in module order, so the same seed
gives different weights to a block depending on which process builds it and what it
built before. Here every random tensor (LoRA's A, the prefixes) is drawn from a
generator seeded by (seed, full parameter name) instead: the client's sections, the
server's range and a local reference model all start from identical adapters, wherever
the cut is. The rest of PEFT's init is deterministic (LoRA's B = 0, DoRA's magnitude =
the base weight's norm, IA3's vectors = 1).
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, inject_adapter_in_model
from torch import nn

from menos import prefix
from menos.adapter_spec import resolved, validate
from menos.arch import arch_of
from menos.messages import AdapterSpec, IA3Spec, LoraSpec, PrefixSpec
from menos.surgery import decoder_blocks


def peft_config(spec: AdapterSpec, config, base_model: str | None = None):
    """PEFT's config for ``spec`` on a model of ``config``, defaults resolved for its type."""
    spec = resolved(spec, config.model_type, arch_of(config).linears)
    common = dict(task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    if isinstance(spec, LoraSpec):
        return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                          target_modules=list(spec.target_modules), use_dora=spec.use_dora,
                          use_rslora=spec.use_rslora, **common)  # fmt: skip
    if isinstance(spec, IA3Spec):
        return IA3Config(target_modules=list(spec.target_modules), feedforward_modules=list(spec.feedforward_modules),
                         **common)  # fmt: skip
    kv_heads, head_dim = prefix.kv_shape(config)
    return PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, num_layers=config.num_hidden_layers,
                              token_dim=kv_heads * head_dim, num_attention_heads=kv_heads, **common)  # fmt: skip


def inject(model: nn.Module, spec: AdapterSpec, seed: int) -> list[nn.Parameter]:
    """Add ``spec``'s adapter to ``model``'s blocks (a section or the whole model); return
    the trainable parameters, in name order. Only the adapter trains.

    PEFT works on the block container alone (no embedding or head needed there, and the
    server's sections have none); the modules change in place, so the model's parameter
    names stay the full model's. A section without blocks gets nothing.
    """
    validate(spec)
    base = {id(p) for p in model.parameters()}
    blocks = decoder_blocks(model)
    if isinstance(spec, PrefixSpec):
        # the compute dtype: a quantized section's first parameters are its packed weights
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        prefix.attach(blocks, model.config, spec.num_virtual_tokens, dtype)
    elif len(blocks):
        config = peft_config(spec, model.config)
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):  # PEFT then puts its bitsandbytes layers
            setattr(blocks, flag, bool(getattr(model, flag, False)))
        wanted = set(config.target_modules)
        if any(n.rsplit(".", 1)[-1] in wanted for n, _ in blocks.named_modules()):
            inject_adapter_in_model(config, blocks)
        if isinstance(spec, LoraSpec) and spec.dropout > 0:
            _seed_dropout(model, spec.dropout, seed)
    params = []
    for name, p in model.named_parameters():
        trainable = id(p) not in base
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    reset(model, seed)
    return params


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within: the frozen base alone. LoRA, DoRA and IA3 layers are switched off by PEFT's
    own switch, prefixes by theirs; trainability is put back as it was afterwards (PEFT's
    switch changes it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    kvs = [m for m in model.modules() if isinstance(m, prefix.PrefixKV)]
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m in layers:
            m.enable_adapters(False)
        for kv in kvs:
            kv.enabled = False
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for kv in kvs:
            kv.enabled = True
        for p, flag in trainable:
            p.requires_grad_(flag)


@torch.no_grad()
def reset(model: nn.Module, seed: int) -> None:
    """The random part of the adapter's init, drawn per full parameter name: LoRA's A as
    PEFT's default (kaiming-uniform, a=sqrt(5)), B = 0; prefixes as nn.Embedding (N(0, 1))."""
    for name, p in model.named_parameters():
        if "lora_A" in name:
            # kaiming_uniform_(a=sqrt(5)) on a (r, in) matrix: bound = 1 / sqrt(in)
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_((torch.rand(p.shape, generator=_gen(seed, name)) * (2 * bound) - bound).to(p.dtype))
        elif "lora_B" in name:
            p.zero_()
        elif name.endswith(prefix.PARAM):
            p.copy_(torch.randn(p.shape, generator=_gen(seed, name)).to(p.dtype))


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


# --------------------------------------------------------------------------- LoRA dropout


class SeededDropout(nn.Module):
    """LoRA's dropout with a mask drawn from (seed, module name, step): the server's
    re-forward at the backward draws the forward's mask again, and a local reference
    with the same seed draws the same masks. Off unless a training step is set
    (``set_dropout_step``); the module's train/eval flag is not used, since sections run
    in eval mode (the base model's own dropout stays off)."""

    def __init__(self, p: float, key: str):
        super().__init__()
        self.p, self.key = p, key
        self.step: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step is None:
            return x
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.key}:{self.step}".encode()))
        keep = (torch.rand(x.shape, generator=gen) >= self.p).to(device=x.device, dtype=x.dtype)
        return x * keep / (1.0 - self.p)


def _seed_dropout(model: nn.Module, p: float, seed: int) -> None:
    for name, module in list(model.named_modules()):
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for adapter in list(drops.keys()):
                drops[adapter] = SeededDropout(p, f"{seed}:{name}")
            module.train()  # DoRA applies dropout only in training mode; the base layer has none


def set_dropout_step(model: nn.Module, step: int | None) -> None:
    """Training micro-batch ``step`` draws its LoRA dropout masks; None turns dropout off."""
    for m in model.modules():
        if isinstance(m, SeededDropout):
            m.step = step


# --------------------------------------------------------------------------- memory


def persistent_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> int:
    """A + O in the paper's memory model, as held now: the adapter's bytes and every tensor
    of the optimizer's state (AdamW: two moments and a step counter per parameter; none
    before its first step)."""
    state = optimizer.state.values() if optimizer is not None else ()
    tensors = [*params, *(t for s in state for t in s.values() if torch.is_tensor(t))]
    return sum(t.numel() * t.element_size() for t in tensors)
