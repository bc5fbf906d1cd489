"""Memory the scheduler does not own: device readings as scheduler events, exclusive
retries, refusals, and the size buckets' equivalence with a plain FCFS scan. Pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manager.scheduler import Grant, Refusal, Scheduler


def _keys(decisions):
    return [(d.owner, d.request_id) for d in decisions]


def test_a_burst_never_gets_more_than_the_reading():
    """Cap 10, three requests of 5: the old snapshot cap granted all three (15)."""
    s = Scheduler(100)
    s.device_free(10)
    assert s.request("a", 1, 5) == [Grant("a", 1, 5)]
    assert s.request("b", 1, 5) == [Grant("b", 1, 5)]
    assert s.request("c", 1, 5) == []  # the reading still shows 10 free: a and b are not allocated yet
    # the next reading still shows them free (not allocated yet): they stay charged against it
    assert s.device_free(10) == []
    assert s.release("a", 1) == [Grant("c", 1, 5)]  # a returned its memory: credited


def test_a_head_blocked_by_outside_use_is_granted_when_a_reading_shows_room():
    s = Scheduler(100)
    s.device_free(3)
    assert s.request("a", 1, 20) == []  # fits the capacity, not the device
    assert s.device_free(10) == []
    assert s.device_free(30) == [Grant("a", 1, 20)]  # no message needed, only the reading


def test_easy_backfilling_gives_no_free_pass_while_outside_use_blocks_the_head():
    s = Scheduler(100, backfill="easy")
    s.device_free(10)
    s.request("big", 1, 50, expected_s=1.0)
    # a short request would "end before the head's start" if the head waited for grants;
    # it waits for outside use, of unknown duration
    assert s.request("small", 1, 5, expected_s=0.001) == []
    assert s.device_free(100) == [Grant("big", 1, 50), Grant("small", 1, 5)]


def test_an_exclusive_request_waits_to_be_alone_and_gets_all_that_is_free():
    s = Scheduler(100)
    s.device_free(80)
    s.request("a", 1, 30)
    assert s.request("r", 1, 20, exclusive=True) == []  # room for it, but not alone
    assert s.request("b", 1, 10) == []  # FCFS: nothing passes it
    got = s.release("a", 1)
    assert got[0] == Grant("r", 1, 80)  # alone: everything the device has free (not the capacity)
    assert got[1:] == []
    assert s.release("r", 1) == [Grant("b", 1, 10)]


def test_an_exclusive_retry_never_waits_for_memory_that_cannot_come_back():
    """The old retry asked for the whole capacity; with worker contexts holding part of the
    device for good, free memory never reached it and the retry blocked everyone."""
    s = Scheduler(100)
    s.device_free(70)  # 30 held by CUDA contexts for good
    s.request("a", 1, 40)
    s.request("r", 1, 40, exclusive=True)
    s.request("b", 1, 10)
    got = s.release("a", 1)
    assert got == [Grant("r", 1, 70)]
    assert s.release("r", 1) == [Grant("b", 1, 10)]


def test_exclusive_heads_reclaim_every_reclaimable_holder():
    s = Scheduler(100)
    s.request("p", 1, 10)
    s.request("q", 1, 10)
    s.set_reclaimable("p", 1)
    s.set_reclaimable("q", 1)
    s.request("r", 1, 10, exclusive=True)
    assert sorted(s.to_reclaim()) == [("p", 1), ("q", 1)]  # it fits, but must be alone


def test_a_head_that_outside_use_keeps_out_is_refused_after_the_timeout():
    s = Scheduler(100, give_up_s=5)
    s.device_free(10)
    s.request("a", 1, 50, now=0.0)
    s.request("b", 1, 5, now=0.1)
    assert s.device_free(10, now=4.0) == []
    got = s.device_free(10, now=6.0)
    assert isinstance(got[0], Refusal) and (got[0].owner, got[0].request_id) == ("a", 1)
    assert "other programs" in got[0].reason
    assert got[1:] == [Grant("b", 1, 5)]  # the next head goes on


def test_no_refusal_while_grants_are_outstanding():
    s = Scheduler(100, give_up_s=5)
    s.request("a", 1, 60)
    s.request("b", 1, 60, now=0.0)  # waits for a, however long
    assert s.device_free(100, now=100.0) == []
    assert s.release("a", 1, now=101.0) == [Grant("b", 1, 60)]


# ---------------------------------------------------------------- properties

_ops = st.lists(
    st.tuples(st.sampled_from(["req", "req", "rel", "read", "drop", "excl"]), st.integers(0, 4), st.integers(1, 100)),
    max_size=150,
)


@settings(max_examples=300, deadline=None)
@given(_ops, st.sampled_from(["fcfs", "easy"]))
def test_readings_bound_what_is_granted_and_memory_coming_back_serves_everyone(ops, backfill):
    s = Scheduler(100, backfill, give_up_s=float("inf"))
    held, rid, reading, held_at_reading = [], 0, None, 0
    for now, (op, owner, size) in enumerate(ops):
        if op in ("req", "excl"):
            rid += 1
            got = s.request(f"c{owner}", rid, size, now, 1.0, exclusive=op == "excl")
        elif op == "rel" and held:
            got = s.release(*held.pop(size % len(held)), now)
        elif op == "drop":
            got = s.drop_owner(f"c{owner}", now)
            held = [k for k in held if k[0] != f"c{owner}"]
        elif op == "read":
            held_at_reading, reading = s.used, size
            got = s.device_free(size, now)
        else:
            continue
        assert not any(isinstance(d, Refusal) for d in got)
        held += _keys(got)
        assert s.used == sum(e.nbytes for e in s.granted.values()) <= s.capacity
        if reading is not None:
            assert s.used <= reading + held_at_reading
        assert sorted(held) == sorted(s.granted)
        assert all(e.exclusive is False or len(s.granted) == 1 for e in s.granted.values())
    # memory returns (everything released, the device shows all of it free): nobody waits
    got = s.device_free(s.capacity, len(ops))
    held += _keys(got)
    for _ in range(10_000):
        if not s.waiting:
            break
        got = s.release(*held.pop(0)) if held else s.device_free(s.capacity)
        held += _keys(got)
    assert not s.waiting


def _reference_fcfs(capacity, ops):
    """Algorithm 2 as a plain scan over the waiting list: what the size buckets must equal."""
    waiting, granted, used, out = [], {}, 0, []
    for op, key, size in ops:
        if op == "req":
            waiting.append((key, size))
        elif op == "rel" and key in granted:
            used -= granted.pop(key)
        else:
            continue
        made = []
        if waiting and waiting[0][1] <= capacity - used:
            for k, n in list(waiting):
                if n <= capacity - used:
                    waiting.remove((k, n))
                    granted[k] = n
                    used += n
                    made.append(k)
        out.append(made)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 30), st.sampled_from([5, 10, 25, 40, 60])), max_size=200))
def test_size_buckets_decide_exactly_as_a_scan_of_the_waiting_list(stream):
    ops, rid, live = [], 0, []
    for release, pick, size in stream:
        if release and live:
            ops.append(("rel", live.pop(pick % len(live)), 0))
        else:
            rid += 1
            ops.append(("req", ("c", rid), size))
            live.append(("c", rid))
    s = Scheduler(100)
    mine = []
    for op, key, size in ops:
        if op == "req":
            mine.append(_keys(s.request(key[0], key[1], size)))
        elif key in s.granted:
            mine.append(_keys(s.release(*key)))
    assert mine == _reference_fcfs(100, ops)


def test_a_release_scans_sizes_not_requests():
    """1024 waiting in two sizes: a release that lets the head in looks at the two buckets."""
    s = Scheduler(1000)
    s.request("blocker", 0, 1000)
    s.request("head", 0, 600)
    for i in range(1022):
        s.request(f"c{i}", 0, 100 if i == 1021 else 500)
    assert len(s._buckets) == 3  # noqa: SLF001
    got = s.release("blocker", 0)
    assert _keys(got) == [("head", 0), ("c1021", 0)]


@pytest.mark.parametrize("backfill", ["fcfs", "easy"])
def test_preserve_is_never_granted_to_an_exclusive_request(backfill):
    s = Scheduler(100, backfill)
    got = s.request("a", 1, 10, preserve_nbytes=20, exclusive=True)
    assert got == [Grant("a", 1, 100)]  # alone, no reading: the whole capacity


def test_standing_memory_is_held_for_a_session_and_returned_when_it_ends():
    from manager.scheduler import TooLarge

    s = Scheduler(100)
    s.reserve("a", 30, token=40)
    assert s.room_for(20, 40) and not s.room_for(31, 40)  # 30 + 31 + 40 > 100
    with pytest.raises(TooLarge, match="standing memory"):
        s.reserve("b", 10, token=61)  # a's and b's standing would leave no room for b's token
    with pytest.raises(TooLarge, match="standing memory"):
        s.request("a", 1, 71)  # could never fit beside the standing memory
    assert s.request("a", 2, 70) == [Grant("a", 2, 70)]
    s.drop_owner("a")
    assert s.standing_total == 0 and s.free == 100
