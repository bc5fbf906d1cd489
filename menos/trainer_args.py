"""A trainer's settings that the split cannot honour, named before its first step.

``client.hf_model()`` is driven by transformers' ``Trainer`` (and TRL's trainers, its
subclasses); the model never receives their arguments, so at its first forward it finds
the trainer that calls it (``calling_trainer``) and checks them once (``problem``).
"""

from __future__ import annotations

import sys


def calling_trainer(max_depth: int = 40):
    """The ``transformers.Trainer`` whose method is on the call stack, or None (a loop of
    your own). Read from the frames: the model is given nothing else by the trainer."""
    trainer_cls = getattr(sys.modules.get("transformers.trainer"), "Trainer", None)
    if trainer_cls is None:
        return None
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_cls):
            return candidate
        frame = frame.f_back
    return None


def problem(args, batch_size: int, seq_len: int, trainer_name: str = "Trainer", evaluates: bool = False) -> str | None:
    """The first setting of ``args`` (TrainingArguments or a TRL config) that a session of
    ``batch_size`` x ``seq_len`` cannot run, as one line naming it and the fix; else None.
    ``trainer_name``: the TRL trainer it is for; ``evaluates``: it has an eval dataset."""
    where = "one process drives one session: run one trainer per client"
    device = getattr(args, "device", None)
    if getattr(device, "type", "cpu") != "cpu" or getattr(args, "n_gpu", 0) > 1:
        return (f"the trainer would move the model to {device}: the client's sections run on the CPU (the server "
                "holds the blocks); set use_cpu=True")  # fmt: skip
    for name in ("use_vllm", "use_transformers_paged"):
        if getattr(args, name, False):
            return f"{name}=True: generation runs through the split (hf_model().generate); set it False"
    if getattr(args, "torch_compile", False):
        return ("torch_compile=True: the server's blocks are a remote call that cannot be compiled; "
                "set torch_compile=False")  # fmt: skip
    if getattr(args, "deepspeed", None):
        return f"deepspeed={args.deepspeed!r}: {where}, without DeepSpeed (the server holds the shared base)"
    if getattr(args, "fsdp", None):
        return f"fsdp={args.fsdp!r}: {where}, without FSDP (the server holds the shared base)"
    if getattr(args, "world_size", 1) > 1:
        return f"{args.world_size} processes (world_size): {where}"
    if getattr(args, "use_liger_kernel", False):
        return ("use_liger_kernel=True: Liger patches the model's modules, which are on both sides of the cut; "
                "set it False")  # fmt: skip
    if getattr(args, "padding_free", False) or (getattr(args, "packing", False)
                                               and getattr(args, "packing_strategy", "bfd") == "bfd"):  # fmt: skip
        setting = "padding_free=True" if getattr(args, "padding_free", False) else "packing=True"
        return f"{setting}: packed rows need position_ids across documents, which the split does not take; set it False"
    # DPO sends chosen and rejected rows in one batch; GRPO generates a whole generation batch at once.
    rows = {"DPOTrainer": 2}.get(trainer_name, 1)
    names = ["per_device_train_batch_size", "generation_batch_size"] + ["per_device_eval_batch_size"] * evaluates
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value * rows > batch_size:
            return (f"{name}={value}{' (x2: chosen and rejected)' if rows == 2 else ''} exceeds the session's "
                    f"batch_size={batch_size}: lower it, or connect with batch_size={value * rows}")  # fmt: skip
    for name in ("max_length", "max_seq_length"):
        value = getattr(args, name, None)
        if value is not None and value > seq_len:
            return (f"{name}={value} exceeds the session's seq_len={seq_len}: set {name}<={seq_len}, or connect "
                    f"with seq_len={value}")  # fmt: skip
    prompt, completion = getattr(args, "max_prompt_length", None), getattr(args, "max_completion_length", None)
    if prompt is not None and completion is not None and prompt + completion > seq_len:
        return (f"max_prompt_length={prompt} + max_completion_length={completion} exceed the session's "
                f"seq_len={seq_len}: lower them, or connect with seq_len={prompt + completion}")  # fmt: skip
    return None
