"""Which adapter a client asked for, as the plain-data spec that travels in its Hello.

A client names its method with a PEFT config (``peft.LoraConfig``, ``peft.IA3Config``,
``peft.PrefixTuningConfig``) or with menos's own spec (``menos.LoraSpec``, ``IA3Spec``,
``PrefixSpec``). ``adapter_spec`` turns either into the spec, and refuses at once what a
split model cannot run, naming what it can. Light: no torch (PEFT is imported only to
read a PEFT config the caller already built).
"""

from __future__ import annotations

import dataclasses

import msgspec

from menos.messages import AdapterSpec, IA3Spec, LoraSpec, PrefixSpec

SUPPORTED = ("peft.LoraConfig (plain, use_dora, use_rslora), peft.IA3Config, peft.PrefixTuningConfig, "
             "or menos.LoraSpec / IA3Spec / PrefixSpec")  # fmt: skip

# PEFT config fields a spec carries (PEFT name -> spec name); other fields must keep PEFT's defaults.
_LORA_FIELDS = {"r": "r", "lora_alpha": "alpha", "target_modules": "target_modules", "lora_dropout": "dropout",
                "use_dora": "use_dora", "use_rslora": "use_rslora", "bias": None}  # fmt: skip
_IA3_FIELDS = {"target_modules": "target_modules", "feedforward_modules": "feedforward_modules"}
_PREFIX_FIELDS = {"num_virtual_tokens": "num_virtual_tokens"}
# Fields that describe where a config is used, not what the adapter is.
_CONTEXT_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                   "auto_mapping", "peft_version", "num_layers", "token_dim", "num_attention_heads",
                   "num_transformer_submodules", "encoder_hidden_size"}  # fmt: skip


def adapter_spec(adapter) -> AdapterSpec:
    """The wire spec for ``adapter`` (a spec, a PEFT config, or None: LoRA's defaults)."""
    if adapter is None:
        return LoraSpec()
    if isinstance(adapter, (LoraSpec, IA3Spec, PrefixSpec)):
        return validate(adapter)
    import peft

    for cls, spec_cls, fields in ((peft.LoraConfig, LoraSpec, _LORA_FIELDS), (peft.IA3Config, IA3Spec, _IA3_FIELDS),
                                  (peft.PrefixTuningConfig, PrefixSpec, _PREFIX_FIELDS)):  # fmt: skip
        if type(adapter) is cls:
            return validate(spec_cls(**_spec_fields(adapter, cls, fields)))
    raise ValueError(f"adapter {type(adapter).__name__} is not supported across the cut; supported: {SUPPORTED}")


def _spec_fields(config, cls, fields: dict) -> dict:
    default = cls()
    out = {}
    for f in dataclasses.fields(config):
        value, base = getattr(config, f.name), getattr(default, f.name)
        if f.name in fields:
            if fields[f.name] is None:  # a field PEFT has that only one value of is supported
                if value != base:
                    raise ValueError(f"{cls.__name__}.{f.name}={value!r} is not supported across the cut (only {base!r})")
                continue
            if f.name in ("target_modules", "feedforward_modules"):
                value = _module_names(cls.__name__, f.name, value)
            out[fields[f.name]] = value
        elif f.name not in _CONTEXT_FIELDS and value != base:
            carried = ", ".join(fields)
            raise ValueError(f"{cls.__name__}.{f.name}={value!r} is not supported across the cut; "
                             f"a split adapter takes {carried} (other fields at PEFT's defaults)")  # fmt: skip
    return out


def _module_names(cls: str, field: str, value) -> tuple[str, ...]:
    if value is None:
        return ()  # PEFT's default for the model type
    if value == "all-linear":
        return ("all-linear",)
    if isinstance(value, str):
        raise ValueError(f"{cls}.{field}={value!r}: a regular expression does not carry across the cut; "
                         "name the Linears (e.g. ['q_proj', 'v_proj']) or use 'all-linear'")  # fmt: skip
    return tuple(sorted(value))


def validate(spec: AdapterSpec) -> AdapterSpec:
    """Raise ValueError for values no model could run (both sides call it)."""
    if isinstance(spec, LoraSpec):
        if spec.r <= 0:
            raise ValueError("LoRA rank must be positive")
        if not 0.0 <= spec.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {spec.dropout}")
    elif isinstance(spec, IA3Spec):
        if spec.feedforward_modules and not set(spec.feedforward_modules) <= set(spec.target_modules):
            raise ValueError("IA3 feedforward_modules must be a subset of target_modules")
    elif isinstance(spec, PrefixSpec):
        if spec.num_virtual_tokens <= 0:
            raise ValueError("prefix tuning needs num_virtual_tokens > 0")
    else:
        raise ValueError(f"unknown adapter spec {type(spec).__name__}; supported: {SUPPORTED}")
    return spec


def describe(spec: AdapterSpec) -> str:
    """A short label for status tables, e.g. ``lora r8 q+v`` or ``prefix 20``."""
    short = lambda names: "+".join(m.removesuffix("_proj") for m in names) or "default"  # noqa: E731
    if isinstance(spec, LoraSpec):
        kind = "dora" if spec.use_dora else "rslora" if spec.use_rslora else "lora"
        return f"{kind} r{spec.r} {short(spec.target_modules)}"
    if isinstance(spec, IA3Spec):
        return f"ia3 {short(spec.target_modules)}"
    return f"prefix {spec.num_virtual_tokens}"


def same_tensors(a: AdapterSpec, b: AdapterSpec) -> bool:
    """Whether adapters ``a`` and ``b`` hold tensors of the same names and shapes, as far as
    the specs tell without the model: a resume may change alpha, dropout or rsLoRA's
    scaling, not these. Default targets ((), "all-linear") resolve only against the model,
    so they match any (the tensors' own check decides then)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, PrefixSpec):
        return a.num_virtual_tokens == b.num_virtual_tokens
    if isinstance(a, LoraSpec) and (a.r, a.use_dora) != (b.r, b.use_dora):
        return False
    explicit = lambda targets: bool(targets) and targets != ("all-linear",)  # noqa: E731
    if not (explicit(a.target_modules) and explicit(b.target_modules)):
        return True
    same = set(a.target_modules) == set(b.target_modules)
    return same and (isinstance(a, LoraSpec) or set(a.feedforward_modules) == set(b.feedforward_modules))


def position_offset(spec: AdapterSpec) -> int:
    """Prefix tuning shifts every real token's position by the virtual tokens (as PEFT does)."""
    return spec.num_virtual_tokens if isinstance(spec, PrefixSpec) else 0


# PEFT's defaults for the model types menos splits (peft.utils.constants; a test keeps
# them equal): what an adapter with no target_modules targets.
LORA_DEFAULT = {"llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
                "opt": ("q_proj", "v_proj")}  # fmt: skip
IA3_DEFAULT = {  # model type -> (target_modules, feedforward_modules)
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
}


def resolved(spec: AdapterSpec, model_type: str, linears) -> AdapterSpec:
    """``spec`` with PEFT's defaults filled in for ``model_type`` ("all-linear": every Linear
    of a block, ``linears``), so both sides and the export target the same modules."""
    if isinstance(spec, PrefixSpec):
        return spec
    if spec.target_modules == ("all-linear",):
        return msgspec.structs.replace(spec, target_modules=tuple(sorted(linears)))
    if spec.target_modules:
        return spec
    if isinstance(spec, LoraSpec):
        return msgspec.structs.replace(spec, target_modules=_default(LORA_DEFAULT, model_type))
    targets, ff = _default(IA3_DEFAULT, model_type)
    return IA3Spec(target_modules=targets, feedforward_modules=ff)


def _default(table: dict, model_type: str):
    try:
        return table[model_type]
    except KeyError:
        raise ValueError(f"no default target_modules for model type {model_type!r}: name them") from None
