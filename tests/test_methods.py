"""Each client's adapter method and a real trainer's recipe, across the cut, against an
independent local reference: PEFT's get_peft_model on the whole model, AdamW with the
same weight decay, transformers' own schedules, clip_grad_norm_ over all adapter
parameters and the same accumulation, on padded batches with -100 labels."""

import threading

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import menos
from menos.adapter_spec import adapter_spec
from menos.adapters import inject, peft_config
from menos.models import load_base
from menos.surgery import build_section, family_of

METHODS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], use_dora=True),
    "rslora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "ia3": IA3Config(),  # PEFT's default targets for the model type
    "prefix": PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
}
STEPS, ACCUM = 20, 2  # optimizer steps; micro-batches per step
# One schedule per architecture; max_grad_norm is below some step's global norm for every
# method (IA3's and the prefixes' gradients are small), so clipping engages for each.
RECIPES = {
    "llama": dict(lr=3e-2, weight_decay=0.1, lr_schedule="cosine", warmup_steps=3, total_steps=STEPS,
                  max_grad_norm=0.004, grad_accum_steps=ACCUM),
    "opt": dict(lr=3e-2, weight_decay=0.05, lr_schedule="linear", warmup_steps=2, total_steps=STEPS,
                max_grad_norm=0.0025, grad_accum_steps=ACCUM),
}  # fmt: skip
CUT = dict(head_layers=1, tail_layers=1, batch_size=2, seq_len=16)


def sft_batches(n: int, seed: int = 0, distinct: int = 4):
    """``n`` right-padded batches of different lengths, -100 on the padding and on a
    prompt: ``distinct`` of them, cycled (so that training visibly lowers their loss)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(distinct):
        t = int(torch.randint(8, 17, (1,), generator=gen))
        ids = torch.randint(1, 128, (2, t), generator=gen)
        labels = ids.clone()
        labels[:, :3] = -100  # the prompt: no loss
        labels[1, t - 2 :] = -100  # the second row is shorter: padded
        ids[1, t - 2 :] = 0
        out.append((ids, labels))
    return [out[i % distinct] for i in range(n)]


def reference(path: str, adapter, recipe: dict, batches, seed: int = 0):
    """Losses of every micro-batch, trained on one machine as the transformers Trainer would."""
    _, full = load_base(path, torch.float32)
    cfg = full.config
    spec = adapter_spec(adapter)
    # The split's initial adapter (seeded per parameter name), read off the whole model.
    section = build_section(cfg, full.state_dict(), range(cfg.num_hidden_layers), True, torch.float32)
    inject(section, spec, seed)
    init = {n: p.detach().clone() for n, p in section.named_parameters() if p.requires_grad}
    model = get_peft_model(full, peft_config(spec, cfg))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        if isinstance(adapter, PrefixTuningConfig):  # PEFT's one embedding: (N, layers x 2 x kv_heads x head_dim)
            layers = [init[f"{family_of(cfg).layers_prefix}{i}.prefix_tuning.weight"] for i in range(cfg.num_hidden_layers)]
            (p,) = named.values()
            p.copy_(torch.stack(layers, dim=1).reshape(p.shape))
        else:
            assert set(named) == {"base_model.model." + n for n in init}
            for n, t in init.items():
                named["base_model.model." + n].copy_(t)
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    make = get_cosine_schedule_with_warmup if recipe["lr_schedule"] == "cosine" else get_linear_schedule_with_warmup
    sched = make(opt, recipe["warmup_steps"], recipe["total_steps"])
    k = recipe["grad_accum_steps"]
    losses, norms = [], []
    for i in range(0, len(batches), k):
        for ids, labels in batches[i : i + k]:
            loss = model(input_ids=ids, labels=labels).loss
            (loss / k).backward()
            losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, recipe["max_grad_norm"])))
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses, norms


def _train(endpoint, name, method, recipe, batches, out, export_dir):
    with menos.connect(endpoint, adapter=METHODS[method], identity=f"methods-{name}-{method}", **CUT, **recipe) as c:
        losses = [c.train_step(ids, labels) for ids, labels in batches]
        eval_loss = c.eval_step(*batches[0])
        c.save_adapter(str(export_dir / method))
    out[method] = (losses, eval_loss)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_every_method_at_once_matches_its_local_reference(name, checkpoints, shared_manager, tmp_path):
    """Five clients with five adapter methods train at once on one manager, over one base;
    each matches its own reference to 1e-5 over 20 clipped, scheduled, accumulated optimizer
    steps, and its exported adapter reproduces the split model's eval loss."""
    path, mgr, recipe = checkpoints(name), shared_manager(name), RECIPES[name]
    batches = sft_batches(STEPS * ACCUM, seed=1)
    results: dict = {}
    threads = [threading.Thread(target=_train, args=(mgr.endpoint, name, m, recipe, batches, results, tmp_path))
               for m in METHODS]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert set(results) == set(METHODS), "a client failed (see its traceback above)"
    lasts = set()
    for method, (losses, eval_loss) in results.items():
        ref, norms = reference(path, METHODS[method], recipe, batches)
        assert max(norms) > recipe["max_grad_norm"], f"{method}: clipping never engaged"
        diff = max(abs(a - b) for a, b in zip(losses, ref))
        print(f"\n{name} {method}: first {losses[0]:.5f} last {losses[-1]:.5f}, max |split - reference| {diff:.2e}")
        assert losses == pytest.approx(ref, abs=1e-5), method
        assert losses[-4] < losses[0] - 1e-3, f"{method} does not train"  # batch 0, first and last time
        lasts.add(round(losses[-1], 4))
        _, full = load_base(path, torch.float32)
        with torch.no_grad():
            exported = PeftModel.from_pretrained(full, str(tmp_path / method)).eval()
            loss = exported(input_ids=batches[0][0], labels=batches[0][1]).loss.item()
        assert loss == pytest.approx(eval_loss, abs=1e-5), f"{method}: exported adapter"
    assert len(lasts) == len(METHODS)  # five different adapters, not one


def test_resume_restores_the_schedule_and_the_accumulation_position(checkpoints, shared_manager, tmp_path):
    """Closed after 7 micro-batches (3 optimizer steps and one accumulated micro-batch),
    resumed, trained on: the losses of one uninterrupted run."""
    path, mgr, recipe = checkpoints("llama"), shared_manager("llama"), RECIPES["llama"]
    batches = sft_batches(12, seed=2)
    session = dict(adapter=METHODS["dora"], identity="methods-resume", state_dir=str(tmp_path / "client"), **CUT, **recipe)
    with menos.connect(mgr.endpoint, **session) as c:
        losses = [c.train_step(ids, labels) for ids, labels in batches[:7]]
    with menos.connect(mgr.endpoint, resume=True, **session) as c:
        assert c.steps == 7
        losses += [c.train_step(ids, labels) for ids, labels in batches[7:]]
    ref, _ = reference(path, METHODS["dora"], recipe, batches)
    assert losses == pytest.approx(ref, abs=1e-5)


def test_methods_the_split_cannot_run_are_refused_at_connect():
    from peft import LoHaConfig, PromptTuningConfig

    for bad, words in [
        (PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "PromptTuningConfig is not supported"),
        (LoHaConfig(r=4, target_modules=["q_proj"]), "LoHaConfig is not supported"),
        (LoraConfig(r=4, bias="all"), "bias='all'"),
        (LoraConfig(r=4, layers_to_transform=[1]), "layers_to_transform"),
        (LoraConfig(r=4, target_modules=r".*q_proj"), "regular expression"),
        (PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True), "prefix_projection"),
        (menos.PrefixSpec(num_virtual_tokens=0), "num_virtual_tokens"),
    ]:
        with pytest.raises(ValueError, match=words) as exc:
            menos.ClientConfig(adapter=bad)
        if "Config is not supported" in words:  # a method: the message names those that are
            assert "peft.LoraConfig (plain, use_dora, use_rslora), peft.IA3Config, peft.PrefixTuningConfig" in str(exc.value)


def test_recipe_mistakes_are_refused_at_connect():
    for bad, words in [
        (dict(lr_schedule="cosine"), "total_steps"),
        (dict(lr_schedule="step"), "one of"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(lr=0.0), "lr"),
    ]:
        with pytest.raises(ValueError, match=words):
            menos.ClientConfig(**bad)


def test_a_clipped_step_whose_apply_failed_is_sent_again_and_nothing_is_lost(checkpoints, shared_manager, tmp_path):
    """The ApplyStep round trip fails once (say, the link drops it): saving is refused (the
    gradients hold a micro-batch the step count does not), the next call sends it again,
    and the losses go on as in an uninterrupted run."""
    path, mgr = checkpoints("llama"), shared_manager("llama")
    recipe = dict(RECIPES["llama"], grad_accum_steps=1)
    batches = sft_batches(6, seed=3)
    with menos.connect(mgr.endpoint, adapter=METHODS["lora"], identity="methods-apply-again",
                       state_dir=str(tmp_path / "client"), **CUT, **recipe) as c:  # fmt: skip
        losses = [c.train_step(*b) for b in batches[:2]]
        real, failed = c._round_trip, []

        def drop_apply_once(msg, tensor, expect, stages=None):
            if type(msg).__name__ == "ApplyStep" and not failed:
                failed.append(msg)
                raise menos.MenosTimeout("no answer (simulated)")
            return real(msg, tensor, expect, stages)

        c._round_trip = drop_apply_once
        with pytest.raises(menos.MenosTimeout):
            c.train_step(*batches[2])
        with pytest.raises(menos.MenosError, match="waits for the server") as exc:
            c.save_state()
        assert exc.value.code == "bad_request" and c.steps == 2
        losses += [None] + [c.train_step(*b) for b in batches[3:]]
        assert c.steps == 6 and len(failed) == 1
    ref, _ = reference(path, METHODS["lora"], recipe, batches)
    assert [x for x in losses if x is not None] == pytest.approx(ref[:2] + ref[3:], abs=1e-5)


def test_default_targets_are_peft_s_own():
    """menos.adapter_spec keeps PEFT's default targets light (no peft import): the same tables."""
    from peft.utils import constants

    from menos.adapter_spec import IA3_DEFAULT, LORA_DEFAULT

    for model_type, targets in LORA_DEFAULT.items():
        assert list(targets) == constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
    for model_type, (targets, ff) in IA3_DEFAULT.items():
        assert list(targets) == constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
        assert list(ff) == constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
