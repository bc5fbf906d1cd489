"""The worker's compute core: one client's server range, on-demand policy. No I/O.

Forward: run the blocks under no_grad and keep only the input x_c (B, T, H).
Backward: re-run the blocks with grad from the kept input, backpropagate the
client's gradient, take an adapter optimizer step, and drop everything. Between the
two, the server holds no activation of this client: that is what lets the manager
lend the memory to someone else.
"""

from __future__ import annotations

from typing import Mapping

import torch

from menos.adapters import inject_lora, make_optimizer, persistent_bytes
from menos.messages import Hello
from menos.surgery import BlockRunner, build_section


class InputError(ValueError):
    """A request that does not fit what the client declared or the engine's state."""


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
        self.runner = BlockRunner(self.model)
        self.params = inject_lora(self.model, hello.adapter, hello.seed)
        if not self.params:
            raise ValueError(f"adapter targets {hello.adapter.target_modules} match no module in the server's blocks")
        self.optimizer = make_optimizer(self.params, hello.lr)
        self.persistent_bytes = persistent_bytes(self.params)
        self.steps = 0
        self._kept: tuple[int, torch.Tensor] | None = None  # (step, x_c) between forward and backward

    def base_parameters(self):
        return [p for n, p in self.model.named_parameters() if "lora_" not in n]

    def check_input(self, x: torch.Tensor, what: str) -> None:
        if x.dtype != self.dtype:
            raise InputError(f"{what}: dtype {x.dtype} but the server computes in {self.dtype}")
        if x.dim() != 3 or x.shape[2] != self.hidden:
            raise InputError(f"{what}: shape {tuple(x.shape)}, expected (batch, seq, {self.hidden})")
        if not (0 < x.shape[0] <= self.max_batch and 0 < x.shape[1] <= self.max_seq):
            raise InputError(
                f"{what}: batch {x.shape[0]} x seq {x.shape[1]} exceeds the declared "
                f"{self.max_batch} x {self.max_seq} (or is empty)"
            )

    def forward(self, step: int, x: torch.Tensor, train: bool) -> torch.Tensor:
        """x_c (B, T, H) -> x_s (B, T, H); with ``train`` keep x_c for the backward."""
        self.check_input(x, "activations")
        x = x.to(self.device)
        with torch.no_grad():
            y = self.runner.run(x)
        self._kept = (step, x) if train else None
        y = y.cpu()
        self._release_cache()
        return y

    def backward(self, step: int, grad: torch.Tensor, want_input_grad: bool) -> torch.Tensor | None:
        """g_c (B, T, H) -> g_s (B, T, H) or None; updates the adapter."""
        if self._kept is None or self._kept[0] != step:
            kept = "none" if self._kept is None else self._kept[0]
            raise InputError(f"backward for step {step}, but the kept forward is for step {kept}")
        self.check_input(grad, "gradient")
        x = self._kept[1]
        if grad.shape != x.shape:
            raise InputError(f"gradient shape {tuple(grad.shape)} != activation shape {tuple(x.shape)}")
        self._kept = None
        x = x.detach().requires_grad_(want_input_grad)
        with torch.enable_grad():
            y = self.runner.run(x)  # the re-forward, now keeping activations
            y.backward(grad.to(self.device))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        out = x.grad.cpu() if want_input_grad else None
        del x, y
        self._release_cache()
        return out

    def _release_cache(self) -> None:
        if self.device.type == "cuda":
            # Give the blocks back to the driver, or other workers cannot use them.
            torch.cuda.empty_cache()

    def drop_kept(self) -> None:
        self._kept = None
