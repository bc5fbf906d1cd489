"""In-process: client sections + server engine == the full model, for every family."""

import pytest
import torch

from menos.adapters import inject
from menos.messages import Hello, LoraSpec, Recipe
from menos.models import random_model
from menos.cut import Cut
from menos.surgery import BlockRunner, build_section, causal_lm_loss, embed, logits
from worker.engine import InputError, ServerEngine
from tests.conftest import TINY

SPEC = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))


def _split(name, head, tail, lr=1e-2):
    cfg = TINY[name]()
    base = random_model(cfg, seed=1).state_dict()
    cut = Cut(cfg.num_hidden_layers, head, tail)
    client = build_section(cfg, base, cut.client_blocks, True, torch.float32)
    hello = Hello(head_layers=head, tail_layers=tail, adapter=SPEC, batch_size=2, seq_len=16, recipe=Recipe(lr=lr))
    engine = ServerEngine(cfg, base, cut.server_layers, hello, torch.float32)
    params = inject(client, SPEC, seed=0)
    return client, BlockRunner(client), list(cut.head_blocks), list(cut.tail_blocks), engine, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _split_step(client, runner, h, t, engine, opt, ids, step):
    x_c = runner.run(embed(client, ids), h)
    x_s = engine.forward(step, x_c.detach(), train=True).requires_grad_()
    loss = causal_lm_loss(logits(client, runner.run(x_s, t)), ids)
    loss.backward()
    g = engine.backward(step, x_s.grad, want_input_grad=x_c.requires_grad)
    if x_c.requires_grad:
        x_c.backward(g)
    if opt:
        opt.step()
        opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "opt"])
@pytest.mark.parametrize("head, tail", [(1, 0), (1, 1), (0, 2)])
def test_split_training_matches_full_model(name, head, tail):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    parts = _split(name, head, tail)
    full = random_model(TINY[name](), seed=1)
    full_opt = torch.optim.AdamW(inject(full, SPEC, seed=0), lr=1e-2, weight_decay=0.0)
    with torch.no_grad():
        client, runner, h, t, engine, _ = parts
        eval_loss = causal_lm_loss(logits(client, runner.run(engine.forward(0, runner.run(embed(client, ids), h), False), t)), ids)
        assert eval_loss.item() == pytest.approx(full(ids, labels=ids).loss.item(), abs=1e-5)
    for step in range(3):
        split_loss = _split_step(*parts, ids, step)
        ref = full(ids, labels=ids).loss
        ref.backward()
        full_opt.step()
        full_opt.zero_grad()
        assert split_loss == pytest.approx(ref.item(), abs=1e-4), f"step {step}"
    assert split_loss < eval_loss.item()  # and it trains


def test_adapter_init_does_not_depend_on_the_cut():
    cfg = TINY["llama"]()
    base = random_model(cfg, seed=1).state_dict()
    a = build_section(cfg, base, [0, 1, 2, 3], True, torch.float32)
    b = build_section(cfg, base, [2], False, torch.float32)
    inject(a, SPEC, seed=5)
    inject(b, SPEC, seed=5)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    lora_b = [n for n in pb if "lora_A" in n]
    assert lora_b and all(torch.equal(pa[n], pb[n]) for n in lora_b)
    c = build_section(cfg, base, [2], False, torch.float32)
    inject(c, SPEC, seed=6)
    assert not torch.equal(dict(c.named_parameters())[lora_b[0]], pb[lora_b[0]])


def test_sections_assign_base_tensors_without_copying():
    cfg = TINY["opt"]()
    base = random_model(cfg, seed=1).state_dict()
    section = build_section(cfg, base, [1, 2], False, torch.float32)
    for name, p in section.named_parameters():
        assert p.data_ptr() == base[name].data_ptr(), name
        assert not p.requires_grad


def test_engine_rejects_bad_inputs_and_out_of_order_backward():
    _, _, _, _, engine, _ = _split("llama", 1, 0)
    with pytest.raises(InputError, match="dtype"):
        engine.forward(0, torch.zeros(2, 16, 64, dtype=torch.float16), True)
    with pytest.raises(InputError, match="shape"):
        engine.forward(0, torch.zeros(2, 16, 65), True)
    with pytest.raises(InputError, match="exceeds"):
        engine.forward(0, torch.zeros(3, 16, 64), True)
    with pytest.raises(InputError, match="kept forward"):
        engine.backward(0, torch.zeros(2, 16, 64), True)
    engine.forward(1, torch.zeros(2, 8, 64), True)
    with pytest.raises(InputError, match="step 1"):
        engine.backward(2, torch.zeros(2, 8, 64), True)
    with pytest.raises(InputError, match="!="):
        engine.backward(1, torch.zeros(2, 4, 64), True)
    engine.backward(1, torch.zeros(2, 8, 64), True)  # the right one still works
