"""Menos: split fine-tuning of LLMs over one shared copy of the base weights.

    import menos, peft
    with menos.connect("tcp://127.0.0.1:5555", head_layers=1, tail_layers=0,
                       adapter=peft.LoraConfig(r=8, lora_alpha=16)) as client:
        loss = client.train_step(input_ids)

The client library (torch, transformers, PEFT) loads on first use of ``connect`` or
``Client``, so light tools (``menos-manager status``, ``keys``) start fast.
"""

import logging

# PEFT imports bitsandbytes wherever it is installed (menos[qlora]), and bitsandbytes then warns,
# in every process, that a faster CPU kernel needs a package that fetches kernels from a hub at run
# time; its int8 layers warn at each call that they compute in float16. Neither is news to a user.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from menos.client_config import ClientConfig  # noqa: E402
from menos.errors import MenosError, MenosTimeout  # noqa: E402
from menos.messages import ErrorCode, IA3Spec, LoraSpec, PrefixSpec  # noqa: E402

__all__ = ["Client", "ClientConfig", "connect", "status", "LoraSpec", "IA3Spec", "PrefixSpec", "MenosError",
           "MenosTimeout", "ErrorCode"]  # fmt: skip
__version__ = "0.1.0"

_LAZY = {"Client": "menos.client", "connect": "menos.client", "status": "menos.channel"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'menos' has no attribute {name!r}")
