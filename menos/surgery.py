"""Model surgery: split a transformers causal LM into client and server sections.

The trick that keeps names simple: the decoder's ``layers`` ModuleList is replaced by
a ModuleDict keyed by the *global* block index, so a cropped model's parameter names
(``model.layers.5.self_attn.q_proj.weight``) are exactly the full model's. The
shared state dict, the adapter's initial weights and an exported adapter all use the
same names on the client, on the server and in a local reference model.

Sections are rebuilt on the meta device and filled with ``load_state_dict(...,
assign=True)``, so no weight is allocated twice. Blocks are called with keyword
arguments and a causal mask built here, because decoder-layer signatures differ
across transformers releases.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from menos import kv_cache, prefix
from menos.kv_cache import KVCache


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its parts, and how to run its ends."""

    name: str
    core: str  # dotted path of the module holding ``layers``
    client_modules: tuple[str, ...]  # dotted paths of the client's non-block modules
    rotary: bool  # blocks need position_embeddings from a rotary module

    @property
    def layers_prefix(self) -> str:
        return f"{self.core}.layers."


_LLAMA = Family("llama", "model", ("model.embed_tokens", "model.norm", "lm_head"), rotary=True)
_OPT = Family(
    "opt",
    "model.decoder",
    (
        "model.decoder.embed_tokens",
        "model.decoder.embed_positions",
        "model.decoder.project_in",
        "model.decoder.final_layer_norm",
        "model.decoder.project_out",
        "lm_head",
    ),
    rotary=False,
)
FAMILIES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "opt": _OPT}


def family_of(config: PretrainedConfig) -> Family:
    try:
        return FAMILIES[config.model_type]
    except KeyError:
        raise ValueError(f"model type {config.model_type!r} is not supported; supported: {sorted(FAMILIES)}") from None


def config_from_json(text: str) -> PretrainedConfig:
    d = json.loads(text)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def config_to_json(config: PretrainedConfig) -> str:
    return config.to_json_string(use_diff=False)


def _get(root: nn.Module, path: str):
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _set(root: nn.Module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


def skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The full model on the meta device: structure only, no memory."""
    config._attn_implementation = "sdpa"  # noqa: SLF001  same kernel on client, server, reference
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def crop(model: nn.Module, keep_blocks: Iterable[int], keep_client_modules: bool) -> nn.Module:
    """Keep only ``keep_blocks`` (named by global index) and, if asked, the client's ends."""
    family = family_of(model.config)
    core = _get(model, family.core)
    layers = core.layers
    core.layers = nn.ModuleDict({str(i): layers[i] for i in keep_blocks})
    if not keep_client_modules:
        for path in family.client_modules:
            if _get(model, path) is not None:
                _set(model, path, None)
    return model


def section_keys(state_keys: Iterable[str], config: PretrainedConfig, blocks: Iterable[int], client_modules: bool) -> list[str]:
    """Names of the base tensors a section needs."""
    family = family_of(config)
    prefixes = [f"{family.layers_prefix}{i}." for i in blocks]
    if client_modules:
        prefixes += [p + "." for p in family.client_modules]
    return [k for k in state_keys if any(k.startswith(p) for p in prefixes)]


def build_section(
    config: PretrainedConfig,
    tensors: Mapping[str, torch.Tensor],
    blocks: Iterable[int],
    client_modules: bool,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    quantization=None,
) -> nn.Module:
    """A cropped model whose base parameters ARE ``tensors`` (assigned, not copied), frozen.
    With a ``quantization``, its block Linears are bitsandbytes layers on the quantized
    tensors ``menos.quantization.quantize`` made (``dtype``: the compute dtype)."""
    from menos.quantization import Quantization, quantize_section

    blocks = list(blocks)
    model = crop(skeleton(config, dtype), blocks, client_modules)
    wanted = set(model.state_dict().keys())
    missing = wanted - set(tensors)  # a quantized weight is stored under its own name too
    if missing:
        raise KeyError(f"base tensors missing for this section: {sorted(missing)[:5]}")
    quantization = Quantization.parse(quantization)
    replaced = set()  # module paths of the bitsandbytes layers, which hold their own tensors
    if quantization is not Quantization.NONE:
        replaced = quantize_section(model, tensors, quantization, dtype)
        wanted = {k for k in wanted if k.rpartition(".")[0] not in replaced}
    result = model.load_state_dict({k: tensors[k] for k in wanted}, assign=True, strict=not replaced)
    left = [k for k in result.missing_keys if k.rpartition(".")[0] not in replaced] + list(result.unexpected_keys)
    if left:
        raise KeyError(f"base tensors that do not fit this section: {left[:5]}")
    family = family_of(config)
    core = _get(model, family.core)
    if family.rotary:
        # inv_freq is a non-persistent buffer: not in any state dict, still on meta.
        with torch.device(device):
            core.rotary_emb = type(core.rotary_emb)(config=config)
    for p in model.parameters():
        p.requires_grad_(False)  # assign=True keeps requires_grad=True; the base is frozen
    model.eval()  # dropout off: the server's re-forward must reproduce the forward exactly
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"section still has tensors on meta: {on_meta[:5]}")
    return model


class BlockRunner:
    """Runs a family's decoder blocks on hidden states (B, T, H) with a causal mask.

    ``position_offset``: the real tokens' first position (prefix tuning: the number of
    virtual tokens, as PEFT shifts them); blocks that hold a prefix (``menos.prefix``)
    attend to it in front of the real tokens."""

    def __init__(self, model: nn.Module, position_offset: int = 0):
        self.model = model
        self.family = family_of(model.config)
        self.core = _get(model, self.family.core)
        self.position_offset = position_offset

    @property
    def blocks(self) -> nn.ModuleDict:
        return self.core.layers  # cropped: keyed by global index

    def run(self, hidden: torch.Tensor, which: Iterable[int] | None = None, cache: KVCache | None = None,
            pads: tuple[int, ...] = ()) -> torch.Tensor:  # fmt: skip
        """hidden: (B, T, H) -> (B, T, H) through the kept blocks, or ``which`` of them. With
        ``cache`` (generation): the T positions after those the cache holds, of left-padded
        rows (``pads``, see ``menos.kv_cache``); their keys and values join the cache. Without
        a cache, ``pads`` are left pads too (a training forward of prompt + completion)."""
        keys = [str(i) for i in which] if which is not None else list(self.blocks.keys())
        if not keys:
            return hidden
        b, t, _ = hidden.shape
        prefixes = prefix.of(self.blocks)
        if cache is not None or any(pads):  # left-padded rows: generate's mask and positions
            if prefixes:
                raise ValueError(f"{'generation' if cache is not None else 'left padding'} with prefix tuning is "
                                 "not supported")  # fmt: skip
            start = 0 if cache is None else cache.get_seq_length(int(keys[0]))
            position_ids = kv_cache.positions(pads, start, t, hidden.device)
            kwargs = {"attention_mask": kv_cache.attention_mask(pads, start, t, hidden.dtype, hidden.device),
                      "position_ids": position_ids}  # fmt: skip
            if cache is not None:
                kwargs[cache_keyword(self.blocks[keys[0]])] = cache
        else:
            past = next(iter(prefixes.values())).num_virtual_tokens if prefixes else 0
            offset = self.position_offset if prefixes else 0  # prefixes switched off: the base's positions
            position_ids = torch.arange(t, device=hidden.device).add(offset).unsqueeze(0).expand(b, t)
            kwargs = {"attention_mask": causal_mask(b, t, hidden.dtype, hidden.device, past), "position_ids": position_ids}
        if prefixes:
            kwargs[cache_keyword(self.blocks[keys[0]])] = prefix.PrefixCache(prefixes, b)
        if self.family.rotary:
            kwargs["position_embeddings"] = self.core.rotary_emb(hidden, position_ids)
        for k in keys:
            out = self.blocks[k](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def cache_keyword(block: nn.Module) -> str:
    """The keyword a decoder block takes its key/value cache by: ``cache`` from transformers
    5.24 on, ``past_key_values`` before. A block silently ignores the wrong one (it takes
    ``**kwargs``) and then runs without a cache: generation and prefix tuning go wrong."""
    return _cache_keyword(type(block))


@functools.cache
def _cache_keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{cls.__name__}.forward takes no key/value cache (neither 'cache' nor 'past_key_values')")


def decoder_blocks(model: nn.Module) -> nn.ModuleDict:
    """The (cropped) model's blocks, keyed by global index."""
    return _get(model, family_of(model.config).core).layers


def causal_mask(b: int, t: int, dtype: torch.dtype, device, past: int = 0) -> torch.Tensor:
    """Additive mask (B, 1, T, past + T): 0 on and below the diagonal, dtype's min above;
    the ``past`` keys in front (a prefix) are seen by every token."""
    mask = torch.full((t, past + t), torch.finfo(dtype).min, dtype=dtype, device=device).triu(past + 1)
    return mask[None, None].expand(b, 1, t, past + t)


def embed(model: nn.Module, input_ids: torch.Tensor, position_offset: int = 0,
          position_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Client side: token ids (B, T) -> hidden states (B, T, H) before block 0 (OPT's learned
    positions start at ``position_offset``, or are ``position_ids`` (B, T))."""
    family = family_of(model.config)
    core = _get(model, family.core)
    hidden = core.embed_tokens(input_ids)
    if family.name == "opt":
        b, t = input_ids.shape
        positions = position_ids if position_ids is not None else (
            torch.arange(t, device=input_ids.device).add(position_offset).unsqueeze(0).expand(b, t))  # fmt: skip
        if core.project_in is not None:
            hidden = core.project_in(hidden)
        # Call nn.Embedding directly: OPT's positional forward changed signature across
        # releases; its only logic is the fixed offset of 2.
        pos = core.embed_positions
        hidden = hidden + nn.Embedding.forward(pos, positions + getattr(pos, "offset", 2))
    return hidden


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Client side: hidden states after the last block (B, T, H) -> logits (B, T, V)."""
    return model.lm_head(final_hidden(model, hidden))


def final_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states after the last block -> what the head reads (transformers' decoder
    output, ``last_hidden_state``): the final norm (OPT: and its projection out)."""
    family = family_of(model.config)
    core = _get(model, family.core)
    if family.name == "opt":
        if core.final_layer_norm is not None:
            hidden = core.final_layer_norm(hidden)
        if core.project_out is not None:
            hidden = core.project_out(hidden)
        return hidden
    return core.norm(hidden)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, as transformers computes it (fp32, -100 ignored)."""
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1].float().reshape(-1, vocab)  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
