"""A PEFT adapter directory's files, checked without torch (menos-generate checks them
before its imports; menos.export before it connects)."""

from __future__ import annotations

import json
import os
import struct

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT's load_peft_weights reads, in its order


def weights_file(directory: str, what: str) -> str:
    """The adapter's weights file; ``what`` names the argument in the error (e.g. ``--adapter DIR``)."""
    for name in WEIGHTS:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    # Without it, PEFT would look the directory up on the Hugging Face Hub as a repo id.
    raise ValueError(f"{what}: {CONFIG} is there but not the adapter's weights ({WEIGHTS[0]}): copy the whole "
                     "directory that Client.save_adapter wrote")  # fmt: skip


def check_weights(directory: str, what: str) -> None:
    """The weights file is there, and (safetensors) its header reads: an 8-byte length,
    then that many bytes of a JSON object, within the file."""
    path = weights_file(directory, what)
    if not path.endswith(".safetensors"):
        return
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > os.path.getsize(path) - 8:
                raise ValueError(f"a header of {length} bytes in a file of {os.path.getsize(path)}")
            header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {path} is not a readable safetensors file ({exc}): save the adapter again") from None
