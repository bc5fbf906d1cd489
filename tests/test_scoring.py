"""Using what was trained through the split: log-probabilities (with and without the
adapter) and the client's own loss function, against the whole model run locally."""

from __future__ import annotations

import peft
import pytest
import torch

import menos
from menos.messages import ErrorCode, LoraSpec, PrefixSpec
from menos.models import load_base

CLIENT = dict(batch_size=2, seq_len=16, lr=1e-2, seed=3, head_layers=1, tail_layers=1)


def _batch(i, n=2):
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(50 + i))


def _local_logprobs(model, ids):
    out = model(ids).logits.float()
    return torch.log_softmax(out[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def test_logprobs_with_and_without_the_adapter_match_the_whole_model(shared_manager, checkpoints, tmp_path):
    ckpt = checkpoints("llama")
    ids = _batch(99)
    with menos.connect(shared_manager("llama").endpoint, adapter=LoraSpec(r=4, alpha=8), **CLIENT) as c:
        for i in range(4):
            c.train_step(_batch(i))
        tuned, base = c.logprobs(ids), c.logprobs(ids, adapter=False)
        assert c.train_step(_batch(4)) > 0  # the adapter trains on after an adapter-free pass
        c.save_adapter(str(tmp_path / "adapter"))
        after = c.logprobs(ids)
    assert tuned.shape == (2, 15) and tuned.dtype == torch.float32 and (tuned <= 0).all()
    with torch.no_grad():
        _, plain = load_base(ckpt, torch.float32)
        torch.testing.assert_close(base, _local_logprobs(plain, ids), atol=1e-5, rtol=0)
        assert (tuned - base).abs().max() > 1e-3  # training changed what the model says
        _, full = load_base(ckpt, torch.float32)
        local = peft.PeftModel.from_pretrained(full, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(after, _local_logprobs(local, ids), atol=1e-5, rtol=0)


def test_logprobs_without_a_prefix_are_the_bases_and_padding_is_masked(shared_manager, checkpoints, tmp_path):
    ids = _batch(7)
    with menos.connect(shared_manager("llama").endpoint, adapter=PrefixSpec(num_virtual_tokens=4), **CLIENT) as c:
        c.train_step(_batch(0))
        base = c.logprobs(ids, adapter=False)
        with torch.no_grad():
            _, plain = load_base(checkpoints("llama"), torch.float32)
            torch.testing.assert_close(base, _local_logprobs(plain, ids), atol=1e-5, rtol=0)
        mask = torch.ones(2, 16, dtype=torch.int64)
        mask[1, 10:] = 0  # the second row is 10 tokens, right-padded
        with pytest.raises(ValueError, match="prefix tuning"):
            c.generate(ids[:, :4])
        c.save_adapter(str(tmp_path / "prefix"))
        tuned = c.logprobs(ids)
        with menos.connect(shared_manager("llama").endpoint, init_adapter=str(tmp_path / "prefix"),
                           **{**CLIENT, "seed": 8}) as again:  # fmt: skip
            torch.testing.assert_close(again.logprobs(ids), tuned, atol=1e-6, rtol=0)
        padded = c.logprobs(ids, attention_mask=mask)
        alone = c.logprobs(ids[1:, :10])
        torch.testing.assert_close(padded[1, :9], alone[0], atol=1e-5, rtol=0)
        assert (padded[1, 9:] == 0).all() and (padded[0] < 0).all()
        with pytest.raises(ValueError, match="pads on the left"):
            c.logprobs(ids, attention_mask=mask.flip(1))
        assert c.train_step(_batch(1)) > 0  # still trains with its prefix


def test_your_own_loss_runs_on_the_client_and_trains_both_sides(shared_manager):
    endpoint = shared_manager("llama").endpoint
    seen = []

    def cross_entropy(logits, labels):  # causal-LM cross entropy, written by the user
        seen.append((tuple(logits.shape), tuple(labels.shape)))
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())

    def smoothed(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 label_smoothing=0.2)  # fmt: skip

    spec = dict(adapter=LoraSpec(r=4, alpha=8), grad_accum_steps=2, max_grad_norm=0.5, **CLIENT)
    with menos.connect(endpoint, **spec) as a, menos.connect(endpoint, **spec) as b, \
            menos.connect(endpoint, **spec) as s:  # fmt: skip
        default = [a.train_step(_batch(i)) for i in range(4)]
        mine = [b.train_step(_batch(i), loss_fn=cross_entropy) for i in range(4)]
        other = [s.train_step(_batch(i), loss_fn=smoothed) for i in range(4)]
        assert mine == pytest.approx(default, abs=1e-6)  # accumulation and clipping apply unchanged
        assert seen[0] == ((2, 16, 128), (2, 16))
        assert abs(other[-1] - default[-1]) > 1e-3
        assert s.eval_step(_batch(9), loss_fn=smoothed) > 0
        with pytest.raises(ValueError, match="scalar float tensor"):
            a.train_step(_batch(5), loss_fn=lambda logits, labels: logits.mean(-1))
        assert a.train_step(_batch(5)) > 0  # the failed step cost nothing


def test_an_adapter_free_forward_cannot_train(shared_manager):
    from menos.messages import Activations, Forward

    with menos.connect(shared_manager("llama").endpoint, adapter=LoraSpec(r=4, alpha=8), **CLIENT) as c:
        x = torch.zeros(2, 16, 64)
        with pytest.raises(menos.MenosError) as exc:
            c._round_trip(Forward(step=99, train=True, adapter=False), x, Activations)
        assert exc.value.code == ErrorCode.BAD_REQUEST and "eval only" in str(exc.value)


def _dpo_loss(logits, labels, ref, beta=0.1):
    from menos.scoring import token_logprobs

    lp = token_logprobs(logits, labels).sum(-1)
    return -torch.nn.functional.logsigmoid(beta * ((lp[0] - ref[0]) - (lp[1] - ref[1])))


def test_a_dpo_step_through_the_split_equals_peft_on_the_whole_model(shared_manager, checkpoints, tmp_path):
    """10 DPO steps on chosen/rejected pairs, the reference from logprobs(adapter=False),
    against the same loss on the whole model with PEFT and AdamW locally."""
    from menos.data import ByteTokenizer, sft_batches

    pairs = [("Q: capital of France? A: ", "Paris."), ("Q: capital of France? A: ", "Rome.")]
    (ids, labels), = sft_batches(pairs, ByteTokenizer(), batch_size=2, seq_len=32)
    with menos.connect(shared_manager("llama").endpoint, batch_size=2, seq_len=32, lr=1e-2, seed=5) as c:
        c.save_adapter(str(tmp_path / "init"))  # the split's initial adapter, for the local twin
        ref = c.logprobs(ids, labels, adapter=False).sum(-1)
        split = [c.train_step(ids, labels, loss_fn=lambda lg, lb: _dpo_loss(lg, lb, ref)) for _ in range(10)]
    _, full = load_base(checkpoints("llama"), torch.float32)
    model = peft.PeftModel.from_pretrained(full, str(tmp_path / "init"), is_trainable=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    with torch.no_grad(), model.disable_adapter():
        from menos.scoring import token_logprobs

        local_ref = token_logprobs(model(ids).logits, labels).sum(-1)
    torch.testing.assert_close(ref, local_ref, atol=1e-5, rtol=0)
    local = []
    for _ in range(10):
        loss = _dpo_loss(model(ids).logits, labels, local_ref)
        loss.backward()
        opt.step()
        opt.zero_grad()
        local.append(loss.item())
    assert split == pytest.approx(local, abs=1e-5)
    assert split[-1] < split[0] - 1e-3  # it learned to prefer the chosen answer


def test_readme_dpo_example_runs_as_written(shared_manager):
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        code = re.search(r"<!-- dpo-example -->\n```python\n(.*?)```", f.read(), re.S).group(1)
    scope: dict = {}
    exec(compile(code.replace("tcp://127.0.0.1:5555", shared_manager("llama").endpoint), "README.md", "exec"), scope)  # noqa: S102
    losses = scope["losses"]
    assert len(losses) == 10 and losses[-1] < losses[0]


def test_a_late_reply_to_a_request_given_up_on_is_not_taken_for_the_next(shared_manager):
    """A request whose reply the client never read (it timed out, or was interrupted) must
    not answer the next one: its Activations would silently stand in for another batch's."""
    from menos.messages import Forward

    with menos.connect(shared_manager("llama").endpoint, adapter=LoraSpec(r=4, alpha=8), **CLIENT) as c:
        want = c.eval_step(_batch(1))
        c.stages[0].chan.send(Forward(step=10_000, train=False), [c._head(_batch(2))])  # noqa: SLF001  never read
        assert c.stages[0].chan.sock.poll(30_000)  # its reply has come (the worker is free again)
        assert c.eval_step(_batch(1)) == want
        assert c.train_step(_batch(3)) > 0 and c.eval_step(_batch(1)) != want  # and training goes on
