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

The optimizer side (``menos.recipe``): a backward that does not end an optimizer step
only accumulates the adapter's gradients; one that ends it steps, unless the client
clips by the global norm: then it reports its gradients' squared norm
(``pending_sq_norm``) and ``apply_step`` takes the step with the client's coefficient.
A driven session (``drive``: the client's own optimizer steps this adapter, ``menos.hf_model``)
only accumulates; the client takes the gradients and sends the stepped weights back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch

from menos import checkpoint
from menos.adapter_spec import adapter_spec, position_offset
from menos.adapters import disabled, inject, set_dropout_step
from menos.estimator import kv_cache_bytes
from menos.kv_cache import KVCache
from menos.messages import Forward, Hello, PrefixSpec
from menos.prefix import kv_shape
from menos.recipe import SideOptimizer
from menos.schedule import held_gradient_bytes
from menos.quantization import quantized_kernels
from menos.surgery import BlockRunner, build_section


MAX_POSITIONS = 1 << 24  # a generation's length: far beyond any model's, and its token's bytes fit an int64


class InputError(ValueError):
    """A request that does not fit what the client declared or the engine's state."""


@dataclass
class _Kept:
    step: int
    x: torch.Tensor  # the forward's input (B, T, H), on the device
    y: torch.Tensor | None = None  # the forward's output with its graph (keep_graph only)
    pads: tuple[int, ...] = ()  # each row's left pads (a prompt + completion batch)


@dataclass
class _Generation:
    cache: KVCache  # the server blocks' keys and values, for the generation's whole length
    pads: tuple[int, ...]  # each row's left pads
    adapter: bool


class ServerEngine:
    def __init__(
        self,
        config,
        tensors: Mapping[str, torch.Tensor],
        server_layers: tuple[int, int],
        hello: Hello,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        quantization: str = "none",
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = config
        self.blocks = tuple(range(*server_layers))
        self.hidden = config.hidden_size
        self.max_batch, self.max_seq = hello.batch_size, hello.seq_len
        self.model = build_section(config, tensors, range(*server_layers), False, dtype, self.device, quantization)
        self.kernels = quantized_kernels(self.model, quantization)  # int8 layers compute otherwise in training than in eval
        # Base tensor name (as in the checkpoint) -> frozen parameter, before LoRA renames them.
        self.base_named = dict(self.model.named_parameters())
        spec = self.spec = adapter_spec(hello.adapter)
        self.layout = checkpoint.layout(hello.head_layers, hello.tail_layers, spec)  # recorded in each checkpoint
        self.runner = BlockRunner(self.model, position_offset(spec))
        self.params = inject(self.model, spec, hello.seed)
        if not self.params:
            raise ValueError(f"adapter {spec} adds nothing to the server's blocks (targets match no module there)")
        self.opt = SideOptimizer(self.params, hello.recipe)
        self.reject_nonfinite = False
        self._kept: _Kept | None = None
        self.pending_sq_norm: float | None = None  # clipping: the step waits for apply_step
        self.generation: _Generation | None = None

    @property
    def steps(self) -> int:
        """Micro-batches trained (with accumulation, optimizer steps x grad_accum_steps)."""
        return self.opt.steps

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.opt.optimizer

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable adapter, by full parameter name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, directory: str) -> str | None:
        """Checkpoint the adapter, optimizer, step count and any accumulated gradients; not
        while a clipped step waits for its coefficient (those gradients already hold the
        micro-batch the step count does not: the previous checkpoint stays the latest). A
        driven session keeps nothing here: its optimizer and weights are the client's."""
        if self.pending_sq_norm is not None or self.opt.driven:
            return None
        state = self.adapter_state()
        return checkpoint.save(directory, self.steps, state, self.optimizer, self.opt.grads(state), self.layout)

    def load_checkpoint(self, directory: str, step: int) -> None:
        """Resume from checkpoint ``step``; checkpoint.Mismatch (nothing loaded) when it was
        saved with another cut or adapter than this session asks."""
        self.opt.steps = checkpoint.load(directory, step, self.adapter_state(), self.optimizer, self.layout,
                                         f"the server's checkpoint of step {step}")  # fmt: skip

    def park_reason(self) -> str:
        """Why this session cannot park now ("" if it can): what a park file does not hold."""
        if self.pending_sq_norm is not None:
            return "a clipped optimizer step waits for its coefficient"
        if self.generation is not None:
            return "a generation is open"
        if self._kept is not None:
            return "a training forward is kept for its backward"
        return ""

    def save_park(self, directory: str) -> None:
        """The session's whole trained state (a driven one's too): adapter, optimizer, step
        count and accumulated gradients, as a checkpoint file of its own (``load_park``)."""
        state = self.adapter_state()
        checkpoint.save(directory, self.steps, state, self.optimizer, self.opt.grads(state), self.layout)

    def load_park(self, directory: str, step: int, driven: bool) -> None:
        if driven:
            self.opt.drive()  # first: a driven side's gradients are always an unfinished step's
        self.load_checkpoint(directory, step)

    def drive(self) -> None:
        """The client's optimizer steps this adapter from now on (see ``load_adapter``,
        ``take_adapter_grads``)."""
        self._check_no_pending()
        try:
            self.opt.drive()
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def take_adapter_grads(self) -> list[torch.Tensor]:
        """A driven session's gradients since the last call, in ``adapter_state``'s order."""
        return [g.cpu() for g in self.opt.take_grads()]

    def load_adapter(self, state: dict[str, torch.Tensor]) -> int:
        """Start from a trained adapter, before any training (a driven session: at any step,
        the client's optimizer's new weights): exactly this side's tensors."""
        if self.steps and not self.opt.driven:
            raise InputError(f"an adapter is loaded before training only ({self.steps} steps done)")
        mine = self.adapter_state()
        if set(state) != set(mine):
            raise InputError(f"tensors missing {sorted(set(mine) - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - set(mine))[:3]}")  # fmt: skip
        # Any float dtype: the client reads the file in its own dtype, and PEFT keeps an adapter on
        # int8 layers in float32 whatever the compute dtype (copy_ casts).
        for name, t in state.items():
            if t.shape != mine[name].shape or not t.is_floating_point():
                raise InputError(f"{name}: {t.dtype} {tuple(t.shape)}, expected a float tensor of shape "
                                 f"{tuple(mine[name].shape)}")  # fmt: skip
            if not torch.isfinite(t).all():
                raise InputError(f"{name}: holds NaN or Inf (has the training diverged?)")
        with torch.no_grad():
            for name, t in state.items():
                mine[name].copy_(t)
        self._kept = None  # a forward kept for a backward ran with the weights these replace
        return len(state)

    def standing_extra_bytes(self) -> int:
        """What the session holds between requests besides A + O: the kept input x_c, and
        the adapter's gradients when they outlive a backward (accumulation, clipping)."""
        kept_input = self.max_batch * self.max_seq * self.hidden * self.dtype.itemsize
        return kept_input + held_gradient_bytes(self.opt.recipe, sum(p.numel() * p.element_size() for p in self.params))

    def base_parameters(self):
        return list(self.base_named.values())

    def check_shape(self, shape, what: str) -> None:
        """A (batch, seq, hidden) shape within what the client declared (before any decoding)."""
        if len(shape) != 3 or shape[2] != self.hidden:
            raise InputError(f"{what}: shape {tuple(shape)}, expected (batch, seq, {self.hidden})")
        if not (0 < shape[0] <= self.max_batch and 0 < shape[1] <= self.max_seq):
            raise InputError(
                f"{what}: batch {shape[0]} x seq {shape[1]} exceeds the declared "
                f"{self.max_batch} x {self.max_seq} (or is empty)"
            )

    def check_input(self, x: torch.Tensor, what: str) -> None:
        if self.reject_nonfinite and x.is_floating_point() and not torch.isfinite(x).all():
            raise InputError(f"{what}: holds NaN or Inf")
        if x.dtype != self.dtype:
            raise InputError(f"{what}: dtype {x.dtype} but the server computes in {self.dtype}")
        self.check_shape(x.shape, what)

    def forward(self, step: int, x: torch.Tensor, train: bool, keep_graph: bool = False, adapter: bool = True,
                pads: tuple[int, ...] = ()) -> torch.Tensor:  # fmt: skip
        """x_c (B, T, H) -> x_s (B, T, H); with ``train`` keep what the backward needs; without
        ``adapter`` (evaluation only) through the frozen base alone; ``pads``: each row's left
        pads, never attended to."""
        self.check_input(x, "activations")
        self._check_no_pending()
        if train:
            self._kept = None  # a new training forward supersedes an unanswered one (an evaluation does not:
            # DPO scores its reference between the policy's forward and backward)
        x = x.to(self.device)
        # LoRA dropout: the micro-batch's masks, drawn again by the re-forward at its backward.
        set_dropout_step(self.model, self.steps if train else None)
        self.kernels.train(train)
        if train and keep_graph:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                y = self.runner.run(x, pads=pads)
            self._kept = _Kept(step, x, y, pads)
            return y.detach().cpu()
        with torch.no_grad(), (contextlib.nullcontext() if adapter else disabled(self.model)):
            y = self.runner.run(x, pads=pads)
        if train:
            self._kept = _Kept(step, x, pads=pads)
        y = y.cpu()
        self._release_cache()
        return y

    # ---------------------------------------------------------------- generation (menos.generation)

    def generation_bytes(self, batch: int, length: int) -> int:
        """The key/value cache of a generation of ``length`` positions in all."""
        return kv_cache_bytes(self.config, len(self.blocks), batch, length, self.dtype.itemsize)

    def check_generation(self, msg: Forward, shape) -> None:
        """A generation's forward (``msg.generate`` or ``msg.cached``) that fits the session's
        state, before any memory is asked for."""
        if msg.train:
            raise InputError("a generation's forward is an evaluation (train=False)")
        b, t = shape[0], shape[1]
        if msg.generate:
            if isinstance(self.spec, PrefixSpec):
                raise InputError("generation with prefix tuning is not supported")
            if len(msg.pads) != b or any(not 0 <= p < t for p in msg.pads):
                raise InputError(f"pads {msg.pads}: one per row, each below the prompt's length {t}")
            if not t <= msg.generate <= MAX_POSITIONS:
                raise InputError(f"a generation of {msg.generate} positions: it must hold the prompt ({t}) "
                                 f"and be at most {MAX_POSITIONS}")  # fmt: skip
            return
        gen = self.generation
        if gen is None:
            raise InputError("no generation is open (its prompt opens it)")
        filled = gen.cache.get_seq_length(self.blocks[0])
        if b != len(gen.pads) or filled + t > gen.cache.length or msg.adapter != gen.adapter:
            raise InputError(f"the open generation is {len(gen.pads)} rows of {gen.cache.length} positions "
                             f"({filled} filled, adapter={gen.adapter}): batch {b} x {t} more (adapter="
                             f"{msg.adapter}) does not continue it")  # fmt: skip

    def generate(self, x: torch.Tensor, msg: Forward) -> torch.Tensor:
        """A generation's step: the prompt (``msg.generate``: opens the cache) or the next
        positions (``msg.cached``), through the server's blocks into the cache."""
        self.check_input(x, "activations")
        self.check_generation(msg, x.shape)
        if msg.generate:
            self._kept = None  # a new forward supersedes an unanswered one
            kv_heads, head_dim = kv_shape(self.config)
            cache = KVCache(self.blocks, x.shape[0], msg.generate, kv_heads, head_dim, self.dtype, self.device)
            self.generation = _Generation(cache, tuple(msg.pads), msg.adapter)
        gen = self.generation
        set_dropout_step(self.model, None)
        self.kernels.train(False)
        with torch.no_grad(), (contextlib.nullcontext() if gen.adapter else disabled(self.model)):
            y = self.runner.run(x.to(self.device), cache=gen.cache, pads=gen.pads)
        return y.cpu()

    def end_generation(self) -> None:
        self.generation = None
        self._release_cache()

    def _check_no_pending(self) -> None:
        if self.pending_sq_norm is not None:
            raise InputError("the optimizer step waits for apply_step (the clip coefficient) first")

    def check_backward(self, step: int, grad: torch.Tensor) -> None:
        if self._kept is None or self._kept.step != step:
            kept = "none" if self._kept is None else self._kept.step
            raise InputError(f"backward for step {step}, but the kept forward is for step {kept}")
        self.check_input(grad, "gradient")
        if grad.shape != self._kept.x.shape:
            raise InputError(f"gradient shape {tuple(grad.shape)} != activation shape {tuple(self._kept.x.shape)}")

    def backward(self, step: int, grad: torch.Tensor, want_input_grad: bool, fresh: bool = False) -> torch.Tensor | None:
        """g_c (B, T, H) -> g_s (B, T, H) or None; accumulates the adapter's gradients and,
        at the end of an optimizer step, steps (clipping: sets ``pending_sq_norm`` instead).
        ``fresh`` (a driven session whose client zeroed its gradients): gradients held from
        before are forgotten first (an accumulation given up half-way).

        The kept input survives a failure (e.g. out of memory), so the call can be retried.
        """
        self.check_backward(step, grad)
        if fresh and self.opt.driven:
            self.opt.take_grads()
        kept = self._kept
        grad = grad.to(self.device)
        # A backward that fails half-way (out of memory) has added part of its gradients:
        # they are put back, so that its retry adds them once.
        with self.opt.undone_on_failure():
            if kept.y is not None:
                x, y = kept.x, kept.y
                kept.y = None  # the graph is consumed by this backward, whatever happens
            else:
                x = kept.x.detach().requires_grad_(want_input_grad)
                set_dropout_step(self.model, self.steps)
                self.kernels.train(True)
                with torch.enable_grad():
                    y = self.runner.run(x, pads=kept.pads)  # the re-forward, now keeping activations
            y.backward(grad)
            del y
            if not self.opt.ends_step():
                self.opt.accumulate()
            elif self.opt.clipping:
                self.pending_sq_norm = self.opt.grad_sq_norm()
            else:
                self.opt.step()
        self._kept = None
        out = x.grad.cpu() if want_input_grad and x.grad is not None else None
        del x
        self._release_cache()
        return out

    def check_step(self, step: int, scale: float) -> None:
        if self.pending_sq_norm is None:
            raise InputError(f"apply_step for step {step}, but no optimizer step waits for one")
        if not (0.0 < scale <= 1.0):
            raise InputError(f"apply_step: the clip coefficient must be in (0, 1], got {scale}")

    def apply_step(self, step: int, scale: float) -> None:
        """The clipped optimizer step: gradients times ``scale``, then AdamW."""
        self.check_step(step, scale)
        self.opt.step(scale)
        self.pending_sq_norm = None
        self._release_cache()

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
