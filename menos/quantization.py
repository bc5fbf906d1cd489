"""One 4-bit or 8-bit copy of the server's blocks for every tenant (QLoRA).

The one rule, read by the loader (``menos.packing``), the worker (``menos.surgery``), the
estimator and the tests' reference: the Linear layers of the decoder blocks are quantized
(every Linear of ``menos.arch``'s block); norms, embeddings, the output head and every
section a client runs never are (``skip_modules`` names those for transformers).

The formats are bitsandbytes' own, made as transformers' ``BitsAndBytesConfig`` makes them,
bit for bit, from the weight in the base's dtype:
- ``nf4`` / ``fp4``: blocks of 64 weights, one float32 absmax each, no double quantization
  (transformers' default). Under the weight's own name: the packed uint8 data (N*K/2, 1);
  beside it ``<name>.absmax`` and ``<name>.quant_map`` (the 16 levels).
- ``int8``: LLM.int8(), row-wise absmax of the float16 weight, outliers above 6.0 computed
  in float16 (transformers' ``llm_int8_threshold``). Under the weight's name: the int8
  matrix; beside it ``<name>.SCB``, the float32 row scales.
All of them are plain tensors, so the shared block (``menos.sharing``) holds them as it
holds any other; a worker builds ``Linear4bit`` / ``Linear8bitLt`` around them, with no copy
and no re-quantization (``quantized_linear``).

bitsandbytes is imported only when a quantization is used (``pip install menos[qlora]``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from menos.arch import arch_of

if TYPE_CHECKING:
    import torch
    from torch import nn

BLOCKSIZE = 64  # weights per absmax (4-bit); transformers' BitsAndBytesConfig has no other
INT8_THRESHOLD = 6.0  # transformers' default llm_int8_threshold
_STATE = {"nf4": (".absmax", ".quant_map"), "fp4": (".absmax", ".quant_map"), "int8": (".SCB",)}


class Quantization(str, enum.Enum):
    """How the server's block Linears are stored: ``none`` keeps the base's dtype."""

    NONE = "none"
    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"

    @classmethod
    def parse(cls, value: "str | Quantization | None") -> "Quantization":
        try:
            return cls(value or "none")
        except ValueError:
            raise ValueError(f"quantization {value!r}: one of {', '.join(q.value for q in cls)}") from None

    @property
    def four_bit(self) -> bool:
        return self in (Quantization.NF4, Quantization.FP4)


CHOICES = tuple(q.value for q in Quantization)  # the command lines' --quantization


def is_quantized_weight(key: str, config) -> bool:
    """Whether base tensor ``key`` is a decoder block Linear's weight: THE rule of what is quantized."""
    from menos.surgery import family_of

    prefix = family_of(config).layers_prefix
    if not (key.startswith(prefix) and key.endswith(".weight")):
        return False
    return key[: -len(".weight")].rsplit(".", 1)[-1] in arch_of(config).linears


def quantized_keys(keys: Iterable[str], config) -> list[str]:
    """The weights among ``keys`` that are quantized, in order."""
    return [k for k in keys if is_quantized_weight(k, config)]


def state_keys(key: str, q: Quantization) -> list[str]:
    """The tensors a quantized weight ``key`` is stored as: its data, then its state."""
    return [key] + [key + s for s in _STATE[q.value]]


def adapter_problem(q: Quantization, spec) -> str | None:
    """Why PEFT cannot put adapter ``spec`` (resolved or None: LoRA) on ``q``'s layers, or None."""
    if q is Quantization.INT8 and getattr(spec, "use_dora", False):
        return ("DoRA (use_dora=True) on an int8 base: PEFT's DoRA fails on bitsandbytes' int8 layers; "
                "use LoRA or rsLoRA here, or DoRA on a 4-bit base (--quantization nf4)")  # fmt: skip
    return None


def dequantized_bytes(config, q: Quantization, elem_bytes: int) -> int:
    """A compute's transient extra memory: bitsandbytes dequantizes a whole weight (the largest
    Linear's, in the compute dtype) for each forward and backward through it."""
    if q is Quantization.NONE:
        return 0
    return max(fan_in * fan_out for fan_in, fan_out, _ in arch_of(config).linears.values()) * elem_bytes


def skip_modules(config, head_layers: int, tail_layers: int) -> list[str]:
    """transformers' ``llm_int8_skip_modules`` for a whole model quantized as a split one is:
    the client's ends and its head and tail blocks (full module names)."""
    from menos.surgery import family_of

    family = family_of(config)
    layers = config.num_hidden_layers
    client_blocks = [*range(head_layers), *range(layers - tail_layers, layers)]
    return [*family.client_modules, *(f"{family.layers_prefix}{i}" for i in client_blocks)]


def quantize(state: Mapping[str, "torch.Tensor"], config, q: Quantization) -> dict[str, "torch.Tensor"]:
    """``state`` with each quantized weight replaced by its stored tensors (``state_keys``);
    everything else as it is. CPU; the weights in the base's dtype, as loaded."""
    if q is Quantization.NONE:
        return dict(state)
    out = {}
    for key, t in state.items():
        if is_quantized_weight(key, config):
            out.update(zip(state_keys(key, q), quantize_weight(t, q)))
        else:
            out[key] = t
    return out


def quantize_weight(weight: "torch.Tensor", q: Quantization) -> list["torch.Tensor"]:
    """One weight (out, in) -> its stored tensors, in ``state_keys`` order."""
    F = _bnb().functional
    if q.four_bit:
        data, qs = F.quantize_4bit(weight.detach().contiguous(), blocksize=BLOCKSIZE, quant_type=q.value,
                                   compress_statistics=False)  # fmt: skip
        return [data, qs.absmax, qs.code]
    cb, scb, _ = F.int8_vectorwise_quant(weight.detach().half().contiguous())
    return [cb, scb]


def quantized_linear(linear: "nn.Module", tensors: Mapping[str, "torch.Tensor"], key: str, q: Quantization,
                     compute_dtype: "torch.dtype") -> "nn.Module":  # fmt: skip
    """A bitsandbytes layer in place of ``linear`` (an ``nn.Linear``, on meta is fine) whose
    weight and state, and bias if it has one, ARE ``tensors``' (``state_keys(key, q)``, the
    bias under its own name): no copy, nothing re-quantized; frozen."""
    import torch

    bnb = _bnb()
    data, *state = (tensors[k] for k in state_keys(key, q))
    has_bias = linear.bias is not None
    if q.four_bit:
        qs = bnb.functional.QuantState(absmax=state[0], code=state[1], shape=torch.Size(linear.weight.shape),
                                       blocksize=BLOCKSIZE, quant_type=q.value, dtype=compute_dtype)  # fmt: skip
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=False, quant_type=q.value, quant_storage=data.dtype,
                                  device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(data=data, requires_grad=False, quant_state=qs, blocksize=BLOCKSIZE,
                                         compress_statistics=False, quant_type=q.value, quant_storage=data.dtype,
                                         bnb_quantized=True, module=layer)  # fmt: skip
        layer.quant_state = qs
        # On a CPU with AVX512-BF16, bnb repacks the weight into a private bf16 layout at the
        # first eval forward: a copy per worker, other numerics than training's, and in-place
        # failures after. Off: every forward computes as the reference's training forward.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")  # fmt: skip
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=state[0])
    if has_bias:
        layer.bias = torch.nn.Parameter(tensors[key[: -len("weight")] + "bias"], requires_grad=False)
    return layer


def probe(q: Quantization, device: str, dtype: "torch.dtype") -> None:
    """One small layer quantized, rebuilt and run forward and backward on ``device`` in
    ``dtype``, as a worker will: bitsandbytes' error, if it cannot, before anything loads."""
    import torch

    if q is Quantization.NONE:
        return
    key = "probe.weight"
    linear = torch.nn.Linear(128, 64, bias=False, dtype=dtype)
    tensors = {k: t.to(device) for k, t in zip(state_keys(key, q), quantize_weight(linear.weight, q))}
    layer = quantized_linear(linear, tensors, key, q, dtype)
    x = torch.ones(2, 128, dtype=dtype, device=device, requires_grad=True)
    layer(x).sum().backward()


def quantize_section(model: "nn.Module", tensors: Mapping[str, "torch.Tensor"], q: Quantization,
                     compute_dtype: "torch.dtype") -> set[str]:  # fmt: skip
    """Replace ``model``'s quantized Linears (by the rule) with bitsandbytes layers on
    ``tensors``; mark the model so that PEFT puts its bnb-aware adapters on them. Returns the
    module paths replaced."""
    done = set()
    for key in quantized_keys([n + ".weight" for n, _ in model.named_modules() if n], model.config):
        path = key[: -len(".weight")]
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, name, quantized_linear(getattr(owner, name), tensors, key, q, compute_dtype))
        done.add(path)
    if done:  # as transformers marks a quantized model (menos.adapters.inject tells PEFT)
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = q.four_bit, q is Quantization.INT8
    return done


class _Kernels:
    """A section's bitsandbytes layers whose kernels depend on the training flag (int8: a
    training forward dequantizes, an eval one multiplies in int8), switched together while
    the rest of the section stays in eval mode (no dropout on the server)."""

    def __init__(self, layers: list):
        self.layers = layers

    def train(self, training: bool) -> None:
        for layer in self.layers:
            layer.training = training


def quantized_kernels(model: "nn.Module", q: "Quantization | str") -> _Kernels:
    """The section's int8 layers (4-bit ones compute the same either way, as measured)."""
    if Quantization.parse(q) is not Quantization.INT8:
        return _Kernels([])
    return _Kernels([m for m in model.modules() if isinstance(m, _bnb().nn.Linear8bitLt)])


def stored_bytes(config, q: Quantization, elem_bytes: int) -> int:
    """Bytes of one block's Linear weights as stored (biases not counted): the estimator's."""
    total = 0
    for fan_in, fan_out, _ in arch_of(config).linears.values():
        n = fan_in * fan_out
        if q is Quantization.NONE:
            total += n * elem_bytes
        elif q.four_bit:
            total += n // 2 + -(-n // BLOCKSIZE) * 4 + 16 * 4  # packed data, absmax, the 16 levels
        else:
            total += n + fan_out * 4  # int8 data, a float32 scale per row
    return total


def _bnb():
    """bitsandbytes (quiet: see ``menos/__init__.py``)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.nn  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"quantization needs bitsandbytes (pip install 'menos[qlora]'): {exc}") from None
    return bitsandbytes
