"""The training recipe of one side of the cut, run in lockstep with the other side.

Both sides hold their own adapter parameters and their own AdamW; together they must
take exactly the step one optimizer over the whole model's adapter would take:

- AdamW (with decoupled weight decay) is elementwise: two optimizers over two halves
  of the parameters step exactly as one over all of them.
- The learning rate of optimizer step i is ``lr * lr_factor(recipe, i)`` (transformers'
  ``get_{linear,cosine}_schedule_with_warmup`` and the constant one with warm-up); the
  factor depends only on i, so each side sets it from its own step count and a resume
  restores the schedule with the count.
- Gradient accumulation: k micro-batches per optimizer step, each micro-batch's loss
  divided by k (the client does that; the server's gradient arrives scaled). A side
  keeps only its accumulated adapter gradients between micro-batches.
- Clipping by the global norm, as ``torch.nn.utils.clip_grad_norm_`` on the full model:
  each side reports the squared norm of its gradients, the client computes the one
  coefficient from the sum (``clip_scale``), and both sides scale by it before stepping.

``steps`` counts micro-batches (a training step of ``Client.train_step``); the optimizer
step count is ``steps // grad_accum_steps``.

A driven side (``drive``) never steps: another optimizer (the client's, ``menos.hf_model``)
takes its gradients and sets its weights; it only accumulates and counts micro-batches.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from menos.messages import Recipe
from menos.schedule import lr_factor, validate

class SideOptimizer:
    """One side's AdamW, learning-rate schedule and accumulation position."""

    def __init__(self, params: list[torch.nn.Parameter], recipe: Recipe):
        self.params = params
        self.recipe = validate(recipe)
        self.optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay) if params else None
        self.steps = 0  # micro-batches trained
        self._scaled_at: int | None = None  # the step whose gradients are already clipped
        self.driven = False

    def drive(self) -> None:
        """Hand the stepping to another optimizer: from now on gradients accumulate until taken."""
        if self.driven:
            return
        if self.mid_step:
            raise ValueError(f"an optimizer step is half accumulated ({self.steps % self.recipe.grad_accum_steps} "
                             f"of {self.recipe.grad_accum_steps} micro-batches): finish it first")  # fmt: skip
        self.driven = True

    def take_grads(self) -> list[torch.Tensor]:
        """A driven side's accumulated gradients (zeros where none), which it then forgets."""
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    @property
    def clipping(self) -> bool:
        return self.recipe.max_grad_norm > 0

    def ends_step(self) -> bool:
        """Whether the micro-batch now being trained is the last of an optimizer step."""
        return not self.driven and (self.steps + 1) % self.recipe.grad_accum_steps == 0

    @property
    def mid_step(self) -> bool:
        """Gradients of an unfinished optimizer step are accumulated (a checkpoint keeps them)."""
        return self.driven or self.steps % self.recipe.grad_accum_steps != 0

    def grad_sq_norm(self) -> float:
        """Squared L2 norm of this side's gradients (per tensor, as clip_grad_norm_)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return float(sum(torch.linalg.vector_norm(g.detach().double()) ** 2 for g in grads))

    def accumulate(self) -> None:
        """A micro-batch that does not end its optimizer step: keep its gradients."""
        self.steps += 1

    def step(self, scale: float = 1.0) -> None:
        """End the optimizer step: scale the gradients (clipping), step at the scheduled lr.
        Retried after a failure (out of memory), it does not scale them twice."""
        if self.optimizer is not None:
            if scale != 1.0 and self._scaled_at != self.steps:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
                self._scaled_at = self.steps
            lr = self.recipe.lr * lr_factor(self.recipe, self.steps // self.recipe.grad_accum_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    @contextmanager
    def undone_on_failure(self):
        """A backward inside this block that raises (out of memory half-way, a failed round
        trip) leaves the accumulated gradients as they were, so the micro-batch can be run
        again and counts once."""
        before = [None if p.grad is None else p.grad.clone() for p in self.params] if self.mid_step else None
        try:
            yield
        except BaseException:
            for p, g in zip(self.params, before or [None] * len(self.params)):
                p.grad = g
            raise

    def grads(self, names: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """Accumulated gradients by parameter name, for a checkpoint taken mid-step."""
        return {n: p.grad for n, p in names.items() if p.grad is not None} if self.mid_step else {}

