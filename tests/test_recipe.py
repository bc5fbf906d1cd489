"""The recipe's pieces in one process: schedules, the split clip coefficient, the
engine's accumulation and clipped step, seeded LoRA dropout, and the STEP grant."""

import pytest
import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)  # fmt: skip

from menos.adapters import inject, set_dropout_step
from menos.cut import Cut
from menos.messages import Hello, LoraSpec, Policy, Recipe, Schedule, TokenKind
from menos.models import random_model
from menos.recipe import SideOptimizer
from menos.schedule import clip_scale, lr_factor
from menos.surgery import build_section
from tests.conftest import TINY
from worker import policy as P
from worker.engine import InputError, ServerEngine


@pytest.mark.parametrize("schedule, make", [
    (Schedule.CONSTANT, lambda o, w, t: get_constant_schedule_with_warmup(o, w)),
    (Schedule.LINEAR, get_linear_schedule_with_warmup),
    (Schedule.COSINE, get_cosine_schedule_with_warmup),
])  # fmt: skip
def test_lr_factor_is_transformers_schedule(schedule, make):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt, 4, 17)
    recipe = Recipe(lr=1.0, lr_schedule=schedule, warmup_steps=4, total_steps=17)
    for step in range(20):
        assert lr_factor(recipe, step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


def test_clip_coefficient_from_two_sides_equals_clip_grad_norm_on_all():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 4), (5,), (2, 2), (7,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [p.grad.clone() for p in params]
    client, server = SideOptimizer(params[:2], Recipe(max_grad_norm=0.7)), SideOptimizer(params[2:], Recipe())
    scale = clip_scale(0.7, [client.grad_sq_norm(), server.grad_sq_norm()])
    norm = torch.nn.utils.clip_grad_norm_(params, 0.7)
    assert norm > 0.7 and scale < 1
    for p, g in zip(params, grads):
        assert torch.allclose(g * scale, p.grad, rtol=1e-6)
    assert clip_scale(1e6, [client.grad_sq_norm()]) == 1.0  # below the norm: untouched


def _engine(recipe: Recipe, spec=LoraSpec(r=4, alpha=8), name="llama"):
    cfg = TINY[name]()
    base = random_model(cfg, seed=1).state_dict()
    hello = Hello(head_layers=1, tail_layers=1, adapter=spec, batch_size=2, seq_len=16, recipe=recipe)
    return ServerEngine(cfg, base, Cut(cfg.num_hidden_layers, 1, 1).server_layers, hello, torch.float32)


def test_engine_accumulates_then_waits_for_the_clipped_step():
    engine = _engine(Recipe(lr=1e-2, grad_accum_steps=2, max_grad_norm=1e-3))
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(2, 8, 64, generator=gen), torch.randn(2, 8, 64, generator=gen)
    before = [p.detach().clone() for p in engine.params]
    engine.forward(1, x, True)
    engine.backward(1, g, True)
    assert engine.steps == 1 and engine.pending_sq_norm is None  # accumulated, not stepped
    assert all(torch.equal(a, p) for a, p in zip(before, engine.params))
    with pytest.raises(InputError, match="no optimizer step waits"):
        engine.check_step(1, 0.5)
    engine.forward(2, x, True)
    engine.backward(2, g, True)
    assert engine.steps == 1 and engine.pending_sq_norm > 0  # the step waits for the coefficient
    with pytest.raises(InputError, match="apply_step"):
        engine.forward(3, x, True)  # nothing goes before the step
    assert engine.save_checkpoint("/nonexistent") is None  # nor a checkpoint of a half-applied state
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="clip coefficient"):
            engine.check_step(2, bad)
    engine.apply_step(2, 0.5)
    assert engine.steps == 2 and engine.pending_sq_norm is None
    assert not all(torch.equal(a, p) for a, p in zip(before, engine.params))
    assert all(p.grad is None for p in engine.params)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_dropout_masks_are_drawn_again_by_the_re_forward(use_dora):
    """On-demand (the backward re-forwards) and a kept graph give the same gradients, so
    the masks are the forward's; dropout changes the training forward, not evaluation."""
    spec = LoraSpec(r=4, alpha=8, dropout=0.3, use_dora=use_dora, target_modules=("q_proj", "v_proj"))
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(2, 8, 64, generator=gen), torch.randn(2, 8, 64, generator=gen)
    outs = {}
    for keep in (False, True):
        engine = _engine(Recipe(lr=1e-2), spec)
        with torch.no_grad():
            for p in engine.params:
                p.add_(0.05)  # lora_B = 0 would hide the adapter's branch, dropout included
        y = engine.forward(1, x, True, keep_graph=keep)
        dx = engine.backward(1, g, True)
        outs[keep] = (y, dx, [p.detach().clone() for p in engine.params])
        assert torch.equal(engine.forward(2, x, False), engine.forward(3, x, False))  # eval: no dropout
        evaluated = engine.forward(4, x, False)
    assert torch.equal(outs[False][0], outs[True][0]) and torch.allclose(outs[False][1], outs[True][1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outs[False][2], outs[True][2]))
    engine.forward(5, x, True)
    trained = engine.runner.run(x.clone())  # the step's masks still set: dropout is on
    set_dropout_step(engine.model, None)
    assert not torch.allclose(trained, engine.runner.run(x.clone()))
    assert torch.equal(engine.runner.run(x.clone()), evaluated)


def test_a_clipped_step_asks_for_its_own_small_grant():
    pol = P.GrantPolicy(Policy.ON_DEMAND, m_f=100, m_b=1000, m_step=30)
    (ask,) = pol.start(P.Job.STEP)
    assert (ask.nbytes, ask.kind) == (30, TokenKind.STEP)
    assert pol.granted(ask.request_id) == [P.Compute(keep_graph=False)]
    assert pol.done(0.01) == [P.Release(ask.request_id), P.Reply()]
    assert pol.idle


def test_prefix_sections_hold_their_own_blocks_prefixes():
    from menos import prefix
    from menos.messages import PrefixSpec

    cfg = TINY["llama"]()
    base = random_model(cfg, seed=1).state_dict()
    client = build_section(cfg, base, [0, 3], True, torch.float32)
    params = inject(client, PrefixSpec(num_virtual_tokens=5), seed=0)
    kv_heads, head_dim = prefix.kv_shape(cfg)
    assert sorted(prefix.of(client.model.layers)) == [0, 3]
    assert [tuple(p.shape) for p in params] == [(5, 2, kv_heads, head_dim)] * 2
    assert all(not p.requires_grad for n, p in client.named_parameters() if "prefix" not in n)


def test_a_backward_that_fails_half_way_keeps_the_accumulated_gradients_once():
    """An out-of-memory error inside a backward is retried: the retry must not add the
    gradients the failed attempt had already accumulated."""
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(2, 8, 64, generator=gen), torch.randn(2, 8, 64, generator=gen)
    clean, failing = _engine(Recipe(lr=1e-2, grad_accum_steps=3)), _engine(Recipe(lr=1e-2, grad_accum_steps=3))
    for e in (clean, failing):
        e.forward(1, x, True)
        e.backward(1, g, True)
        e.forward(2, x * 2, True)
    first = failing.params[0]  # block 1's first LoRA tensor: its gradient comes last
    fired = []

    def fail_once(grad):
        if not fired:
            fired.append(1)
            raise RuntimeError("CPU out of memory (simulated)")
        return grad

    handle = first.register_hook(fail_once)
    with pytest.raises(RuntimeError, match="simulated"):
        failing.backward(2, g, True)
    assert any(p.grad is not None for p in failing.params[1:])
    failing.backward(2, g, True)  # the retry (the kept input survived)
    handle.remove()
    clean.backward(2, g, True)
    for a, b in zip(clean.params, failing.params):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_a_clipped_step_retried_after_a_failure_scales_once_and_nothing_else_goes_first():
    from menos.messages import ApplyStep, ErrorCode, Forward
    from worker.requests import RequestError, job_for

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(2, 8, 64, generator=gen), torch.randn(2, 8, 64, generator=gen) * 50
    clean, flaky = _engine(Recipe(lr=1e-2, max_grad_norm=1e-3)), _engine(Recipe(lr=1e-2, max_grad_norm=1e-3))
    for e in (clean, flaky):
        e.forward(1, x, True)
        e.backward(1, g, True)
    with pytest.raises(RequestError) as exc:  # refused before any memory is asked for
        job_for(Forward(step=2, train=True), [x], flaky)
    assert exc.value.code == ErrorCode.BAD_REQUEST and "waits for its ApplyStep" in str(exc.value)
    assert job_for(ApplyStep(step=1, scale=0.5), [], flaky)[0] is P.Job.STEP
    real_step = flaky.opt.optimizer.step
    fired = []

    def fail_once(*a, **kw):
        if not fired:
            fired.append(1)
            raise RuntimeError("CPU out of memory (simulated)")
        return real_step(*a, **kw)

    flaky.opt.optimizer.step = fail_once
    with pytest.raises(RuntimeError, match="simulated"):
        flaky.apply_step(1, 0.5)
    flaky.apply_step(1, 0.5)  # the retry
    clean.apply_step(1, 0.5)
    assert all(torch.allclose(a, b) for a, b in zip(clean.params, flaky.params))


def test_a_batch_with_no_label_to_learn_from_is_refused():
    from menos.batches import check_batch

    ids = torch.randint(0, 128, (2, 8))
    labels = torch.full((2, 8), -100)
    labels[:, 0] = 5  # the first position is never a target
    with pytest.raises(ValueError, match="no token to learn from"):
        check_batch(ids, labels, 2, 8, 128)
    labels[1, 3] = 7
    assert check_batch(ids, labels, 2, 8, 128)[1][1, 3] == 7


def test_a_driven_engine_accumulates_hands_over_its_gradients_and_takes_weights_at_any_step():
    """hf_model()'s session: the client's optimizer steps the server's adapter."""
    from menos.messages import Backward
    from worker.requests import RequestError, job_for

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(2, 8, 64, generator=gen), torch.randn(2, 8, 64, generator=gen)
    plain, driven = _engine(Recipe(lr=1e-2, grad_accum_steps=2)), _engine(Recipe(lr=1e-2, grad_accum_steps=2))
    with pytest.raises(RequestError, match="AdapterRequest"):  # not driven: its own optimizer steps
        job_for(Backward(step=1, adapter_grads=True), [g], plain)
    plain.forward(1, x, True)
    plain.backward(1, g, True)
    with pytest.raises(InputError, match="half accumulated"):
        plain.drive()  # a recipe's step is half done
    driven.drive()
    before = [p.detach().clone() for p in driven.params]
    for step in (1, 2, 3):
        driven.forward(step, x, True)
        driven.forward(100 + step, x, False)  # an evaluation between (DPO's reference) keeps the kept forward
        driven.backward(step, g, True)
    assert driven.steps == 3 and driven.pending_sq_norm is None
    assert driven.optimizer.state == {}  # no AdamW state: the client's optimizer holds it (the standing charge
    # counted A + O at admission, O of which a driven worker never allocates, while it may hold A's gradients)
    assert all(torch.equal(a, p) for a, p in zip(before, driven.params))  # it never steps by itself
    assert driven.save_checkpoint("/nonexistent") is None  # the client's trainer checkpoints it
    grads = driven.take_adapter_grads()
    assert all(p.grad is None for p in driven.params)  # taken: they start again from zero
    driven.forward(10, x, True)
    driven.backward(10, g, True)  # held: an accumulation that is then given up
    driven.forward(11, x, True)
    driven.backward(11, g, True, fresh=True)  # the client zeroed its gradients: those held are forgotten
    assert all(torch.allclose(t, p.grad, atol=1e-6) for t, p in zip(driven.take_adapter_grads(), plain.params))
    # three identical micro-batches: three times one micro-batch's gradients (the first of `plain`)
    assert all(torch.allclose(t, 3 * p.grad, atol=1e-6) for t, p in zip(grads, plain.params))
    stepped = {n: p.detach() - 0.1 for n, p in driven.adapter_state().items()}
    driven.forward(4, x, True)
    assert driven.load_adapter(stepped) == len(stepped)  # at any step; it drops the kept forward
    with pytest.raises(InputError, match="kept forward is for step none"):
        driven.check_backward(4, g)
    assert all(torch.equal(p, stepped[n]) for n, p in driven.adapter_state().items())
    with pytest.raises(InputError, match="before training only"):
        plain.load_adapter({n: p.detach() for n, p in plain.adapter_state().items()})


def test_left_pads_are_never_attended_to_in_a_training_forward():
    """A row's left pads change none of its tokens' outputs, forward and re-forward alike."""
    engine = _engine(Recipe(lr=1e-2))
    engine.drive()  # no optimizer step between the two forwards
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(1, 8, 64, generator=gen), torch.randn(1, 8, 64, generator=gen)
    junk = torch.randn(1, 3, 64, generator=gen)
    padded = torch.cat([junk, x], dim=1)
    alone = engine.forward(1, x, True)
    dx_alone = engine.backward(1, g, True)
    with_pads = engine.forward(2, padded, True, pads=(3,))
    assert torch.allclose(with_pads[:, 3:], alone, atol=1e-5)
    dx = engine.backward(2, torch.cat([torch.zeros(1, 3, 64), g], dim=1), True)
    assert torch.allclose(dx[:, 3:], dx_alone, atol=1e-5) and torch.count_nonzero(dx[:, :3]) == 0
