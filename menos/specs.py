"""What a client asks for in its Hello, as plain data: the adapter method and the
training recipe. Part of the protocol (``menos.messages`` carries them); converted from
PEFT configs and connect's arguments by ``menos.adapter_spec`` and ``menos.client_config``.
"""

from __future__ import annotations

import enum
from typing import Union

import msgspec


class LoraSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="method", tag="lora"):
    """A LoRA adapter (plain, DoRA or rsLoRA), applied the same way to the client's and the server's blocks."""

    r: int = 8  # rank (paper default)
    alpha: float = 16  # scaling numerator: delta W = (alpha / r) * B @ A  (rsLoRA: alpha / sqrt(r))
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # Linear names inside each block; () = PEFT's default
    dropout: float = 0.0  # on the adapter's input, with masks seeded per step (the re-forward draws the same)
    use_dora: bool = False  # weight-decomposed LoRA: a trainable magnitude per output feature
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)


class IA3Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="method", tag="ia3"):
    """IA3: learned vectors that rescale the targeted Linears' outputs (feed-forward ones: inputs)."""

    target_modules: tuple[str, ...] = ()  # () = PEFT's default for the model type
    feedforward_modules: tuple[str, ...] = ()  # a subset of target_modules; () with () targets = PEFT's default


class PrefixSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="method", tag="prefix"):
    """Prefix tuning: trainable virtual keys and values in front of every block's attention
    (each side of the cut holds those of its own blocks)."""

    num_virtual_tokens: int = 20


AdapterSpec = Union[LoraSpec, IA3Spec, PrefixSpec]


class Schedule(str, enum.Enum):
    """The learning-rate schedule over optimizer steps (as transformers' schedulers)."""

    CONSTANT = "constant"  # after the warm-up
    LINEAR = "linear"  # linear decay to 0 at total_steps
    COSINE = "cosine"  # half a cosine down to 0 at total_steps


class Recipe(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The optimizer's recipe, run in lockstep on both sides of the cut (menos.recipe)."""

    lr: float = 1e-4  # AdamW's peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay, on every adapter parameter
    lr_schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0
    total_steps: int = 0  # optimizer steps the schedule decays over (linear, cosine)
    max_grad_norm: float = 0.0  # clip the global norm over both sides' adapter gradients (0: off)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
