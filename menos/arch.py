"""Parameter counts from a transformers config alone: a block's shapes, the base model,
and each adapter method's trainable parameters (the estimator's M and A + O).
Light: no torch or transformers import (a config is only read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from menos.adapter_spec import resolved
from menos.messages import AdapterSpec, IA3Spec, LoraSpec, PrefixSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DEFAULT_ADAPTER = LoraSpec()
ADAM_STEP_BYTES = 4  # AdamW keeps each parameter's step count as a float32 scalar tensor


@dataclass(frozen=True)
class Arch:
    """What the memory model needs from a config: one decoder block's shapes."""

    family: str  # "llama" (llama, mistral, qwen2) or "opt"
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int  # MLP width (intermediate_size / ffn_dim)
    layers: int
    linears: dict  # one block's Linears: name -> (in_features, out_features, has_bias)
    norm_params: int  # one block's normalization weights (and biases)
    act_saves_output: bool  # the MLP activation keeps its output (relu) rather than its input

    @property
    def attn(self) -> int:
        return self.heads * self.head_dim


def arch_of(config: PretrainedConfig) -> Arch:
    mt = config.model_type
    h, nh = config.hidden_size, config.num_attention_heads
    if mt in ("llama", "mistral", "qwen2"):
        nkv = getattr(config, "num_key_value_heads", None) or nh
        hd = getattr(config, "head_dim", None) or h // nh
        i = config.intermediate_size
        qkv_bias = True if mt == "qwen2" else bool(getattr(config, "attention_bias", False))
        o_bias = bool(getattr(config, "attention_bias", False)) if mt == "llama" else False
        mlp_bias = bool(getattr(config, "mlp_bias", False)) if mt == "llama" else False
        linears = {
            "q_proj": (h, nh * hd, qkv_bias), "k_proj": (h, nkv * hd, qkv_bias), "v_proj": (h, nkv * hd, qkv_bias),
            "o_proj": (nh * hd, h, o_bias),
            "gate_proj": (h, i, mlp_bias), "up_proj": (h, i, mlp_bias), "down_proj": (i, h, mlp_bias),
        }  # fmt: skip
        return Arch("llama", mt, h, nh, nkv, hd, i, config.num_hidden_layers, linears, 2 * h, False)
    if mt == "opt":
        f, b = config.ffn_dim, bool(getattr(config, "enable_bias", True))
        linears = {"q_proj": (h, h, b), "k_proj": (h, h, b), "v_proj": (h, h, b), "out_proj": (h, h, b),
                   "fc1": (h, f, b), "fc2": (f, h, b)}  # fmt: skip
        norms = 2 * 2 * h if getattr(config, "layer_norm_elementwise_affine", True) else 0
        relu = getattr(config, "activation_function", "relu") == "relu"
        return Arch("opt", mt, h, nh, nh, h // nh, f, config.num_hidden_layers, linears, norms, relu)
    raise ValueError(f"model type {mt!r} is not supported; supported: llama, mistral, opt, qwen2")


def _linear_params(in_f: int, out_f: int, bias: bool) -> int:
    return in_f * out_f + (out_f if bias else 0)


def block_params(arch: Arch) -> int:
    """Base parameters of one decoder block."""
    return sum(_linear_params(*spec) for spec in arch.linears.values()) + arch.norm_params


def model_params(config: PretrainedConfig) -> int:
    """All base parameters of the causal LM, tied embeddings counted once."""
    arch = arch_of(config)
    h, v = config.hidden_size, config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", True))
    total = arch.layers * block_params(arch)
    if arch.family == "llama":
        embed_dim = h
        total += v * h + h  # embed_tokens, final norm
    else:
        embed_dim = getattr(config, "word_embed_proj_dim", None) or h
        total += v * embed_dim + (config.max_position_embeddings + 2) * h  # tokens; positions (offset 2)
        if embed_dim != h:
            total += 2 * embed_dim * h  # project_in, project_out (no bias)
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            total += 2 * h if getattr(config, "layer_norm_elementwise_affine", True) else 0
    if not tied:
        total += v * embed_dim  # lm_head (no bias)
    return total


def spec_for(arch: Arch, spec: AdapterSpec) -> AdapterSpec:
    return resolved(spec, arch.model_type, arch.linears)


def adapter_params(arch: Arch, n_blocks: int, spec: AdapterSpec = DEFAULT_ADAPTER) -> int:
    """Trainable parameters of ``spec`` in ``n_blocks`` blocks: LoRA's A (r x in) and B
    (out x r) per targeted Linear (DoRA: and a magnitude per output); IA3's vector per
    targeted Linear (out, or in for a feed-forward one); a prefix's N keys and values."""
    spec = spec_for(arch, spec)
    if isinstance(spec, PrefixSpec):
        return n_blocks * spec.num_virtual_tokens * 2 * arch.kv_heads * arch.head_dim
    hit = targeted(arch, spec.target_modules)
    if isinstance(spec, IA3Spec):
        ff = set(spec.feedforward_modules)
        return n_blocks * sum(arch.linears[n][0] if n in ff else arch.linears[n][1] for n in hit)
    per = sum(spec.r * (arch.linears[n][0] + arch.linears[n][1]) + (arch.linears[n][1] if spec.use_dora else 0)
              for n in hit)  # fmt: skip
    return n_blocks * per


def adapter_tensors(arch: Arch, n_blocks: int, spec: AdapterSpec = DEFAULT_ADAPTER) -> int:
    """Trainable tensors of ``spec`` in ``n_blocks`` blocks (AdamW keeps a step counter for each)."""
    spec = spec_for(arch, spec)
    if isinstance(spec, PrefixSpec):
        return n_blocks
    per_linear = 1 if isinstance(spec, IA3Spec) else 3 if spec.use_dora else 2
    return n_blocks * per_linear * len(targeted(arch, spec.target_modules))


def adapter_and_optimizer_bytes(arch: Arch, n_blocks: int, spec: AdapterSpec, elem_bytes: int) -> int:
    """A + O: the adapter, AdamW's two moments per weight, and its step counter per tensor."""
    return 3 * adapter_params(arch, n_blocks, spec) * elem_bytes + ADAM_STEP_BYTES * adapter_tensors(arch, n_blocks, spec)


def targeted(arch: Arch, targets) -> set[str]:
    hit = set(targets) & set(arch.linears)
    if not hit:
        raise ValueError(f"adapter targets {tuple(targets)} match no Linear of a block ({sorted(arch.linears)})")
    return hit
