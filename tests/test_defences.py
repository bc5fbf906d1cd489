"""Client-side defences (menos.defences): they change only what is sent, noise at 0 is no
defence bit for bit, the noise is reproducible with the seed, and NoPeek lowers the distance
correlation between the tokens' embeddings and what crosses the cut. One shared manager
serves defended and undefended clients alike: the server has no part in a defence."""

from __future__ import annotations

import pytest
import torch

import menos
from menos import codecs, defences
from menos.defences import Defence
from menos.messages import LoraSpec
from menos.surgery import embed

CLIENT = dict(batch_size=2, seq_len=16, lr=1e-2, head_layers=1)
CLIP = 0.0225  # about the median position RMS after the tiny llama's first block (0.02 to 0.04)


def _batch(i, n=2):
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(70 + i))


@pytest.fixture
def sent(monkeypatch):
    """Every activation this test process encodes for the server, as it was given to the codec."""
    got: list[torch.Tensor] = []
    encode = codecs.encode

    def recording(tensor, codec):
        got.append(tensor.detach().clone())
        return encode(tensor, codec)

    monkeypatch.setattr(codecs, "encode", recording)
    return got


def _clean(c, ids):
    """The client's own head output, before any defence."""
    with torch.no_grad():
        return c.runner.run(embed(c.model, ids, c.position_offset), c.head_blocks)


def _train(endpoint, identity, steps=3, **kwargs):
    with menos.connect(endpoint, identity=identity, **CLIENT, **kwargs) as c:
        return [c.train_step(_batch(i)) for i in range(steps)]


def test_specs_round_trip_and_bad_ones_are_named():
    for spec in ("none", "noise:0.5", "clip:2", "clip:2+noise:0.5", "nopeek:0.1", "gradnoise:2",
                 "clip:0.25+noise:1e-05+nopeek:3+gradnoise:0.5"):
        assert defences.describe(defences.parse(spec)) == spec
    assert defences.parse(None) == defences.parse("none") == defences.parse("noise:0") == Defence()
    assert defences.parse("noise:0.5+clip:2") == Defence(noise=0.5, clip=2.0)
    assert defences.parse(Defence(clip=1.0)) == Defence(clip=1.0)
    for bad, named in [("noise:-1", "noise:-1"), ("blur:1", "blur:1"), ("noise", "noise"), ("noise:x", "noise:x"),
                       ("noise:nan", "noise:nan"), ("noise:1+noise:2", "noise given twice"), ("clip:1+", "''")]:
        with pytest.raises(ValueError, match="clip:2\\+noise:0.5") as err:  # the accepted forms
            defences.parse(bad)
        assert named in str(err.value)
    with pytest.raises(ValueError, match="defence"):
        menos.ClientConfig(defence="noise:-0.5")  # at connect, before any connection


def test_distance_correlation_measures_dependence_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    a, noise = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    dcor = defences.distance_correlation
    assert abs(dcor(a, 3 * a + 1).item() - 1) < 1e-4  # a similarity: fully dependent
    assert dcor(a, noise) < dcor(a, a + noise) < dcor(a, a + 0.1 * noise) < 1
    b = a.clone().requires_grad_()
    a[1] = a[0]  # equal rows: a zero distance, whose square root has no gradient
    dcor(a, b).backward()
    assert b.grad.isfinite().all() and b.grad.abs().sum() > 0


def test_noise_zero_is_no_defence_bit_for_bit(shared_manager):
    x = torch.randn(2, 16, 64, requires_grad=True)
    assert defences.apply(x, Defence()) is x
    assert defences.apply(x, defences.parse("noise:0+clip:0"), torch.Generator()) is x
    assert defences.apply_to_gradient(x, defences.parse("gradnoise:0")) is x
    m = shared_manager()
    plain = _train(m.endpoint, "def-plain", seed=5)
    zero = _train(m.endpoint, "def-zero", seed=5, defence="noise:0")
    assert zero == plain


def test_a_defence_changes_only_what_is_sent(shared_manager, sent):
    m, ids = shared_manager(), _batch(9)
    with menos.connect(m.endpoint, identity="def-plain-sent", seed=5, **CLIENT) as c:
        c.eval_step(ids)
        assert torch.equal(sent[-1], _clean(c, ids))  # the capture point: what an undefended client sends
        plain = c.eval_step(ids)
    d = defences.parse(f"clip:{CLIP}+noise:0.5")
    with menos.connect(m.endpoint, identity="def-noisy-sent", seed=5, defence=d, **CLIENT) as c:
        noisy = c.eval_step(ids)
        clean = _clean(c, ids)
        assert torch.equal(sent[-1], defences.apply(clean, d, defences.generator(d, 5, c._step, ids)))  # noqa: SLF001
        assert not torch.allclose(sent[-1], clean, atol=1e-3)
        assert c.train_step(ids) > 0  # the same server trains it
    assert noisy != plain  # the server computed on what was sent


def test_clipping_bounds_each_sent_positions_rms(shared_manager, sent):
    m, ids = shared_manager(), _batch(3)
    with menos.connect(m.endpoint, identity="def-clip", seed=5, defence=f"clip:{CLIP}", **CLIENT) as c:
        clean = _clean(c, ids)
        for _ in range(2):
            c.train_step(ids)
    assert (defences.rms(clean) > CLIP).any() and (defences.rms(clean) < CLIP).any()  # both cases occur
    for x in sent[::2]:  # the activations (each step then sends a gradient)
        assert defences.rms(x).max() <= CLIP * (1 + 1e-5)
    kept = defences.rms(clean) < CLIP
    torch.testing.assert_close(sent[0][kept.expand_as(clean)], clean[kept.expand_as(clean)])  # within the bound: as is


def test_scoring_and_generation_send_defended_activations_too(shared_manager, sent):
    m, ids = shared_manager(), _batch(5)
    with menos.connect(m.endpoint, identity="def-clip-gen", seed=5, defence=f"clip:{CLIP}", **CLIENT) as c:
        assert (defences.rms(_clean(c, ids)) > CLIP).any()
        c.logprobs(ids)
        out = c.generate(ids[:, :4], max_new_tokens=3)
    assert out.shape == (2, 7) and len(sent) == 4  # one scoring pass, the prompt, two new tokens (the last is not sent)
    assert all(defences.rms(x).max() <= CLIP * (1 + 1e-5) for x in sent)


def test_noise_has_the_stated_scale(shared_manager, sent):
    m, ids = shared_manager(), _batch(4)
    with menos.connect(m.endpoint, identity="def-noise", seed=5, defence="noise:0.5", **CLIENT) as c:
        c.eval_step(ids)
        clean = _clean(c, ids)
    ratio = (sent[-1] - clean).std(-1) / defences.rms(clean).squeeze(-1)  # per position, over 64 values
    assert 0.47 < ratio.mean() < 0.53 and 0.3 < ratio.min() and ratio.max() < 0.7


def test_defended_losses_are_reproducible_with_the_seed(shared_manager):
    m = shared_manager()
    spec = f"clip:{CLIP}+noise:0.5+gradnoise:1"
    first = _train(m.endpoint, "def-rep-a", seed=7, defence=spec)
    again = _train(m.endpoint, "def-rep-b", seed=7, defence=spec)
    other = _train(m.endpoint, "def-rep-c", seed=8, defence=spec)
    assert first == again
    assert other[0] != first[0]  # the first step already: LoRA starts as the base, so only the noise differs


def test_gradient_noise_changes_only_the_gradient_sent_back(shared_manager, sent):
    """gradnoise:S: the activations go out as they are; the gradient for the server's output
    gets noise of std S x each position's RMS, and the server trains on it."""
    m, ids = shared_manager(), _batch(6)
    plain_losses, noisy_losses = [], []
    with menos.connect(m.endpoint, identity="def-grad-plain", seed=5, **CLIENT) as c:
        plain_losses = [c.train_step(ids) for _ in range(2)]
    plain, sent[:] = list(sent), []
    with menos.connect(m.endpoint, identity="def-grad-noisy", seed=5, defence="gradnoise:1", **CLIENT) as c:
        noisy_losses = [c.train_step(ids) for _ in range(2)]
    assert torch.equal(sent[0], plain[0])  # the first step's activations: untouched
    g, g_noisy = plain[1][:, :-1], sent[1][:, :-1]  # its gradient, as sent (the last position has no label: 0)
    ratio = (g_noisy - g).std(-1) / defences.rms(g).squeeze(-1)  # per position, over 64 values
    assert 0.9 < ratio.mean() < 1.1
    assert noisy_losses[0] == plain_losses[0] and noisy_losses[1] != plain_losses[1]  # the server trained on it


def _dcor(c, ids):
    with torch.no_grad():
        hidden = embed(c.model, ids, c.position_offset)
        return defences.distance_correlation(hidden.flatten(0, 1), c._head(ids).flatten(0, 1)).item()  # noqa: SLF001


def test_nopeek_lowers_the_distance_correlation_and_still_trains(shared_manager):
    m, probe = shared_manager(), _batch(20, 4)
    dcor, losses = {}, {}
    for w in (0.0, 3.0):
        with menos.connect(m.endpoint, identity=f"def-nopeek-{w}", seed=5, adapter=LoraSpec(r=4, alpha=8),
                           defence=f"nopeek:{w}", **{**CLIENT, "batch_size": 4, "lr": 0.1}) as c:  # fmt: skip
            before = _dcor(c, probe)
            losses[w] = [c.train_step(_batch(i % 2, 4)) for i in range(12)]
            dcor[w] = _dcor(c, probe)
            assert (c.last_nopeek is not None and 0 < c.last_nopeek <= w) if w else c.last_nopeek is None
    print(f"dcor before {before:.3f}, after nopeek:0 {dcor[0.0]:.3f}, after nopeek:3 {dcor[3.0]:.3f}; "
          f"task loss {losses[0.0][0]:.3f} -> {losses[0.0][-1]:.3f} / {losses[3.0][-1]:.3f}")
    assert dcor[3.0] < dcor[0.0] - 0.1  # measured: 0.66 -> 0.43
    assert losses[3.0][-1] < losses[3.0][0] - 0.05  # the task loss still trains (4.88 -> 4.76)
