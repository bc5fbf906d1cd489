"""What the command-line tools share to check their arguments before the heavy imports
(torch alone takes seconds): one-line argument errors, and small JSON files read as such."""

from __future__ import annotations

import argparse
import json
import os

# menos.models.builtin_config's sizes, here to check arguments without importing torch
# (seconds); a test holds them equal.
BUILTIN_SHAPE = {"max_position_embeddings": 512, "num_hidden_layers": 6}


class OneLineParser(argparse.ArgumentParser):
    """Argument mistakes as one line and exit status 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\n")


def read_json_object(path: str, arg: str) -> dict:
    """The JSON object in ``path``; ValueError naming ``arg`` (e.g. ``--model DIR``) otherwise."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{arg}: {path} does not read as JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{arg}: {path} holds no JSON object")
    return obj


def raw_config(model: str | None) -> dict:
    """The model's config.json as a dict (``None`` or ``"builtin"``: the built-in model's sizes),
    read without transformers: enough to check arguments against (positions, layers)."""
    if model in (None, "builtin"):
        return dict(BUILTIN_SHAPE)
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--model {model}: not a checkpoint directory (no config.json); or use --model builtin")
    return read_json_object(path, f"--model {model}")
