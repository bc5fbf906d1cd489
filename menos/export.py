"""One PEFT adapter for the whole split model, written (and read back) by PEFT itself.

The client holds its sections' adapter, the worker the server's. To write them as the
adapter of ONE model, in PEFT's own names and format for every method, the whole model
is built on the meta device (structure only: no base weight is read or allocated),
PEFT's ``get_peft_model`` wraps it with the client's config, the trained tensors are
assigned into it, and PEFT's ``save_pretrained`` writes what it would for a model
trained on one machine. ``PeftModel.from_pretrained(full_base_model, directory)``
loads it. ``read_peft_adapter`` is the way back: a session starts from such an
adapter (``connect(init_adapter=DIR)``), with PEFT's own naming inverted (asked of the
skeleton with the adapter injected in place: no PeftModel is needed there). A directory
that is broken, or holds an adapter for another base model, is refused in one line
that names the file or the tensor, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from menos import prefix
from menos.adapter_files import CONFIG, check_weights, weights_file
from menos.adapter_spec import describe
from menos.adapters import peft_config
from menos.messages import AdapterSpec, PrefixSpec
from menos.surgery import family_of, skeleton

LEAD = "base_model.model."  # PeftModel's prefix on every saved LoRA / IA3 name


def save_peft_adapter(directory: str, spec: AdapterSpec, state: dict[str, torch.Tensor], config,
                      dtype: torch.dtype, base_model: str | None) -> str:  # fmt: skip
    """Write ``state`` (the whole model's adapter by full parameter name, e.g.
    ``model.layers.3.self_attn.q_proj.lora_A.default.weight``) as one PEFT adapter."""
    pcfg = peft_config(spec, config, base_model)
    base = skeleton(config, dtype)
    base.name_or_path = base_model or ""  # PEFT takes the base's name from the model (else it drops the config's)
    model = _peft_model(base, pcfg)
    if isinstance(spec, PrefixSpec):
        weight = prefix.assemble(state, family_of(config).layers_prefix, config.num_hidden_layers)
        tensors = {"prompt_encoder.default.embedding.weight": weight}
    else:
        tensors = {LEAD + name: t for name, t in state.items()}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter export: tensors do not match PEFT's model (missing {missing[:3]}, extra {extra[:3]})")
    model.load_state_dict({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, strict=False, assign=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _peft_model(model, pcfg):
    """PEFT's ``get_peft_model``, whose PeftModel reads transformers' deprecated
    ``is_gradient_checkpointing`` (PEFT's own code: no argument avoids it, and only a
    PeftModel writes PEFT's format): that one FutureWarning is silenced, for this call."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, pcfg)


def peft_adapter_spec(directory: str) -> AdapterSpec:
    """The spec of the PEFT adapter saved in ``directory`` (refused if not supported across
    the cut); a missing or unreadable config or weights file is refused here, naming it."""
    from menos.adapter_spec import adapter_spec

    pcfg = _read_config(directory)
    _check_weights(directory)
    return adapter_spec(pcfg)


def _read_config(directory: str):
    from peft import PeftConfig

    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"init_adapter={directory!r}: no {CONFIG} there (a PEFT adapter directory, "
                         "as Client.save_adapter writes)")  # fmt: skip
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"init_adapter={directory!r}: {path} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno}): save the adapter again, or mend the file")  # fmt: skip
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"init_adapter={directory!r}: cannot read {path} ({exc})") from None
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ValueError(f"init_adapter={directory!r}: {path} names no peft_type: it is not a PEFT adapter's config")
    try:
        return PeftConfig.from_pretrained(directory)
    except (KeyError, TypeError, ValueError) as exc:  # an unknown peft_type, a field of the wrong kind
        raise ValueError(f"init_adapter={directory!r}: {path} is not a config this PEFT reads "
                         f"({type(exc).__name__}: {exc})") from None  # fmt: skip


def _check_weights(directory: str) -> None:
    check_weights(directory, f"init_adapter={directory!r}")


def _load_weights(directory: str) -> dict[str, torch.Tensor]:
    from peft.utils import load_peft_weights

    path = weights_file(directory, f"init_adapter={directory!r}")
    try:
        return load_peft_weights(directory, device="cpu")
    except Exception as exc:  # noqa: BLE001  a damaged file: name it, not the reader's internals
        raise ValueError(f"init_adapter={directory!r}: cannot read {path} ({type(exc).__name__}: {exc})") from None


def read_peft_adapter(directory: str, spec: AdapterSpec, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole model's adapter tensors from a PEFT adapter directory, by full parameter
    name (as ``save_peft_adapter`` takes them); PEFT's own renaming is inverted by asking
    PEFT which name it saves each parameter under. Every tensor's shape is checked against
    this model's first: ValueError names the first that does not fit."""
    saved = _load_weights(directory)
    if isinstance(spec, PrefixSpec):
        return _read_prefix(directory, saved, spec, config, dtype)
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    # The adapter injected in place (no PeftModel): the same names, without its deprecation warning.
    model = inject_adapter_in_model(peft_config(spec, config), skeleton(config, dtype))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    index = get_peft_model_state_dict(model, state_dict={n: torch.tensor([i]) for i, n in enumerate(names)})
    by_key = {LEAD + key: names[int(i)] for key, i in index.items()}  # the saved name -> the parameter's
    _check_fits(directory, saved, {key: tuple(params[n].shape) for key, n in by_key.items()}, spec, config)
    return {name: saved[key].to(dtype) for key, name in by_key.items()}


def _read_prefix(directory: str, saved: dict, spec: PrefixSpec, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's one prompt embedding (N, layers x 2 x kv_heads x head_dim), by layer."""
    kv_heads, head_dim = prefix.kv_shape(config)
    key = next(iter(saved), "prompt_embeddings")
    expected = {key: (spec.num_virtual_tokens, config.num_hidden_layers * 2 * kv_heads * head_dim)}
    _check_fits(directory, saved, expected, spec, config)
    return prefix.disassemble(saved[key].to(dtype), family_of(config).layers_prefix, config)


def _check_fits(directory: str, saved: dict, expected: dict[str, tuple], spec: AdapterSpec, config) -> None:
    """``saved`` holds exactly the tensors ``expected`` (saved name -> shape), or ValueError
    names the first that does not fit, and the likely cause."""
    model = f"this server's model ({config.model_type}, hidden size {config.hidden_size}, " \
            f"{config.num_hidden_layers} layers) with {describe(spec)}"  # fmt: skip
    cause = f"an adapter for another base model{_saved_for(directory)}; start from one trained on this server's model"
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(f"init_adapter={directory!r} does not fit {model} (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}): {cause}")  # fmt: skip
    wrong = [k for k, shape in expected.items() if tuple(saved[k].shape) != shape]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"init_adapter={directory!r}: {k} has shape {tuple(saved[k].shape)} there, but {model} "
                         f"expects {expected[k]}{more}: {cause}")  # fmt: skip


def _saved_for(directory: str) -> str:
    """' (saved for BASE)' when the adapter's config names its base model."""
    try:
        with open(os.path.join(directory, CONFIG), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (saved for {base!r})" if base else ""
