import random

import pytest

from manager.scheduler import Grant, Scheduler, TooLarge


def test_grants_in_arrival_order_while_they_fit():
    s = Scheduler(10)
    assert s.request("a", 1, 4) == [Grant("a", 1, 4)]
    assert s.request("b", 1, 4) == [Grant("b", 1, 4)]
    assert s.request("c", 1, 4) == []  # 2 bytes left
    assert s.release("a", 1) == [Grant("c", 1, 4)]
    assert s.used == 8


def test_backfills_behind_a_fitting_head_but_not_behind_a_blocked_one():
    s = Scheduler(10)
    s.request("a", 1, 6)
    assert s.request("big", 1, 8) == []  # head of the queue, does not fit
    assert s.request("small", 1, 2) == []  # would fit, but must not pass the blocked head
    assert s.release("a", 1) == [Grant("big", 1, 8), Grant("small", 1, 2)]  # head, then backfill


def test_backfill_skips_a_later_request_that_does_not_fit():
    s = Scheduler(10)
    s.request("a", 1, 5)
    s.request("b", 1, 6)  # waits
    s.request("c", 1, 6)  # waits
    s.request("d", 1, 3)  # waits behind b
    assert s.release("a", 1) == [Grant("b", 1, 6), Grant("d", 1, 3)]  # c does not fit, d is backfilled


def test_impossible_request_is_refused_not_queued():
    s = Scheduler(10)
    with pytest.raises(TooLarge):
        s.request("a", 1, 11)
    assert not s.waiting and not s.granted


def test_drop_owner_reclaims_grants_and_queue():
    s = Scheduler(10)
    s.request("dead", 1, 8)
    s.request("dead", 2, 8)
    s.request("alive", 1, 5)
    assert s.drop_owner("dead") == [Grant("alive", 1, 5)]
    assert s.used == 5 and list(s.waiting) == []


def test_release_of_unknown_grant_raises():
    with pytest.raises(KeyError):
        Scheduler(10).release("x", 1)


def test_random_traffic_never_exceeds_capacity_and_everyone_is_served():
    rng = random.Random(0)
    s = Scheduler(100)
    held, served, asked = [], 0, 0
    for step in range(5000):
        if held and rng.random() < 0.5:
            for g in s.release(*held.pop(rng.randrange(len(held)))):
                held.append((g.owner, g.request_id))
                served += 1
        else:
            asked += 1
            for g in s.request(f"c{rng.randrange(8)}", step, rng.randint(1, 100)):
                held.append((g.owner, g.request_id))
                served += 1
        assert s.used <= s.capacity
    while held:
        for g in s.release(*held.pop()):
            held.append((g.owner, g.request_id))
            served += 1
    assert served == asked and not s.waiting


# ---------------------------------------------------------------- properties (hypothesis)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ops = st.lists(
    st.tuples(st.sampled_from(["req", "rel", "drop"]), st.integers(0, 5), st.integers(1, 100), st.floats(0, 5)),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(_ops, st.sampled_from(["fcfs", "easy"]))
def test_grants_never_exceed_capacity_and_accounting_is_exact(ops, backfill):
    s = Scheduler(100, backfill)
    held, rid = [], 0
    for now, (op, owner, size, dur) in enumerate(ops):
        if op == "req":
            rid += 1
            got = s.request(f"c{owner}", rid, size, now, dur)
        elif op == "rel" and held:
            got = s.release(*held.pop(size % len(held)), now)
        elif op == "drop":
            got = s.drop_owner(f"c{owner}", now)
            held = [k for k in held if k[0] != f"c{owner}"]
        else:
            continue
        held += [(g.owner, g.request_id) for g in got]
        assert s.used == sum(e.nbytes for e in s.granted.values()) <= s.capacity
        assert sorted(held) == sorted(s.granted)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 30)), min_size=1, max_size=300), st.integers(0, 20))
def test_a_large_request_is_not_starved_by_small_ones(stream, big_at):
    """FCFS: while the large request heads the queue, nothing passes it; it is served once
    what was granted before it is released."""
    s = Scheduler(100)
    held, rid, big = [], 0, None
    for i, (release, size) in enumerate(stream):
        if i == big_at:
            rid += 1
            big = ("big", rid)
            held += [(g.owner, g.request_id) for g in s.request("big", rid, 100)]
        big_heads = bool(s.waiting) and next(iter(s.waiting)) == big
        if release and held:
            got = s.release(*held.pop(0))
        else:
            rid += 1
            got = s.request("small", rid, size)
        if big_heads:
            assert [(g.owner, g.request_id) for g in got][:1] in ([], [big])
        held += [(g.owner, g.request_id) for g in got]
    while big in s.waiting:  # releasing what is held serves big, and nothing passes it
        big_heads = next(iter(s.waiting)) == big
        got = s.release(*held.pop(0))
        if big_heads:
            assert [(g.owner, g.request_id) for g in got][:1] in ([], [big])
        held += [(g.owner, g.request_id) for g in got]


def test_easy_backfills_only_what_cannot_delay_the_head():
    s = Scheduler(10, backfill="easy")
    s.request("a", 1, 6, now=0, expected_s=10)  # running until t=10
    assert s.request("head", 1, 8, now=1, expected_s=5) == []  # shadow time 10; 2 bytes extra then
    assert s.request("short", 1, 4, now=2, expected_s=3) == [Grant("short", 1, 4)]  # ends at 5 <= 10
    s.release("short", 1, now=5)
    assert s.request("long", 1, 4, now=6, expected_s=50) == []  # would still run at 10 and needs 4 > 2
    assert s.request("tiny", 1, 2, now=6, expected_s=50) == [Grant("tiny", 1, 2)]  # fits the extra
    assert s.release("a", 1, now=10) == [Grant("head", 1, 8)]
    fcfs = Scheduler(10)
    fcfs.request("a", 1, 6)
    fcfs.request("head", 1, 8)
    assert fcfs.request("short", 1, 4) == []


def test_reclaim_names_idle_holders_only_when_that_lets_the_head_in():
    s = Scheduler(10)
    s.request("p1", 1, 4, now=0)
    s.request("p2", 1, 4, now=1)
    s.set_reclaimable("p1", 1)
    assert s.request("b", 1, 10, now=2) == []
    assert s.to_reclaim() == []  # p1's 4 bytes would not let b in: keep its activations
    s.set_reclaimable("p2", 1)
    assert s.to_reclaim() == [("p1", 1), ("p2", 1)]


def test_reclaim_picks_oldest_reclaimable_and_not_twice():
    s = Scheduler(10)
    s.request("p1", 1, 4, now=0)
    s.request("p2", 1, 4, now=1)
    s.set_reclaimable("p1", 1)
    s.set_reclaimable("p2", 1)
    assert s.request("b", 1, 8, now=2) == []  # free 2, short 6: needs both
    assert s.to_reclaim() == [("p1", 1), ("p2", 1)]
    assert s.to_reclaim() == []  # already asked
    s.release("p1", 1)
    assert s.release("p2", 1) == [Grant("b", 1, 8)]


def test_reclaim_prefers_idle_holders_to_busy_ones_and_a_busy_mark_keeps_a_reclaim():
    s = Scheduler(10)
    s.request("v1", 1, 4, now=0)  # vanilla tasks: resident grants, reclaimable throughout
    s.request("v2", 1, 4, now=1)
    s.set_reclaimable("v1", 1, busy=True)  # older, but in an iteration: it would leave late
    s.set_reclaimable("v2", 1)
    assert s.request("b", 1, 5, now=2) == []  # free 2, short 3: one task must go
    assert s.to_reclaim() == [("v2", 1)]
    s.set_reclaimable("v2", 1, busy=True)  # its next iteration began before the Reclaim arrived
    assert s.to_reclaim() == []  # the Reclaim already sent still stands: nothing more is asked
    assert s.release("v2", 1) == [Grant("b", 1, 5)]
