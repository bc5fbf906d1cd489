"""Generation through the split against ``transformers``' ``generate`` on the whole model
(the exported PEFT adapter on the local base), and the generation's memory token under
the scheduler, through real processes."""

from __future__ import annotations

import peft
import pytest
import torch

import menos
from menos.messages import IA3Spec, LoraSpec
from menos.models import load_base
from tests.conftest import TINY

CLIENT = dict(batch_size=3, seq_len=16, lr=1e-2, seed=3)
NEW = 12


def _batch(i, n=3):
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(70 + i))


def _prompts():
    """Three prompts of 8, 5 and 7 tokens, left-padded to 8 with id 0."""
    ids = torch.randint(1, 128, (3, 8), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name, adapter, head, tail", [
    ("llama", LoraSpec(r=4, alpha=8), 1, 1),
    ("opt", IA3Spec(), 2, 0),
])  # fmt: skip
def test_greedy_and_sampled_generation_equal_the_whole_models(shared_manager, checkpoints, tmp_path, name, adapter,
                                                              head, tail):  # fmt: skip
    ids, mask = _prompts()
    with menos.connect(shared_manager(name).endpoint, adapter=adapter, head_layers=head, tail_layers=tail, **CLIENT) as c:
        greedy = dict(max_new_tokens=NEW, pad_token_id=0)
        before = c.generate(ids[:2], **greedy)
        for i in range(3):
            c.train_step(_batch(i))
        c.save_adapter(str(tmp_path / "adapter"))
        unpadded = c.generate(ids[:2], **greedy)
        padded = c.generate(ids, attention_mask=mask, **greedy)
        eos = int(padded[0, 8 + 3])  # row 0 ends at its 4th new token; the others, if they meet it
        ended = c.generate(ids, attention_mask=mask, eos_token_id=eos, **greedy)
        sample = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=NEW, pad_token_id=0)
        sampled = c.generate(ids, attention_mask=mask, seed=5, **sample)
        again = c.generate(ids, attention_mask=mask, seed=5, **sample)
        base = c.generate(ids[:2], adapter=False, **greedy)
    # A new session from the exported adapter (another seed: nothing of its own init is left).
    ep = shared_manager(name).endpoint
    opts = {**CLIENT, "seed": 11, "head_layers": head, "tail_layers": tail}
    with menos.connect(ep, init_adapter=str(tmp_path / "adapter"), **opts) as again_from_disk:
        assert torch.equal(again_from_disk.generate(ids[:2], **greedy), unpadded)
        assert again_from_disk.train_step(_batch(5)) > 0  # and it trains on
    with pytest.raises(ValueError, match="leave adapter out"):
        menos.connect(ep, init_adapter=str(tmp_path / "adapter"), adapter=LoraSpec(r=2), **opts)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        menos.connect(ep, init_adapter=str(tmp_path), **opts)
    assert unpadded.shape == (2, 8 + NEW) and padded.shape == (3, 8 + NEW)
    assert torch.equal(unpadded[:, :8], ids[:2]) and torch.equal(padded[:, :8], ids)
    assert torch.equal(base, before)  # a fresh adapter is the base; adapter=False is the base after training
    assert not torch.equal(unpadded, before)  # training changed what the model says
    assert torch.equal(sampled, again)
    assert (ended[0, 8 + 4:] == 0).all() and ended[0, 8 + 3] == eos
    _, full = load_base(checkpoints(name), torch.float32)
    local = peft.PeftModel.from_pretrained(full, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(unpadded, local.generate(ids[:2], attention_mask=torch.ones(2, 8, dtype=torch.long), **greedy))
        assert torch.equal(padded, local.generate(ids, attention_mask=mask, **greedy))
        assert torch.equal(ended, local.generate(ids, attention_mask=mask, **{**greedy, "eos_token_id": eos}))
        torch.manual_seed(5)  # transformers draws from the global generator: the same stream as seed=5
        assert torch.equal(sampled, local.generate(ids, attention_mask=mask, **sample))
        with local.disable_adapter():
            assert torch.equal(base, local.generate(ids[:2], attention_mask=torch.ones(2, 8, dtype=torch.long), **greedy))


GEN_SCRIPT = """
import sys, torch, menos
c = menos.connect(sys.argv[1], batch_size=1, seq_len=16, identity="doomed")

class Stop:
    n = 0
    def put(self, value):
        self.n += 1
        if self.n == 3:  # the prompt, then two new tokens: the cache token is held
            print("generating", flush=True)
            import time; time.sleep(600)
    def end(self):
        pass

c.generate(torch.randint(1, 128, (1, 8)), max_new_tokens=int(sys.argv[2]), streamer=Stop())
"""


class _Probe:
    """A streamer that reads the manager's status while the generation is open."""

    def __init__(self, endpoint):
        self.endpoint, self.seen = endpoint, None

    def put(self, value):
        if self.seen is None and value.dim() == 1:  # a new token (the prompt comes first, 2-D)
            self.seen = menos.status(self.endpoint)

    def end(self):
        pass


def _released(endpoint, timeout_s=5.0):
    """The status once nothing is granted (and no cache token shown)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        st = menos.status(endpoint)
        if st.granted == 0 and not any(c.cache_bytes for c in st.clients):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def _mine(status, session):
    return next(c for c in status.clients if c.session == session)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, checkpoints):
    """16 MiB for tokens, clients count as gone after 3 s without a heartbeat, and a client
    may keep no block before the server's range."""
    from tools.harness import ManagerProcess

    m = ManagerProcess(str(tmp_path_factory.mktemp("gen")), "--model", checkpoints("llama"),
                       "--memory-capacity", "16MiB", "--client-timeout", "3", "--min-head-layers", "0")  # fmt: skip
    yield m
    m.stop()


def _positions_for(nbytes, batch=1):
    """Positions of a generation whose server cache (tiny llama: blocks 1..3) is ``nbytes``."""
    from menos.estimator import kv_cache_bytes

    return nbytes // kv_cache_bytes(TINY["llama"](), 3, batch, 1, 4)


def test_the_cache_token_is_held_from_prompt_to_end_and_generation_interleaves_with_training(small_server):
    """Its size is the cache plus one forward; two clients generating and one training at once
    all get what each gets alone; a generation larger than the capacity is refused."""
    from menos.estimator import kv_cache_bytes
    from tools.harness import run_clients

    ep = small_server.endpoint
    ids, mask = _prompts()
    opts = dict(batch_size=3, seq_len=16, seed=3)
    gens = [menos.connect(ep, identity=f"gen{i}", **{**opts, "seed": i}) for i in range(2)]
    # The trainers keep no block before the server's range (this manager holds all of them).
    trainer = menos.connect(ep, identity="trainer", head_layers=0, tail_layers=1, **opts)
    alone_trainer = menos.connect(ep, identity="trainer-alone", head_layers=0, tail_layers=1, **opts)
    try:
        for g in gens:
            g.train_step(_batch(0))
        probe = _Probe(ep)
        alone = [g.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, streamer=probe if i == 0 else None)
                 for i, g in enumerate(gens)]  # fmt: skip
        held = _mine(probe.seen, gens[0].session)
        assert held.state == "generating"
        assert held.cache_bytes == kv_cache_bytes(gens[0].config, 3, 3, 8 + NEW, 4) + held.m_f
        assert probe.seen.granted >= held.cache_bytes
        # GenerationEnd is not answered: the worker releases as soon as it reads it
        after = _released(ep)
        assert _mine(after, gens[0].session).state == "idle"
        solo_losses = [alone_trainer.train_step(_batch(i)) for i in range(4)]

        def gen(g, barrier):
            barrier.wait()
            return [g.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0) for _ in range(3)]

        def train(t, barrier):
            barrier.wait()
            return [t.train_step(_batch(i)) for i in range(4)]

        out = run_clients(lambda f, x, barrier: f(x, barrier), [(gen, gens[0]), (gen, gens[1]), (train, trainer)], threads=True)
        for got, want in zip(out[:2], alone):
            assert all(torch.equal(o, want) for o in got)
        assert out[2] == pytest.approx(solo_losses, abs=1e-6)
        right = torch.ones(3, 8, dtype=torch.long)
        right[1, 5:] = 0
        with pytest.raises(ValueError, match="left-padded"):
            gens[0].generate(ids, attention_mask=right)
        with pytest.raises(ValueError, match="max_new_tokens"):
            gens[0].generate(ids, max_new_tokens=0)
        from menos.messages import Activations, Forward

        with pytest.raises(menos.MenosError, match="no generation is open") as err:  # a step without its prompt
            gens[0]._round_trip(Forward(step=99, train=False, cached=True), torch.zeros(3, 1, 64), Activations)
        assert err.value.code == "bad_request"
        st = menos.status(ep)
        with pytest.raises(menos.MenosError) as err:
            gens[0].generate(ids[:1], max_new_tokens=_positions_for(st.capacity))
        assert err.value.code == "too_large" and "capacity" in str(err.value)
        assert gens[0].generate(ids[:1], max_new_tokens=2).shape == (1, 10)  # the session serves on
        _released(ep)
    finally:
        for c in (*gens, trainer, alone_trainer):
            c.close()


def test_a_client_killed_mid_generation_frees_its_token_and_the_others_go_on(small_server):
    import subprocess
    import sys
    import threading

    ep = small_server.endpoint
    st = menos.status(ep)
    other = menos.connect(ep, identity="survivor", batch_size=1, seq_len=16)
    try:
        # The doomed client's token leaves no room for the survivor's forward beside it.
        room = st.capacity - menos.status(ep).standing
        m_f = _mine(menos.status(ep), other.session).m_f
        new = _positions_for(room - 3 * m_f // 2) - 8
        proc = subprocess.Popen([sys.executable, "-c", GEN_SCRIPT, ep, str(new)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "generating"
            doomed = next(c for c in menos.status(ep).clients if c.identity == "doomed")
            assert doomed.state == "generating" and room - m_f < doomed.cache_bytes < room
            proc.kill()
            proc.wait()
            losses = []
            t = threading.Thread(target=lambda: losses.append(other.train_step(_batch(0, 1))))
            t.start()
            t.join(60)  # it waits until the manager drops the dead client (3 s without heartbeats)
            assert losses and other.times.server_queue[-1] > 1.0
        finally:
            proc.kill()
            proc.wait()
        assert [c.identity for c in _released(ep).clients] == ["survivor"]
    finally:
        other.close()


def test_the_engine_allocates_what_the_token_sizes_and_refuses_what_does_not_continue():
    """In-process: the worker's cache is exactly the estimator's kv_cache_bytes; a step that
    does not fit the open generation is refused before anything runs."""
    from menos.messages import Forward, Hello
    from menos.models import random_model
    from worker.engine import InputError, ServerEngine

    cfg = TINY["llama"]()
    engine = ServerEngine(cfg, random_model(cfg, seed=1).state_dict(), (1, 3), Hello(batch_size=2, seq_len=8),
                          torch.float32)  # fmt: skip
    x = torch.randn(2, 5, 64)
    with pytest.raises(InputError, match="no generation is open"):
        engine.generate(x[:, :1], Forward(step=1, train=False, cached=True))
    y = engine.generate(x, Forward(step=1, train=False, generate=9, pads=(0, 2)))
    assert y.shape == (2, 5, 64) and engine.generation.cache.nbytes == engine.generation_bytes(2, 9)
    assert engine.generation_bytes(2, 9) == 2 * 2 * 2 * 9 * 2 * 16 * 4  # blocks x (k, v) x batch x len x heads x dim x 4
    for bad, match in [(Forward(step=2, train=False, cached=True, adapter=False), "does not continue"),
                       (Forward(step=2, train=True, cached=True), "evaluation")]:  # fmt: skip
        with pytest.raises(InputError, match=match):
            engine.generate(x[:, :1], bad)
    with pytest.raises(InputError, match="does not continue"):
        engine.generate(x, Forward(step=2, train=False, cached=True))  # 5 more do not fit 9 - 5
    with pytest.raises(InputError, match="at most"):
        engine.generate(x, Forward(step=3, train=False, generate=(1 << 24) + 1, pads=(0, 0)))
    for pads in [(0,), (0, 5), (-1, 0)]:
        with pytest.raises(InputError, match="pads"):
            engine.generate(x, Forward(step=3, train=False, generate=9, pads=pads))
    for _ in range(4):
        assert engine.generate(x[:, :1], Forward(step=4, train=False, cached=True)).shape == (2, 1, 64)
    engine.end_generation()
    assert engine.generation is None


def _word_tokenizer(directory):
    """A word-level tokenizer for the tiny vocabulary: "w0" .. "w127"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(directory)
    return directory


def test_menos_generate_prints_what_the_adapter_generates(shared_manager, tmp_path, capsys):
    from tools.generate import main

    ep = shared_manager("llama").endpoint
    with menos.connect(ep, batch_size=1, seq_len=8, seed=4) as c:
        c.train_step(_batch(0, 1)[:, :8])
        c.save_adapter(str(tmp_path / "adapter"))
        want = c.generate([[5, 6, 7]], max_new_tokens=5, pad_token_id=0)[0, 3:].tolist()
    capsys.readouterr()
    assert main(["--connect", ep, "--adapter", str(tmp_path / "adapter"), "--prompt-ids", "5 6 7",
                 "--max-new-tokens", "5"]) == 0  # fmt: skip
    assert capsys.readouterr().out.split() == [str(t) for t in want]
    tokdir = _word_tokenizer(str(tmp_path / "tok"))
    assert main(["--connect", ep, "--adapter", str(tmp_path / "adapter"), "--prompt", "w5 w6 w7",
                 "--max-new-tokens", "5", "--tokenizer", tokdir]) == 0  # fmt: skip
    assert capsys.readouterr().out.split() == ["w5", "w6", "w7", *(f"w{t}" for t in want)]
    assert main(["--connect", ep, "--prompt", "w5 w6"]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
