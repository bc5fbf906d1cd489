"""A chain of managers (``--blocks A:B`` each): the client relays between stages, and the chain
trains, scores, generates, exports and resumes as one manager serving the whole range would."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import peft
import pytest
import torch

import menos
from manager.sessions import checkpoint_dir
from manager.status_view import as_dict, table
from menos import checkpoint
from menos.chain import Serves, plan, split_range, stage_of
from menos.messages import ErrorCode, IA3Spec, LoraSpec
from menos.models import load_base
from tools.harness import ManagerProcess

# The tiny Llama has 4 blocks; the client keeps block 0 (head_layers=1, tail_layers=0).
RANGES = {"1:3": (1, 3), "3:4": (3, 4), "1:2": (1, 2), "2:3": (2, 3)}
CHAINS = {2: ("1:3", "3:4"), 3: ("1:2", "2:3", "3:4")}
ADAPTERS = {"lora": LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")), "ia3": IA3Spec()}
# Clipping that bites (the global norm is above 0.05 at every step here) and accumulation over 2.
CLIENT = dict(batch_size=2, seq_len=16, lr=1e-2, seed=5, max_grad_norm=0.05, grad_accum_steps=2)
STEPS = 20


def _batch(i: int) -> torch.Tensor:
    """One of 4 batches, in turn."""
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 + i % 4))


@pytest.fixture(scope="module")
def stages(tmp_path_factory, checkpoints):
    """blocks "A:B" -> a manager serving only those blocks of the tiny Llama, started side by side."""
    path = checkpoints("llama")

    def start(blocks: str) -> ManagerProcess:
        return ManagerProcess(str(tmp_path_factory.mktemp(f"stage-{blocks.replace(':', '-')}")), "--model", path,
                              "--blocks", blocks)  # fmt: skip

    with ThreadPoolExecutor(len(RANGES)) as pool:
        started = dict(zip(RANGES, pool.map(start, RANGES)))
    yield started
    for m in started.values():
        m.stop()


def _chain(stages, k: int) -> list[str]:
    return [stages[b].endpoint for b in CHAINS[k]]


def _train(endpoint, adapter: str, steps: int = STEPS, **kwargs) -> tuple[list[float], float]:
    """Losses of ``steps`` train steps, then the eval loss of batch 0."""
    with menos.connect(endpoint, adapter=ADAPTERS[adapter], **{**CLIENT, **kwargs}) as c:
        losses = [c.train_step(_batch(i)) for i in range(steps)]
        return losses, c.eval_step(_batch(0))


_reference: dict[str, tuple[list[float], float]] = {}


def _one_manager(shared_manager, adapter: str) -> tuple[list[float], float]:
    """The same session on one manager serving blocks 1..3 (run once per adapter)."""
    if adapter not in _reference:
        _reference[adapter] = _train(shared_manager("llama").endpoint, adapter)
    return _reference[adapter]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_a_chain_trains_with_the_losses_of_one_manager(stages, shared_manager, adapter, k):
    losses, eval_loss = _train(_chain(stages, k), adapter)
    want, want_eval = _one_manager(shared_manager, adapter)
    assert losses == pytest.approx(want, abs=1e-6)
    assert eval_loss == pytest.approx(want_eval, abs=1e-6)
    print(f"\n{adapter}, {k} stages: losses {losses[0]:.4f} .. {losses[-1]:.4f}")
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.04  # it learns the 4 batches, clipped as it is


def test_a_compressed_cut_is_compressed_at_every_boundary(stages):
    """bf16 on the wire: half the bytes of fp32 at each of the chain's boundaries, the same training."""
    sent = {}
    for codec in (None, "bf16"):
        with menos.connect(_chain(stages, 3), adapter=ADAPTERS["lora"], compression=codec, **CLIENT) as c:
            losses = [c.train_step(_batch(i)) for i in range(4)]
            sent[codec] = (c.times.bytes_sent[-1], c.times.bytes_received[-1], losses)
    activation = 2 * 16 * 64  # batch x seq x hidden; 3 out and 3 back in each direction at 3 stages
    for codec, elem in ((None, 4), ("bf16", 2)):
        assert 6 * activation * elem <= sent[codec][0] < 6 * activation * elem + 4096
        assert 6 * activation * elem <= sent[codec][1] < 6 * activation * elem + 4096
    assert sent["bf16"][2] == pytest.approx(sent[None][2], rel=1e-2)


def test_a_chain_scores_generates_and_exports_one_adapter(stages, checkpoints, tmp_path):
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(9))
    greedy = dict(max_new_tokens=6, pad_token_id=0)
    with menos.connect(_chain(stages, 3), adapter=ADAPTERS["lora"], **CLIENT) as c:
        assert [s.blocks for s in c.stages] == [(1, 2), (2, 3), (3, 4)]
        assert len({s.session for s in c.stages}) == 3  # a session on each stage
        for i in range(4):
            c.train_step(_batch(i))
        eval_loss = c.eval_step(_batch(0))
        scores = c.logprobs(_batch(0))
        generated = c.generate(ids, **greedy)
        out = c.save_adapter(str(tmp_path / "adapter"))
        assert c.times.bytes_sent[-1] > 3 * 2 * 16 * 64 * 4  # every boundary's activations went out (fp32)
    # The exported adapter holds every stage's part: the whole model with it is the chain.
    _, full = load_base(checkpoints("llama"), torch.float32)
    local = peft.PeftModel.from_pretrained(full, out).eval()
    with torch.no_grad():
        labels = _batch(0)
        logits = local(labels).logits
        assert local(labels, labels=labels).loss.item() == pytest.approx(eval_loss, abs=1e-5)
        want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:, None])[..., 0]
        assert torch.allclose(scores, want, atol=1e-5)
        assert torch.equal(generated, local.generate(ids, attention_mask=torch.ones_like(ids), **greedy))
    # A new session on the chain from that adapter (another seed) says the same.
    with menos.connect(_chain(stages, 2), init_adapter=out, **{**CLIENT, "seed": 11}) as again:
        assert again.eval_step(_batch(0)) == pytest.approx(eval_loss, abs=1e-5)


def test_a_chain_resumes_from_the_latest_step_every_stage_saved(stages, shared_manager, tmp_path):
    ident = dict(identity="resumer", state_dir=str(tmp_path / "client"))
    want, _ = _one_manager(shared_manager, "lora")
    chain = _chain(stages, 2)
    with menos.connect(chain, adapter=ADAPTERS["lora"], **CLIENT, **ident) as c:  # checkpoints at 10 and 12
        for i in range(12):
            c.train_step(_batch(i))
    # The second stage lost its checkpoint of step 12 (its disk, say): every stage goes back to 10.
    last = checkpoint_dir(stages["3:4"].state_dir, "resumer")
    deadline = time.monotonic() + 30
    while checkpoint.steps(last) != [10, 12] and time.monotonic() < deadline:  # its worker saves 12 as it exits
        time.sleep(0.05)
    assert checkpoint.steps(last) == [10, 12]
    checkpoint.remove(last, 12)
    with menos.connect(chain, adapter=ADAPTERS["lora"], resume=True, **CLIENT, **ident) as c:
        assert c.steps == 10
        losses = [c.train_step(_batch(i)) for i in range(10, STEPS)]
    assert losses == pytest.approx(want[10:], abs=1e-6)


def test_a_backward_that_fails_midway_stops_the_chain_until_it_resumes(stages, shared_manager, tmp_path):
    """The last stage took step 11's backward, the first did not answer: nothing more is sent
    (the stages are out of step); a resume restarts both from step 10, with exact losses."""
    from menos.messages import Backward

    ident = dict(identity="stumbler", state_dir=str(tmp_path / "client"))
    want, _ = _one_manager(shared_manager, "lora")
    chain = _chain(stages, 2)
    with menos.connect(chain, adapter=ADAPTERS["lora"], **CLIENT, **ident) as c:
        losses = [c.train_step(_batch(i)) for i in range(10)]
        real, failed = c._exchange, []  # noqa: SLF001

        def first_stage_silent(stage, msg, tensor, expect):
            if isinstance(msg, Backward) and stage is c.stages[0] and not failed:
                failed.append(msg.step)
                raise menos.MenosTimeout("no answer (simulated)")
            return real(stage, msg, tensor, expect)

        c._exchange = first_stage_silent  # noqa: SLF001
        with pytest.raises(menos.MenosTimeout):
            c.train_step(_batch(10))
        with pytest.raises(menos.MenosError, match="blocks 1..2 after the stages behind them took it.*resume=True"):
            c.train_step(_batch(10))
        assert c.steps == 10
    with menos.connect(chain, adapter=ADAPTERS["lora"], resume=True, **CLIENT, **ident) as c:
        assert c.steps == 10
        losses += [c.train_step(_batch(i)) for i in range(10, STEPS)]
    assert losses == pytest.approx(want, abs=1e-6)


def test_chains_that_cannot_serve_a_client_are_named_at_connect(stages, shared_manager):
    def refused(endpoints, **kwargs):
        with pytest.raises(menos.MenosError) as exc:
            menos.connect(endpoints, **{**CLIENT, **kwargs})
        return exc.value

    gap = refused([stages["1:2"].endpoint, stages["3:4"].endpoint])
    assert gap.code == ErrorCode.BAD_REQUEST and "no stage holds blocks 2..2" in str(gap)
    overlap = refused([stages["1:3"].endpoint, stages["2:3"].endpoint, stages["3:4"].endpoint])
    assert "both hold blocks 2..2" in str(overlap)
    other = refused([shared_manager("opt").endpoint, stages["1:2"].endpoint])
    assert other.code == ErrorCode.MODEL_MISMATCH and "same checkpoint" in str(other)
    short = refused([stages["1:2"].endpoint, stages["2:3"].endpoint])
    assert "ends before this client's tail" in str(short)
    outside = refused(_chain(stages, 3), tail_layers=1)
    assert "outside this client's server range 1..2" in str(outside)
    # One stage alone serves only a client whose range is inside its blocks: said by the manager.
    alone = refused(stages["1:3"].endpoint)
    assert alone.code == ErrorCode.BAD_REQUEST and "holds blocks 1..2 (--blocks 1:3)" in str(alone)
    with menos.connect(stages["1:3"].endpoint, **{**CLIENT, "tail_layers": 1}) as c:  # inside: served
        assert c.train_step(_batch(0)) > 0
    st = menos.status(stages["2:3"].endpoint)
    assert (st.layers, st.blocks) == (4, (2, 3)) and st.base_digest == menos.status(stages["3:4"].endpoint).base_digest
    assert "blocks  2..2 of 4 (the server's range: at most these)" in table(st).splitlines()
    assert as_dict(st)["model"]["blocks"] == [2, 3] and as_dict(st)["model"]["layers"] == 4
    assert not st.clients  # every refused connect left no session behind


# ---------------------------------------------------------------- the pure plan


def _serves(*ranges, digest="d"):
    return [Serves(f"ep{a}", "m", 8, (a, b), digest) for a, b in ranges]


def test_plan_orders_stages_and_trims_them_to_the_clients_range():
    got = plan(_serves((4, 8), (1, 4)), head_layers=2, tail_layers=1)
    assert [(s.endpoint, r) for s, r in got] == [("ep1", (2, 4)), ("ep4", (4, 7))]
    assert [r for _, r in plan(_serves((0, 8)), 1, 0)] == [(1, 8)]


@pytest.mark.parametrize("ranges, head, tail, says", [
    ([(1, 3), (4, 8)], 1, 0, "no stage holds blocks 3..3"),
    ([(1, 5), (4, 8)], 1, 0, "both hold blocks 4..4"),
    ([(1, 5)], 1, 0, "ends before this client's tail"),
    ([(2, 8)], 1, 0, "no stage holds blocks 1..1"),
    ([(1, 4), (4, 7), (7, 8)], 1, 1, "outside this client's server range"),
    ([(1, 8)], 4, 4, "leave no block for the server"),
])  # fmt: skip
def test_plan_names_what_is_wrong(ranges, head, tail, says):
    with pytest.raises(menos.MenosError, match=says):
        plan(_serves(*ranges), head, tail)


def test_a_clusters_stages_a_client_does_not_reach_are_left_out():
    ranges = _serves((1, 3), (3, 5), (5, 8))
    assert [r for _, r in plan(ranges, 1, 3, skip_outside=True)] == [(1, 3), (3, 5)]
    assert [r for _, r in plan(ranges, 4, 0, skip_outside=True)] == [(4, 5), (5, 8)]
    with pytest.raises(menos.MenosError, match="outside this client's server range"):
        plan(ranges, 1, 3)  # a list of endpoints names it: the user put it there


def test_plan_refuses_stages_of_different_bases():
    with pytest.raises(menos.MenosError, match="same checkpoint") as exc:
        plan(_serves((1, 4)) + _serves((4, 8), digest="other"), 1, 0)
    assert exc.value.code == ErrorCode.MODEL_MISMATCH


def test_stage_of_finds_a_parameters_block():
    ranges = [(1, 3), (3, 4)]
    assert stage_of("model.layers.2.self_attn.q_proj.lora_A.weight", "model.layers.", ranges) == 0
    assert stage_of("model.layers.3.mlp.down_proj.ia3_l", "model.layers.", ranges) == 1
    assert stage_of("model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.", ranges) is None
    assert stage_of("lm_head.weight", "model.layers.", ranges) is None


def test_a_clusters_stages_split_the_server_range_evenly():
    assert split_range(1, 4, 3) == [(1, 2), (2, 3), (3, 4)]
    assert split_range(1, 24, 4) == [(1, 6), (6, 12), (12, 18), (18, 24)]
    assert split_range(1, 8, 2) == [(1, 4), (4, 8)]
    with pytest.raises(ValueError, match="has 3 blocks"):
        split_range(1, 4, 4)


def test_a_cluster_of_stages_loses_a_stages_manager_and_its_client_resumes_on_the_survivor(tmp_path):
    """`menos-cluster start --stages 2` (2 managers per stage), through the benchmark script: the
    manager of client 0's last stage is killed; it resumes there on the survivor, with the losses
    of an uninterrupted run (the script exits 1 otherwise)."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[cluster]' (make test installs it)")
    import csv

    from benchmarks import chain_faults

    out = tmp_path / "faults.csv"
    assert chain_faults.main(["--stages", "2", "--models", str(tmp_path / "models"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    hit = rows[0]
    assert hit["hit"] == "True" and int(hit["resumed_at_step"]) == 4  # the last step every stage saved
    assert hit["stages_before"].split()[1] != hit["stages_after"].split()[1]  # the dead stage moved
    assert all(r["exact"] == "True" for r in rows)
    assert hit["victim_segments_left"] == "0"  # its restart removed the shared blocks the killed one left
