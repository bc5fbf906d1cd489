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
