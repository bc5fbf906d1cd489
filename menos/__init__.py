"""Menos: split fine-tuning of LLMs over one shared copy of the base weights.

    import menos
    with menos.connect("tcp://127.0.0.1:5555", head_layers=1, tail_layers=0,
                       adapter=menos.LoraSpec(r=8, alpha=16)) as client:
        loss = client.train_step(input_ids)
"""

from menos.client import Client, connect, status
from menos.errors import MenosError, MenosTimeout
from menos.messages import ErrorCode, LoraSpec

__all__ = ["Client", "connect", "status", "LoraSpec", "MenosError", "MenosTimeout", "ErrorCode"]
__version__ = "0.1.0"
