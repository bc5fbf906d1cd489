"""One PEFT adapter for the whole split model, written (and read back) by PEFT itself.

The client holds its sections' adapter, the worker the server's. To write them as the
adapter of ONE model, in PEFT's own names and format for every method, the whole model
is built on the meta device (structure only: no base weight is read or allocated),
PEFT's ``get_peft_model`` wraps it with the client's config, the trained tensors are
assigned into it, and PEFT's ``save_pretrained`` writes what it would for a model
trained on one machine. ``PeftModel.from_pretrained(full_base_model, directory)``
loads it. ``read_peft_adapter`` is the way back: a session starts from such an
adapter (``connect(init_adapter=DIR)``), with PEFT's own naming inverted.
"""

from __future__ import annotations

import torch

from menos import prefix
from menos.adapters import peft_config
from menos.messages import AdapterSpec, PrefixSpec
from menos.surgery import family_of, skeleton


def save_peft_adapter(directory: str, spec: AdapterSpec, state: dict[str, torch.Tensor], config,
                      dtype: torch.dtype, base_model: str | None) -> str:  # fmt: skip
    """Write ``state`` (the whole model's adapter by full parameter name, e.g.
    ``model.layers.3.self_attn.q_proj.lora_A.default.weight``) as one PEFT adapter."""
    from peft import get_peft_model

    pcfg = peft_config(spec, config, base_model)
    model = get_peft_model(skeleton(config, dtype), pcfg)
    if isinstance(spec, PrefixSpec):
        weight = prefix.assemble(state, family_of(config).layers_prefix, config.num_hidden_layers)
        tensors = {"prompt_encoder.default.embedding.weight": weight}
    else:
        tensors = {"base_model.model." + name: t for name, t in state.items()}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter export: tensors do not match PEFT's model (missing {missing[:3]}, extra {extra[:3]})")
    model.load_state_dict({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, strict=False, assign=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def peft_adapter_spec(directory: str) -> AdapterSpec:
    """The spec of the PEFT adapter saved in ``directory`` (refused if not supported across the cut)."""
    import os

    from peft import PeftConfig

    from menos.adapter_spec import adapter_spec

    if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
        raise ValueError(f"init_adapter={directory!r}: no adapter_config.json there (a PEFT adapter directory, "
                         "as Client.save_adapter writes)")  # fmt: skip
    return adapter_spec(PeftConfig.from_pretrained(directory))


def read_peft_adapter(directory: str, spec: AdapterSpec, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole model's adapter tensors from a PEFT adapter directory, by full parameter
    name (as ``save_peft_adapter`` takes them); PEFT's own renaming is inverted by asking
    PEFT which name it saves each parameter under."""
    from peft import get_peft_model, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = load_peft_weights(directory, device="cpu")
    if isinstance(spec, PrefixSpec):
        (weight,) = saved.values()  # PEFT's one prompt embedding (N, layers x 2 x kv_heads x head_dim)
        return prefix.disassemble(weight.to(dtype), family_of(config).layers_prefix, config)
    model = get_peft_model(skeleton(config, dtype), peft_config(spec, config))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    index = get_peft_model_state_dict(model, state_dict={n: torch.tensor([i]) for i, n in enumerate(names)})
    if set(index) != set(saved):
        missing, extra = sorted(set(index) - set(saved)), sorted(set(saved) - set(index))
        raise ValueError(f"init_adapter={directory!r} does not fit this base model with {spec} "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")  # fmt: skip
    lead = "base_model.model."
    return {names[int(i)][len(lead):]: saved[key].to(dtype) for key, i in index.items()}
