"""One PEFT adapter for the whole split model, written by PEFT itself.

The client holds its sections' adapter, the worker the server's. To write them as the
adapter of ONE model, in PEFT's own names and format for every method, the whole model
is built on the meta device (structure only: no base weight is read or allocated),
PEFT's ``get_peft_model`` wraps it with the client's config, the trained tensors are
assigned into it, and PEFT's ``save_pretrained`` writes what it would for a model
trained on one machine. ``PeftModel.from_pretrained(full_base_model, directory)``
loads it.
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
