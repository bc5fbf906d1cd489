"""The gateway's placement decision (manager.cluster.placement): pure, like the scheduler."""

from __future__ import annotations

from dataclasses import replace

import pytest

from manager.cluster.placement import Demand, ManagerView, Placed, Refused, place, stages
from manager.scheduler import Scheduler
from menos.messages import ErrorCode

GiB = 1 << 30


def view(mid, capacity=10 * GiB, standing=0, clients=0, alive=True, identities=(), largest=0, max_clients=64):
    return ManagerView(mid, f"tcp://h:{mid}", alive, capacity, standing, largest, clients, frozenset(identities),
                       max_clients)  # fmt: skip


SMALL = Demand(m_b=1 * GiB, standing=100 << 20)


def test_the_least_loaded_manager_first_then_the_most_free_memory():
    assert place([view("a", clients=2), view("b", clients=1), view("c", clients=3)], SMALL) == Placed("b", "tcp://h:b")
    tied = [view("a", clients=1, standing=2 * GiB), view("b", clients=1, standing=1 * GiB)]
    assert place(tied, SMALL).manager == "b"


def test_a_burst_is_spread_by_counting_pending_placements():
    managers = [view("a"), view("b")]
    where = []
    for _ in range(4):
        p = place(managers, SMALL)
        where.append(p.manager)
        managers = [m.with_pending(SMALL) if m.id == p.manager else m for m in managers]
    assert sorted(where) == ["a", "a", "b", "b"]


def test_an_identity_goes_where_its_session_is_then_home_then_anywhere():
    managers = [view("a"), view("b", clients=5, identities={"alice"})]
    assert place(managers, SMALL, "alice").manager == "b"  # its session: that manager decides (waits, refuses)
    managers = [view("a"), view("b", clients=5)]
    assert place(managers, SMALL, "alice", home="b").manager == "b"  # its checkpoints are there
    assert place([view("a"), view("b", alive=False)], SMALL, "alice", home="b").manager == "a"  # home is down
    full_home = [view("a"), view("b", capacity=1 * GiB)]
    assert place(full_home, SMALL, "alice", home="b").manager == "a"  # home has no room for it


def test_dead_managers_are_never_chosen():
    assert place([view("a", alive=False), view("b", clients=9)], SMALL).manager == "b"
    verdict = place([view("a", alive=False)], SMALL)
    assert isinstance(verdict, Refused) and verdict.code == ErrorCode.UNREACHABLE and "1 known" in verdict.message


def test_a_client_that_fits_nowhere_is_refused_naming_the_largest_free_capacity():
    managers = [view("a", capacity=4 * GiB, standing=1 * GiB), view("b", capacity=3 * GiB)]
    verdict = place(managers, Demand(m_b=5 * GiB, standing=0))
    assert isinstance(verdict, Refused) and verdict.code == ErrorCode.TOO_LARGE
    assert "largest free capacity in the cluster is 3.0 GiB" in verdict.message and "manager a" in verdict.message


def test_full_managers_are_skipped_and_a_full_cluster_says_so():
    assert place([view("a", clients=2, max_clients=2), view("b", clients=7)], SMALL).manager == "b"
    verdict = place([view("a", clients=2, max_clients=2)], SMALL)
    assert isinstance(verdict, Refused) and verdict.code == ErrorCode.BAD_REQUEST and "full" in verdict.message


@pytest.mark.parametrize("standing,largest,demand", [
    (0, 0, Demand(4 * GiB, 0)), (3 * GiB, 2 * GiB, Demand(1 * GiB, 1 * GiB)), (3 * GiB, 4 * GiB, Demand(1, 1)),
    (1 * GiB, 1 * GiB, Demand(8 * GiB, 1 * GiB + 1)), (0, 0, Demand(10 * GiB, 0)),
])  # fmt: skip
def test_fits_is_the_schedulers_own_rule(standing, largest, demand):
    """A manager the gateway thinks has room admits the client, and the other way round."""
    sched = Scheduler(10 * GiB)
    if standing:
        sched.reserve("other", standing, largest)
    v = view("a", standing=standing, largest=largest)
    assert v.fits(demand) == sched.room_for(demand.standing, demand.m_b)


def test_a_slow_status_read_keeps_a_manager_in_placement_for_a_while(tmp_path, monkeypatch):
    """A live manager whose status read fails (a slow answer under load) keeps its last
    status for STALE_S; after that, or under a new endpoint (restarted), it is out."""
    from manager.cluster import gateway as G
    from menos.messages import Hello, Redirect, Status

    infos = [{"id": "m0", "endpoint": "tcp://127.0.0.1:1", "alive": True, "node": "n", "device": "cpu", "pid": 1}]
    answers = []  # what each status read does: a Status, or raise

    def fake_status(endpoint, **kw):
        result = answers.pop(0) if answers else TimeoutError("no answer")
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(G, "manager_status", fake_status)
    monkeypatch.setattr(G, "REFRESH_S", 3600.0)  # refreshed by hand below
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    gw = G.Gateway("tcp://127.0.0.1:0", str(tmp_path), cfg, 4, lambda: [dict(i) for i in infos])  # read afresh, as from the actors
    try:
        st = Status(model="m", model_type="llama", dtype="float32", device="cpu", shared_bytes=0,
                    capacity=1 << 34, granted=0, queued=0)  # fmt: skip
        answers.append(st)
        gw.refresh()
        hello = Hello(batch_size=2, seq_len=16)
        assert isinstance(gw.hello(hello, ""), Redirect)
        gw.refresh()  # this read fails: the last status serves
        assert isinstance(gw.hello(hello, ""), Redirect)
        monkeypatch.setattr(G, "STALE_S", 0.0)
        gw.refresh()  # failed again, and the last good read is now too old
        assert gw.hello(hello, "").code == ErrorCode.UNREACHABLE
        monkeypatch.setattr(G, "STALE_S", 3600.0)
        answers.append(st)
        gw.refresh()
        infos[0] = {**infos[0], "endpoint": "tcp://127.0.0.1:2"}  # restarted elsewhere: the old status is not its
        gw.refresh()
        assert gw.hello(hello, "").code == ErrorCode.UNREACHABLE
    finally:
        gw.close()


def test_a_restarted_gateway_still_sends_an_identity_home(tmp_path, monkeypatch):
    """Homes live in the cluster's state dir: after a gateway restart, alice goes back to the
    manager holding her checkpoints although another one is less loaded."""
    from transformers import LlamaConfig

    from manager.cluster import gateway as G
    from manager.cluster.homes import FILENAME
    from menos.messages import ClientStatus, Hello, LoraSpec, SessionState, Status

    monkeypatch.setattr(G, "REFRESH_S", 3600.0)  # refreshed by hand below
    infos = [{"id": m, "endpoint": f"tcp://127.0.0.1:{k + 1}", "alive": True, "node": "n", "device": "cpu", "pid": 1}
             for k, m in enumerate(["m0", "m1"])]  # fmt: skip
    busy = {"m0": 0, "m1": 0}  # clients each manager's status shows

    def fake_status(endpoint, **kw):
        mid = next(i["id"] for i in infos if i["endpoint"] == endpoint)
        clients = tuple(ClientStatus(session=f"s{k}", pid=1, identity="", head_layers=1, tail_layers=0,
                                     server_layers=(1, 4), adapter=LoraSpec(), persistent_bytes=0, m_f=0, m_b=1 << 20,
                                     steps=0, state=SessionState.IDLE) for k in range(busy[mid]))  # fmt: skip
        return Status(model="m", model_type="llama", dtype="float32", device="cpu", shared_bytes=0, capacity=1 << 34,
                      granted=0, queued=0, clients=clients)  # fmt: skip

    monkeypatch.setattr(G, "manager_status", fake_status)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    hello = Hello(batch_size=2, seq_len=16)

    def gateway():
        gw = G.Gateway("tcp://127.0.0.1:0", str(tmp_path), cfg, 4, lambda: [dict(i) for i in infos])
        gw.refresh()
        return gw

    gw = gateway()
    try:
        first = gw.hello(hello, "alice").manager
    finally:
        gw.close()
    busy[first] = 3  # her home is now the busier one
    gw = gateway()
    try:
        assert gw.hello(hello, "alice").manager == first
        assert gw.hello(hello, "bob").manager != first  # least loaded, as before
    finally:
        gw.close()
    (tmp_path / FILENAME).write_text("{not json")  # a damaged file: no homes, still serving
    gw = gateway()
    try:
        assert gw.hello(hello, "alice").manager != first
    finally:
        gw.close()


def test_a_stage_is_placed_only_on_managers_holding_its_range():
    managers = [replace(view("a"), blocks=(1, 3)), replace(view("b", clients=3), blocks=(3, 6)),
                replace(view("c", clients=1), blocks=(3, 6))]  # fmt: skip
    assert stages(managers) == [(1, 3), (3, 6)]
    assert place(managers, SMALL, server=(3, 6)).manager == "c"  # the least loaded of the two that hold it
    assert place(managers, SMALL, server=(4, 6)).manager == "c"  # a range inside theirs
    assert place(managers, SMALL, server=(1, 3)).manager == "a"
    dead = [replace(m, alive=False) if m.id == "a" else m for m in managers]
    refused = place(dead, SMALL, server=(1, 3))
    assert refused.code == ErrorCode.UNREACHABLE and "holds blocks 1..2 (2 alive, holding 3..5)" in refused.message
    assert stages(dead) == [(3, 6)]


def test_a_gateway_of_stages_answers_a_chain_then_places_each_stage_by_itself(tmp_path, monkeypatch):
    """A Hello for the whole range gets the stages' ranges; a Hello for one stage's range a
    redirect to the least loaded live manager holding it; an identity has a home per stage."""
    from transformers import LlamaConfig

    from manager.cluster import gateway as G
    from menos.messages import Chain, Hello, Redirect, Status

    monkeypatch.setattr(G, "REFRESH_S", 3600.0)  # refreshed by hand below
    blocks = {"m0": (1, 2), "m1": (2, 4), "m2": (1, 2), "m3": (2, 4)}  # --stages 2 over 4 managers
    infos = [{"id": m, "endpoint": f"tcp://127.0.0.1:{k + 1}", "alive": True, "node": "n", "device": "cpu", "pid": 1}
             for k, m in enumerate(blocks)]  # fmt: skip

    def fake_status(endpoint, **kw):
        mid = next(i["id"] for i in infos if i["endpoint"] == endpoint)
        return Status(model="m", model_type="llama", dtype="float32", device="cpu", shared_bytes=0, capacity=1 << 34,
                      granted=0, queued=0, layers=4, blocks=blocks[mid])  # fmt: skip

    monkeypatch.setattr(G, "manager_status", fake_status)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    gw = G.Gateway("tcp://127.0.0.1:0", str(tmp_path), cfg, 4, lambda: [dict(i) for i in infos],
                   stages=((1, 2), (2, 4)))  # fmt: skip
    try:
        gw.refresh()
        whole = gw.hello(Hello(batch_size=2, seq_len=16), "alice")
        assert whole == Chain(layers=4, ranges=((1, 2), (2, 4)))
        first = gw.hello(Hello(batch_size=2, seq_len=16, head_layers=1, tail_layers=2), "alice")
        second = gw.hello(Hello(batch_size=2, seq_len=16, head_layers=2, tail_layers=0), "alice")
        assert isinstance(first, Redirect) and blocks[first.manager] == (1, 2)
        assert isinstance(second, Redirect) and blocks[second.manager] == (2, 4)
        other = gw.hello(Hello(batch_size=2, seq_len=16, head_layers=2, tail_layers=0), "bob")
        assert blocks[other.manager] == (2, 4) and other.manager != second.manager  # spread (pending counts)
        again = gw.hello(Hello(batch_size=2, seq_len=16, head_layers=2, tail_layers=0), "alice")
        assert again.manager == second.manager  # home, for this stage
        infos[[i["id"] for i in infos].index(second.manager)]["alive"] = False  # its manager dies
        moved = gw.hello(Hello(batch_size=2, seq_len=16, head_layers=2, tail_layers=0), "alice")
        assert moved.manager == other.manager  # the survivor of that range
        infos[[i["id"] for i in infos].index(other.manager)]["alive"] = False  # and the survivor dies too
        gone = gw.hello(Hello(batch_size=2, seq_len=16, head_layers=2, tail_layers=0), "alice")
        assert gone.code == ErrorCode.UNREACHABLE and "holds blocks 2..3" in gone.message
        assert gw.hello(Hello(batch_size=2, seq_len=16), "carol") == whole  # the chain is still the configured one
        assert gw.status()["managers"][0]["blocks"] == [1, 2]
    finally:
        gw.close()
