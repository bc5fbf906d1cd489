"""transformers' Trainer and TRL's SFT, DPO and GRPO trainers over client.hf_model(), against
the same trainer over the whole model loaded locally with the same initial adapter."""

import os
import re
import warnings

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

import menos
from menos.data import char_tokenizer
from menos.messages import IA3Spec, LoraSpec
from menos.models import load_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40)]
PAIRS = {"prompt": [f"q{i}: " for i in range(40)], "chosen": [f"yes {i}" for i in range(40)],
         "rejected": [f"no, not {i}" for i in range(40)]}  # fmt: skip
LORA = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _args(kind: str, out, **kw):
    """The recipe of the parity runs: cosine with warm-up, clipping at 0.5, accumulation 2,
    weight decay, 10 optimizer steps."""
    from transformers import TrainingArguments
    from trl import DPOConfig, GRPOConfig, SFTConfig

    config = {"sft": SFTConfig, "trainer": TrainingArguments, "dpo": DPOConfig, "grpo": GRPOConfig}[kind]
    common = dict(output_dir=str(out), max_steps=10, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1, max_grad_norm=0.5,
                  logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0, save_strategy="no",
                  disable_tqdm=True)  # fmt: skip
    if kind in ("sft", "dpo"):
        common["max_length"] = 32
    common.update(kw)
    return config(**common)


def _trainer(kind: str, model, out, vocab: int, ref_model=None, **kw):
    from transformers import DataCollatorForLanguageModeling, Trainer
    from trl import DPOTrainer, SFTTrainer

    tok = char_tokenizer(vocab)
    args = _args(kind, out, **kw)
    if kind == "sft":
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tok)
    if kind == "trainer":
        ds = Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"]), remove_columns=["text"])
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        return Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_dict(PAIRS),
                      processing_class=tok)  # fmt: skip


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _local(path, adapter_dir):
    _, full = load_base(path, torch.float32)
    return PeftModel.from_pretrained(full, adapter_dir, is_trainable=True)


@pytest.mark.parametrize("kind, name, adapter", [
    ("sft", "llama", LORA), ("sft", "opt", IA3Spec()), ("trainer", "llama", LORA), ("dpo", "llama", LORA),
])  # fmt: skip
def test_a_trainer_over_the_split_takes_the_local_models_steps(kind, name, adapter, checkpoints, shared_manager, tmp_path):
    path = checkpoints(name)
    batch = 4 if kind == "dpo" else 2  # DPO puts chosen and rejected rows in one batch
    with menos.connect(shared_manager(name).endpoint, model=path, batch_size=batch, seq_len=32, head_layers=1,
                       tail_layers=1, adapter=adapter, identity=f"trainers-{kind}-{name}") as c:  # fmt: skip
        init = c.save_adapter(str(tmp_path / "init"))
        split = _trainer(kind, c.hf_model(), tmp_path / "split", 128)
        split.train()
        local = _trainer(kind, _local(path, init), tmp_path / "local", 128)
        local.train()
        assert len(_losses(split)) == 10
        assert _losses(split) == pytest.approx(_losses(local), abs=1e-5)
        assert _losses(split)[-1] < _losses(split)[0]  # it learned
        assert c.hf_model().num_parameters(only_trainable=True) == sum(
            p.numel() for p in local.model.parameters() if p.requires_grad)  # the server's part is there too


def test_dpo_with_the_frozen_base_as_ref_model_equals_trls_own_reference(checkpoints, shared_manager, tmp_path):
    """ref_model=client.hf_model(adapter=False) (no parameters: the shared base) takes the
    same steps as TRL's copy of the untrained adapter (ref_model=None)."""
    path = checkpoints("llama")
    runs = []
    for explicit in (True, False):
        with menos.connect(shared_manager("llama").endpoint, model=path, batch_size=4, seq_len=32, head_layers=1,
                           tail_layers=1, adapter=LORA, identity=f"trainers-dpo-ref-{explicit}") as c:  # fmt: skip
            ref = c.hf_model(adapter=False) if explicit else None
            if explicit:
                assert not list(ref.parameters())
            trainer = _trainer("dpo", c.hf_model(), tmp_path / str(explicit), 128, ref_model=ref, max_steps=4)
            trainer.train()
            runs.append(_losses(trainer))
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)


def test_save_model_writes_an_adapter_that_gives_the_splits_eval_loss(checkpoints, shared_manager, tmp_path):
    path = checkpoints("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    with menos.connect(shared_manager("llama").endpoint, model=path, batch_size=2, seq_len=32, head_layers=1,
                       tail_layers=1, adapter=LORA, identity="trainers-save") as c:  # fmt: skip
        trainer = _trainer("sft", c.hf_model(), tmp_path / "run", 128, max_steps=4)
        trainer.train()
        trainer.save_model(str(tmp_path / "final"))
        with torch.no_grad():
            split_loss = c.hf_model()(input_ids=ids, labels=ids).loss.item()
        assert c.eval_step(ids) == pytest.approx(split_loss, abs=1e-6)  # the server has the trainer's last step
    _, full = load_base(path, torch.float32)
    with torch.no_grad():
        base_loss = full(ids, labels=ids).loss.item()  # before PEFT injects the adapter into it
        peft_loss = PeftModel.from_pretrained(full, str(tmp_path / "final")).eval()(ids, labels=ids).loss.item()
    assert peft_loss == pytest.approx(split_loss, abs=1e-5)
    assert abs(peft_loss - base_loss) > 1e-4  # trained


def test_resume_from_the_trainers_checkpoint_continues_exactly(checkpoints, shared_manager, tmp_path):
    """A trainer's checkpoint holds the whole adapter and the optimizer of both sides: a new
    session resumes from it with the losses of an uninterrupted run."""
    path = checkpoints("llama")
    endpoint = shared_manager("llama").endpoint
    kw = dict(model=path, batch_size=2, seq_len=32, head_layers=1, tail_layers=1, adapter=LORA)
    with menos.connect(endpoint, identity="trainers-resume-a", **kw) as c:
        whole = _trainer("sft", c.hf_model(), tmp_path / "a", 128, max_steps=6, save_strategy="steps", save_steps=3)
        whole.train()
    with menos.connect(endpoint, identity="trainers-resume-b", **kw) as c:  # a fresh adapter: the checkpoint's replaces it
        resumed = _trainer("sft", c.hf_model(), tmp_path / "b", 128, max_steps=6)
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    new = _losses(resumed)[3:]  # the log before the checkpoint comes back with it
    assert len(new) == 3
    assert new == pytest.approx(_losses(whole)[3:], abs=1e-6)


def test_grpo_samples_through_the_split_and_logs_rewards(checkpoints, shared_manager, tmp_path):
    """GRPO (use_vllm=False): generate on the split model, rewards on the client, the
    reference (beta > 0) is the frozen base."""
    from trl import GRPOConfig, GRPOTrainer

    def lowercase(completions, **kwargs):
        return [float(sum(ch.islower() for ch in text)) for text in completions]

    prompts = Dataset.from_dict({"prompt": [f"q{i}: " + "x" * (i % 5) for i in range(16)]})
    with menos.connect(shared_manager("llama").endpoint, model=checkpoints("llama"), batch_size=4, seq_len=32,
                       adapter=LORA, identity="trainers-grpo") as c:  # fmt: skip
        args = GRPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, logging_steps=1, report_to=[], use_cpu=True, bf16=False, beta=0.1,
                          learning_rate=1e-2, save_strategy="no", disable_tqdm=True)  # fmt: skip
        trainer = GRPOTrainer(model=c.hf_model(), args=args, train_dataset=prompts, processing_class=char_tokenizer(128),
                              reward_funcs=lowercase)  # fmt: skip
        trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logged) == 3 and all("kl" in h for h in logged)
    assert logged[0]["kl"] == 0.0  # before its first step the policy is the base: its reference
    assert any(h["reward"] > 0 for h in logged)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_left_padded_rows_score_as_on_the_local_model(name, checkpoints, shared_manager, tmp_path):
    """GRPO's rows: a left-padded prompt, then a right-padded completion."""
    path = checkpoints(name)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 128, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    mask[1, -2:] = 0
    mask[2, -4:] = 0
    with menos.connect(shared_manager(name).endpoint, model=path, batch_size=3, seq_len=12, adapter=LORA,
                       identity=f"trainers-pads-{name}") as c:  # fmt: skip
        init = c.save_adapter(str(tmp_path / "init"))
        with torch.no_grad():
            split = c.hf_model()(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        local = _local(path, init).eval()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(split[real], local[real], atol=1e-4)


def test_what_a_split_session_cannot_do_is_named(checkpoints, shared_manager, start_manager, tmp_path):
    endpoint = shared_manager("llama").endpoint
    with menos.connect(endpoint, batch_size=2, seq_len=16, adapter=LORA, identity="trainers-refusals") as c:
        c.train_step(torch.randint(0, 128, (2, 16)))
        with pytest.raises(menos.MenosError, match="trained 1 steps with its own optimizer"):
            c.hf_model()
    with menos.connect(endpoint, batch_size=2, seq_len=16, adapter=LORA, identity="trainers-refusals-2") as c:
        model = c.hf_model()
        with pytest.raises(menos.MenosError, match="stepped by the optimizer of its hf_model"):
            c.train_step(torch.randint(0, 128, (2, 16)))
        with pytest.raises(ValueError, match="a second adapter"):
            model.add_adapter("other", model.peft_config["default"])
        with pytest.raises(ValueError, match="num_beams=2"):
            model.generate(torch.randint(0, 128, (1, 4)), num_beams=2)
        with pytest.raises(ValueError, match="position_ids"):
            model(input_ids=torch.randint(0, 128, (2, 8)), position_ids=torch.zeros(2, 8, dtype=torch.long))
        with pytest.raises(ValueError, match="max_length=64 exceeds the session's seq_len=16"):
            _trainer("sft", model, tmp_path / "long", 128, max_length=64).train()
        # the session serves on: a trainer within its sizes trains
        ok = _trainer("sft", model, tmp_path / "ok", 128, max_length=16, max_steps=2)
        ok.train()
        assert len(_losses(ok)) == 2
        with torch.no_grad():  # generate through the hf model is the client's
            prompt = torch.randint(4, 128, (1, 4))
            assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False),
                               c.generate(prompt, max_new_tokens=3))  # fmt: skip
    mgr = start_manager("--model", checkpoints("llama"), "--no-adapter-export")
    with menos.connect(mgr.endpoint, batch_size=2, seq_len=16, adapter=LORA) as c:
        with pytest.raises(menos.MenosError) as exc:
            c.hf_model()
        assert exc.value.code == menos.ErrorCode.FORBIDDEN


@pytest.mark.parametrize("settings, words", [
    (dict(torch_compile=True), "torch_compile=True"),
    (dict(deepspeed="ds.json"), "deepspeed='ds.json'"),
    (dict(fsdp=["full_shard"]), "fsdp=['full_shard']"),
    (dict(world_size=2), "2 processes (world_size)"),
    (dict(device=torch.device("cuda")), "set use_cpu=True"),
    (dict(use_vllm=True), "use_vllm=True"),
    (dict(use_liger_kernel=True), "use_liger_kernel=True"),
    (dict(packing=True), "packing=True"),
    (dict(padding_free=True), "padding_free=True"),
    (dict(per_device_train_batch_size=8), "per_device_train_batch_size=8 exceeds the session's batch_size=4"),
    (dict(per_device_train_batch_size=3, trainer="DPOTrainer"), "(x2: chosen and rejected) exceeds"),
    (dict(per_device_eval_batch_size=8, evaluates=True), "per_device_eval_batch_size=8"),
    (dict(generation_batch_size=16), "generation_batch_size=16"),
    (dict(max_length=1024), "max_length=1024 exceeds the session's seq_len=64"),
    (dict(max_prompt_length=40, max_completion_length=40), "max_prompt_length=40 + max_completion_length=40"),
])  # fmt: skip
def test_a_trainer_setting_the_split_cannot_honour_is_named(settings, words):
    from types import SimpleNamespace

    from menos.trainer_args import problem

    settings = dict(settings)
    trainer, evaluates = settings.pop("trainer", "Trainer"), settings.pop("evaluates", False)
    base = dict(per_device_train_batch_size=2, per_device_eval_batch_size=8, device=torch.device("cpu"), n_gpu=0)
    assert problem(SimpleNamespace(**base), 4, 64, trainer) is None  # eval batches count only with an eval set
    assert words in problem(SimpleNamespace(**{**base, **settings}), 4, 64, trainer, evaluates)


def test_the_reference_is_the_frozen_base_and_only_an_untrained_adapter_may_stand_for_it(shared_manager):
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    with menos.connect(shared_manager("llama").endpoint, batch_size=2, seq_len=12, adapter=LORA,
                       identity="trainers-reference") as c:  # fmt: skip
        model, frozen = c.hf_model(), c.hf_model(adapter=False)
        model.add_adapter("ref", model.peft_config["default"])  # TRL's copy of the untrained adapter: the base
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)  # as an optimizer step would, on both sides
            base = frozen(input_ids=ids).logits
            with model.disable_adapter():
                assert torch.equal(model(input_ids=ids).logits, base)
            model.set_adapter("ref")
            assert torch.equal(model(input_ids=ids).logits, base)
            model.set_adapter("default")
            assert not torch.allclose(model(input_ids=ids).logits, base)  # the server has the stepped mirrors
        with pytest.raises(ValueError, match="a second adapter"):
            model.add_adapter("ref", model.peft_config["default"])  # trained now: no longer the base
        loss = model(input_ids=ids, labels=ids).loss
        model(input_ids=ids, labels=ids)  # a second forward with gradients replaces the first on the server
        with pytest.raises(ValueError, match="backpropagate each loss before the next forward"):
            loss.backward()
        model.zero_grad()
        assert c._driver.fresh  # noqa: SLF001  the server forgets what it holds with the next backward
        with pytest.raises(menos.MenosError, match="save_state: a trainer's optimizer steps"):
            c.save_state("/nonexistent")
        with pytest.raises(ValueError, match="never merged into"):
            model.merge_and_unload()


def test_readme_trainer_examples_run_as_written(shared_manager, tmp_path, monkeypatch):
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    monkeypatch.chdir(tmp_path)
    for tag in ("trl-sft-example", "trl-dpo-example"):
        code = re.search(rf"<!-- {tag} -->\n```python\n(.*?)```", readme, re.S).group(1)
        scope: dict = {}
        exec(compile(code.replace("tcp://127.0.0.1:5555", shared_manager("llama").endpoint), "README.md", "exec"), scope)  # noqa: S102
        losses = [h["loss"] for h in scope["trainer"].state.log_history if "loss" in h]
        assert losses and losses[-1] < losses[0], tag
    assert os.path.isfile(tmp_path / "sft-out" / "final" / "adapter_config.json")
