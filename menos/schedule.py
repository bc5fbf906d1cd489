"""The recipe's arithmetic, shared by both sides of the cut: validation, the learning-rate
schedule (as transformers' ``get_{constant,linear,cosine}_schedule_with_warmup``) and the
global clip coefficient (as ``torch.nn.utils.clip_grad_norm_``). Light: no torch.
"""

from __future__ import annotations

import math

from menos.messages import Recipe, Schedule

CLIP_EPS = 1e-6  # as clip_grad_norm_: coefficient = max_norm / (total_norm + 1e-6)


def validate(recipe: Recipe) -> Recipe:
    """Raise ValueError for a recipe no optimizer could run (both sides call it)."""
    if not (recipe.lr > 0 and math.isfinite(recipe.lr)):
        raise ValueError(f"lr must be a positive number, got {recipe.lr}")
    if not recipe.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {recipe.weight_decay}")
    if not recipe.max_grad_norm >= 0:
        raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {recipe.max_grad_norm}")
    if recipe.grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {recipe.grad_accum_steps}")
    if recipe.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {recipe.warmup_steps}")
    if recipe.lr_schedule is not Schedule.CONSTANT and recipe.total_steps <= recipe.warmup_steps:
        raise ValueError(f"lr_schedule={recipe.lr_schedule.value!r} needs total_steps > warmup_steps "
                         f"(optimizer steps; got total_steps={recipe.total_steps}, warmup_steps={recipe.warmup_steps})")  # fmt: skip
    return recipe


def lr_factor(recipe: Recipe, step: int) -> float:
    """The multiplier of ``lr`` at optimizer step ``step`` (0-based), as transformers' schedules."""
    warm, total = recipe.warmup_steps, recipe.total_steps
    if step < warm:
        return step / max(1, warm)
    if recipe.lr_schedule is Schedule.CONSTANT:
        return 1.0
    if recipe.lr_schedule is Schedule.LINEAR:
        return max(0.0, (total - step) / max(1, total - warm))
    progress = (step - warm) / max(1, total - warm)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def clip_scale(max_norm: float, sq_norms) -> float:
    """The clip coefficient for the global norm sqrt(sum of the sides' squared norms)."""
    total = math.sqrt(sum(sq_norms))
    return min(1.0, max_norm / (total + CLIP_EPS))


def held_gradient_bytes(recipe: Recipe, adapter_bytes: int) -> int:
    """Gradient memory a side holds beyond its backwards: the accumulated gradients between
    micro-batches (accumulation, clipping), and with accumulation the copy a backward keeps
    to undo a failed attempt (``worker.engine.ServerEngine.backward``)."""
    copies = (1 if recipe.grad_accum_steps > 1 or recipe.max_grad_norm > 0 else 0) + (recipe.grad_accum_steps > 1)
    return copies * adapter_bytes
