"""A split model that transformers' Trainer and TRL's trainers drive as a PEFT causal LM.

``client.hf_model()`` returns ``SplitCausalLM``: ``forward(input_ids, attention_mask,
labels, ...)`` returns a ``CausalLMOutputWithPast``; its backward goes through the split
(the server's blocks are one autograd node whose forward and backward are round trips).

Whose optimizer steps the server's adapter? The trainer's. Each server adapter parameter
has a MIRROR here (``menos.driven``), an ordinary ``nn.Parameter`` among the model's
parameters, so that:

- the trainer's optimizer (any: AdamW, Adafactor, its param groups and weight decay
  rule), its scheduler, ``max_grad_norm`` (``clip_grad_norm_`` over ``model.parameters()``
  spans both sides) and its checkpoints (optimizer state, ``resume_from_checkpoint``) see
  the whole adapter, exactly as on a local PEFT model;
- the server's backward returns its adapter gradients with the cut's gradient (at the
  last micro-batch of an accumulation, when accelerate says the gradients sync; autograd
  adds them into the mirrors' ``.grad``);
- the stepped mirrors go back to the server (``AdapterLoad``) before its next forward
  (found by comparing them with what it was last sent: any optimizer, fused ones too).

The other design, forwarding the trainer's optimizer steps to the server's own AdamW,
sends fewer bytes (no adapter tensors; the mirror design sends the adapter's gradients
and weights once per optimizer step each) but is exact only for optimizers the server
reimplements, cannot take part in the trainer's ``clip_grad_norm_`` (it only sees
``model.parameters()``), and keeps half the optimizer state outside the trainer's
checkpoints. See README "With Trainer and TRL".
"""

from __future__ import annotations

import contextlib

import torch
from peft import PeftModel
from torch import nn

from menos import trainer_args
from menos.adapters import disabled, set_dropout_step
from menos.driven import ServerAdapter, ServerBlocks, drive, server_forward
from menos.batches import check_batch, mask_tensor
from menos.export import read_peft_adapter, save_peft_adapter
from menos.surgery import final_hidden


# Arguments of a causal LM's forward that change nothing here at these values.
_NEUTRAL = {"use_cache": (None, False, True), "return_dict": (None, True), "output_attentions": (None, False),
            "output_hidden_states": (None, False), "past_key_values": (None,), "inputs_embeds": (None,),
            "token_type_ids": (None,), "cache_position": (None,), "output_router_logits": (None, False)}  # fmt: skip


def _check_neutral(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name not in _NEUTRAL or not any(value is v for v in _NEUTRAL[name]):
            raise ValueError(f"hf_model(): the forward argument {name}={value!r} is not supported through the split")


class SplitDecoder(nn.Module):
    """transformers' decoder (a causal LM's ``base_model``): token ids -> ``last_hidden_state``,
    through the client's head blocks, the server's and the client's tail blocks. TRL's
    fused LM head calls it and applies ``get_output_embeddings()`` itself."""

    def __init__(self, client, server: "ServerAdapter | None"):
        super().__init__()
        self.client = client
        if server is not None:  # the training model owns the client's sections and the mirrors
            self.sections = client.model
            self.server = server
        else:  # the frozen base (a reference model): no parameters of its own
            self.server = None
        self.adapter_enabled = server is not None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        _check_neutral(kwargs)
        c = self.client
        ids, _ = check_batch(input_ids, None, c.batch_size, c.seq_len, c.config.vocab_size)
        pads = _left_pads(attention_mask, ids.shape, position_ids, prefixed=bool(c.position_offset))
        adapter = self.adapter_enabled
        train = adapter and torch.is_grad_enabled()
        c._step += 1  # noqa: SLF001
        step = c._step  # noqa: SLF001
        set_dropout_step(c.model, step if train and self.training else None)
        with contextlib.nullcontext() if adapter else disabled(c.model):
            _, x_c = c._embed_head(ids, pads, adapter)  # noqa: SLF001  what is sent
            x_c = x_c.to(c.dtype)  # the server computes in its dtype (under autocast the head may not)
            if train:
                x_s = ServerBlocks.apply(x_c, c._driver, step, pads, *self.server.mirrors())  # noqa: SLF001
            else:
                x_s = server_forward(c, step, x_c, train=False, adapter=adapter, pads=pads)
            last = final_hidden(c.model, c.runner.run(x_s, c.tail_blocks, pads=pads))
        return BaseModelOutputWithPast(last_hidden_state=last)


def _left_pads(attention_mask, shape, position_ids, prefixed: bool = False) -> tuple[int, ...]:
    """Each row's left pads (``()`` when there are none). A row is pads, then its tokens,
    then pads: causal attention never looks ahead, so the right pads change no token and
    run as they are; left pads are masked out (GRPO's left-padded prompt + completion).
    A row's positions count from its first token, as ``generate`` counts them: OPT's
    forward counts so too; a RoPE model's counts from the first pad, which shifts every
    position of the row alike and leaves the attention as it is (equal up to rounding)."""
    if position_ids is not None:
        expected = torch.arange(shape[1], device=position_ids.device).expand(shape)
        if tuple(position_ids.shape) != tuple(shape) or not torch.equal(position_ids, expected):
            raise ValueError("hf_model(): position_ids other than 0..T-1 (packing, padding_free) are not supported "
                             "through the split")  # fmt: skip
    if attention_mask is None:
        return ()
    mask = mask_tensor(attention_mask, shape).bool()
    first = mask.int().argmax(dim=1)
    count = mask.sum(dim=1)
    idx = torch.arange(shape[1]).unsqueeze(0)
    together = (idx >= first.unsqueeze(1)) & (idx < (first + count).unsqueeze(1))
    if bool((count == 0).any()) or not torch.equal(mask, together):
        raise ValueError("hf_model(): attention_mask must keep each row's tokens together (pads before and after "
                         "them only) with at least one token")  # fmt: skip
    pads = tuple(int(p) for p in first)
    if any(pads) and prefixed:
        raise ValueError("hf_model(): left padding with prefix tuning is not supported (pad on the right)")
    return pads if any(pads) else ()


class SplitForCausalLM(nn.Module):
    """The split model as transformers' ``*ForCausalLM``: ``forward`` with labels and a loss,
    ``generate``, the config and the methods trainers call. What a PEFT model calls its base
    model (``SplitCausalLM.get_base_model()``)."""

    main_input_name = "input_ids"
    loss_type = "ForCausalLM"
    accepts_loss_kwargs = True  # num_items_in_batch: the loss over a whole accumulation, as transformers'

    def __init__(self, client, server: "ServerAdapter | None"):
        from transformers import GenerationConfig

        super().__init__()
        self.client = client
        self.config = client.config
        self.generation_config = GenerationConfig.from_model_config(client.config)
        self.model = SplitDecoder(client, server)
        self.is_gradient_checkpointing = False
        self.model_tags: list[str] = []
        self.warnings_issued: dict = {}

    @property
    def base_model(self) -> SplitDecoder:
        return self.model

    def get_output_embeddings(self) -> nn.Module:
        return self.client.model.lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.client.model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, logits_to_keep=0,
                num_items_in_batch=None, shift_labels=None, **kwargs):  # fmt: skip
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = self.model(input_ids, attention_mask, position_ids, **kwargs).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.get_output_embeddings()(hidden)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = ForCausalLMLoss(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch,
                                   shift_labels=shift_labels)  # fmt: skip
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs) -> torch.Tensor:
        """transformers' ``generate`` through the split (``menos.generation``), for what it supports."""
        return self.client.generate(input_ids, attention_mask, adapter=self.model.adapter_enabled,
                                    **_generation_kwargs(generation_config, kwargs))  # fmt: skip

    # What trainers call on a transformers model, answered for the split.

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        """Accepted: the server's blocks already recompute their activations in the backward
        (Menos's on-demand policy); the client's few blocks keep theirs."""
        self.is_gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.is_gradient_checkpointing = False

    activation_checkpointing_enable = gradient_checkpointing_enable
    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """Nothing to do: the split's graph reaches the adapters whatever its inputs."""

    def add_model_tags(self, tags) -> None:
        self.model_tags.extend([tags] if isinstance(tags, str) else tags)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Of what is here: the client's sections and the mirrors of the server's adapter (the
        server's frozen blocks are not counted)."""
        local = sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)
        if exclude_embeddings:
            local -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return local


# GenerationConfig fields -> menos.generation's arguments; the rest must change nothing.
_GENERATION_ARGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
                    "streamer")  # fmt: skip
_NO_EFFECT = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "return_dict_in_generate": False,
              "output_scores": False, "output_logits": False, "num_beam_groups": 1}  # fmt: skip
_IGNORED = ("transformers_version", "_from_model_config", "bos_token_id", "cache_implementation", "disable_compile",
            "use_cache", "compile_config")  # fmt: skip


def _generation_kwargs(generation_config, kwargs: dict) -> dict:
    """``generate``'s arguments (a GenerationConfig and keywords, as transformers takes
    them) as ``Client.generate``'s; a setting it cannot honour is refused by name."""
    settings = {} if generation_config is None else generation_config.to_diff_dict()
    settings.update(kwargs)
    out = {k: settings.pop(k) for k in _GENERATION_ARGS if settings.get(k) is not None}
    if out.get("top_k") == 0:  # transformers: 0 turns top-k off
        del out["top_k"]
    for name, value in settings.items():
        if value is None or name in _IGNORED or (name in _NO_EFFECT and value == _NO_EFFECT[name]):
            continue
        raise ValueError(f"hf_model().generate: {name}={value!r} is not supported through the split")
    return out


class _Adapters(nn.Module):
    """What a PeftModel calls its ``base_model`` (PEFT's tuner): the adapters' configs, and the
    model they are in; other attributes are the model's."""

    def __init__(self, model: SplitForCausalLM, config):
        super().__init__()
        self.model = model
        self.peft_config = {"default": config}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class SplitCausalLM(PeftModel):
    """``client.hf_model()``: the split model as a PEFT causal LM, for transformers' Trainer and
    TRL's trainers (their PEFT paths: ``save_pretrained`` writes the whole model's adapter,
    ``load_adapter`` resumes from it, ``disable_adapter`` is the frozen base).

    PeftModel's own constructor wraps a local base model; this one wraps the session."""

    def __init__(self, client):
        from menos.adapters import peft_config

        nn.Module.__init__(self)  # not PeftModel.__init__: there is no local base model to wrap
        config = peft_config(client.adapter, client.config, client.model_path)
        self.base_model = _Adapters(SplitForCausalLM(client, drive(client).adapter), config)
        self.client = client
        self.active_adapter = "default"
        self.peft_type = config.peft_type
        self.special_peft_forward_args = set()
        self._is_prompt_learning = False
        self._adapters_disabled = False
        self._checked_trainer: int | None = None
        # The adapter as initialised (the identity), while it stays so: TRL's reference copy.
        self._initial = None if client.cfg.init_adapter else [p.detach().clone() for p in self._trainable()]

    def get_base_model(self) -> SplitForCausalLM:
        return self.base_model.model

    def forward(self, *args, **kwargs):
        self.client._driver.under_trainer = self._check_trainer()  # noqa: SLF001
        return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self._check_trainer()
        return self.get_base_model().generate(*args, **kwargs)

    def _check_trainer(self) -> bool:
        """The calling trainer's settings, once per trainer, before its first step runs;
        whether a trainer calls."""
        trainer = trainer_args.calling_trainer()
        if trainer is None or id(trainer) == self._checked_trainer:
            return trainer is not None
        c = self.client
        names = [cls.__name__ for cls in type(trainer).__mro__]
        kind = next((n for n in ("DPOTrainer", "GRPOTrainer", "SFTTrainer") if n in names), "Trainer")
        evaluates = getattr(trainer, "eval_dataset", None) is not None
        problem = trainer_args.problem(trainer.args, c.batch_size, c.seq_len, kind, evaluates)
        if problem:
            raise ValueError(f"{type(trainer).__name__} over hf_model(): {problem}")
        self._checked_trainer = id(trainer)
        return True

    # -------------------------------------------------------------- adapters

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As nn.Module's, and the server forgets the adapter gradients it holds (an
        accumulation given up half-way must not join the next step)."""
        super().zero_grad(set_to_none)
        self.client._driver.fresh = True  # noqa: SLF001

    def merge_adapter(self, *args, **kwargs):
        raise ValueError("hf_model(): the base is shared by every client of the server and is never merged "
                         "into; save_pretrained, then PeftModel.from_pretrained(full_base, dir)"
                         ".merge_and_unload()")  # fmt: skip

    merge_and_unload = unmerge_adapter = delete_adapter = merge_adapter

    def _set_enabled(self, enabled: bool) -> None:
        self._adapters_disabled = not enabled
        self.get_base_model().model.adapter_enabled = enabled

    @contextlib.contextmanager
    def disable_adapter(self):
        """The frozen base on both sides of the cut (a reference model, for free)."""
        was = self._adapters_disabled
        self._set_enabled(False)
        try:
            yield
        finally:
            self._set_enabled(not was)

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False) -> None:
        """Only TRL's frozen reference copy ("ref", made when no ref_model is given) of an
        adapter that has not trained yet: that copy is the base itself."""
        if adapter_name != "ref" or not self._untrained():
            raise ValueError(f"hf_model(): a second adapter ({adapter_name!r}) is not supported through the split. "
                             "For DPO/GRPO's reference pass ref_model=client.hf_model(adapter=False) (the frozen "
                             "base; GRPO: beta=0.0)")  # fmt: skip
        self.base_model.peft_config[adapter_name] = peft_config

    def get_parameter(self, target: str) -> nn.Parameter:
        if ".ref." in target and "ref" in self.base_model.peft_config:
            # TRL copies the adapter into the reference's parameters: the reference is the
            # base (add_adapter), so the copy goes to a scratch tensor.
            return nn.Parameter(torch.empty_like(super().get_parameter(target.replace(".ref.", ".default."))))
        return super().get_parameter(target)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        if adapter_name not in self.base_model.peft_config:
            raise ValueError(f"hf_model(): no adapter {adapter_name!r} (have {list(self.base_model.peft_config)})")
        self.active_adapter = adapter_name
        self._set_enabled(adapter_name == "default")

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _untrained(self) -> bool:
        """The adapter as it was initialised (LoRA's B = 0, IA3's ones: the identity), not a prefix."""
        from menos.messages import PrefixSpec

        return (self._initial is not None and not isinstance(self.client.adapter, PrefixSpec)
                and all(torch.equal(p, q) for p, q in zip(self._trainable(), self._initial)))  # fmt: skip

    # -------------------------------------------------------------- files

    def _state(self) -> dict[str, torch.Tensor]:
        """The whole model's adapter by the name its part has on its side (menos.export)."""
        inner = self.get_base_model().model
        return {**self.client._adapter_state(), **dict(zip(inner.server.names, inner.server.mirrors()))}  # noqa: SLF001

    def save_pretrained(self, save_directory: str, state_dict=None, is_main_process: bool = True, **kwargs) -> None:
        """The whole model's adapter as ONE PEFT adapter (as ``Client.save_adapter``, from the
        mirrors here: no round trip)."""
        if is_main_process:
            c = self.client
            save_peft_adapter(save_directory, c.adapter, self._state(), c.config, c.dtype, c.model_path)

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
        """A trainer's checkpoint (``resume_from_checkpoint``): its adapter into both sides
        (the server's part goes with the next request)."""
        if adapter_name != "default":
            raise ValueError(f"hf_model(): loads its own adapter only ('default'), not {adapter_name!r}")
        c = self.client
        state = read_peft_adapter(model_id, c.adapter, c.config, c.dtype)
        mine = self._state()
        with torch.no_grad():
            for name, p in mine.items():
                p.copy_(state[name])
