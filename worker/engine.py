"""The worker's compute core: one client's server range. No I/O.

Forward: run the blocks and keep the input x_c (B, T, H). Under the on-demand policy
(the paper's Menos) the forward runs under no_grad and nothing else is kept; the
backward re-runs the forward with grad from the kept input, backpropagates the
client's gradient, takes an adapter optimizer step and drops everything. Between the
two, the server holds no activation of this client: that is what lets the manager
lend the memory to someone else.

With ``keep_graph`` (policies ``preserve`` and ``adaptive``) the forward runs with grad
and keeps its activations, so the backward skips the re-forward; ``drop_graph`` turns
such a forward back into an on-demand one (adaptive: the scheduler reclaims memory).
Both paths compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from menos import checkpoint
from menos.adapters import inject_lora, make_optimizer
from menos.messages import Hello
from menos.surgery import BlockRunner, build_section


class InputError(ValueError):
    """A request that does not fit what the client declared or the engine's state."""


@dataclass
class _Kept:
    step: int
    x: torch.Tensor  # the forward's input (B, T, H), on the device
    y: torch.Tensor | None = None  # the forward's output with its graph (keep_graph only)


class ServerEngine:
    def __init__(
        self,
        config,
        tensors: Mapping[str, torch.Tensor],
        server_layers: tuple[int, int],
        hello: Hello,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden = config.hidden_size
        self.max_batch, self.max_seq = hello.batch_size, hello.seq_len
        self.model = build_section(config, tensors, range(*server_layers), False, dtype, self.device)
        # Base tensor name (as in the checkpoint) -> frozen parameter, before LoRA renames them.
        self.base_named = dict(self.model.named_parameters())
        self.runner = BlockRunner(self.model)
        self.params = inject_lora(self.model, hello.adapter, hello.seed)
        if not self.params:
            raise ValueError(f"adapter targets {hello.adapter.target_modules} match no module in the server's blocks")
        self.optimizer = make_optimizer(self.params, hello.lr)
        self.steps = 0
        self.reject_nonfinite = False
        self._kept: _Kept | None = None

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable adapter, by full parameter name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, directory: str) -> str:
        return checkpoint.save(directory, self.steps, self.adapter_state(), self.optimizer)

    def load_checkpoint(self, directory: str, step: int) -> None:
        self.steps = checkpoint.load(directory, step, self.adapter_state(), self.optimizer)

    def base_parameters(self):
        return list(self.base_named.values())

    def check_input(self, x: torch.Tensor, what: str) -> None:
        if self.reject_nonfinite and x.is_floating_point() and not torch.isfinite(x).all():
            raise InputError(f"{what}: holds NaN or Inf")
        if x.dtype != self.dtype:
            raise InputError(f"{what}: dtype {x.dtype} but the server computes in {self.dtype}")
        if x.dim() != 3 or x.shape[2] != self.hidden:
            raise InputError(f"{what}: shape {tuple(x.shape)}, expected (batch, seq, {self.hidden})")
        if not (0 < x.shape[0] <= self.max_batch and 0 < x.shape[1] <= self.max_seq):
            raise InputError(
                f"{what}: batch {x.shape[0]} x seq {x.shape[1]} exceeds the declared "
                f"{self.max_batch} x {self.max_seq} (or is empty)"
            )

    def forward(self, step: int, x: torch.Tensor, train: bool, keep_graph: bool = False) -> torch.Tensor:
        """x_c (B, T, H) -> x_s (B, T, H); with ``train`` keep what the backward needs."""
        self.check_input(x, "activations")
        self._kept = None  # a new forward supersedes an unanswered one
        x = x.to(self.device)
        if train and keep_graph:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                y = self.runner.run(x)
            self._kept = _Kept(step, x, y)
            return y.detach().cpu()
        with torch.no_grad():
            y = self.runner.run(x)
        if train:
            self._kept = _Kept(step, x)
        y = y.cpu()
        self._release_cache()
        return y

    def check_backward(self, step: int, grad: torch.Tensor) -> None:
        if self._kept is None or self._kept.step != step:
            kept = "none" if self._kept is None else self._kept.step
            raise InputError(f"backward for step {step}, but the kept forward is for step {kept}")
        self.check_input(grad, "gradient")
        if grad.shape != self._kept.x.shape:
            raise InputError(f"gradient shape {tuple(grad.shape)} != activation shape {tuple(self._kept.x.shape)}")

    def backward(self, step: int, grad: torch.Tensor, want_input_grad: bool) -> torch.Tensor | None:
        """g_c (B, T, H) -> g_s (B, T, H) or None; updates the adapter.

        The kept input survives a failure (e.g. out of memory), so the call can be retried.
        """
        self.check_backward(step, grad)
        kept = self._kept
        grad = grad.to(self.device)
        if kept.y is not None:
            x, y = kept.x, kept.y
            kept.y = None  # the graph is consumed by this backward, whatever happens
        else:
            x = kept.x.detach().requires_grad_(want_input_grad)
            with torch.enable_grad():
                y = self.runner.run(x)  # the re-forward, now keeping activations
        y.backward(grad)
        del y
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._kept = None
        self.steps += 1
        out = x.grad.cpu() if want_input_grad and x.grad is not None else None
        del x
        self._release_cache()
        return out

    def drop_graph(self) -> None:
        """Free a kept forward's activations; its backward will recompute them."""
        if self._kept is not None:
            self._kept.y = None
            self._kept.x = self._kept.x.detach()
        self._release_cache()

    def drop_kept(self) -> None:
        self._kept = None
        self._release_cache()

    def _release_cache(self) -> None:
        if self.device.type == "cuda":
            # Give the blocks back to the driver, or other workers cannot use them.
            torch.cuda.empty_cache()
