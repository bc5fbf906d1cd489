"""Worker slots (manager.parking): who parks, when, and what a request does while its session wakes.
Pure: no sockets, no processes."""

from __future__ import annotations

import random

import pytest

from manager.parking import Park, Route, Start, WorkerSlots, after_parking, route
from menos.vocabulary import SessionState as S


def anyone(sid: str) -> bool:
    return True


def test_without_a_cap_every_session_starts_at_once_and_nothing_parks_without_park_after():
    slots = WorkerSlots()
    assert not slots.parks
    assert [slots.want(s, 0.0, anyone) for s in "abc"] == [[Start("a")], [Start("b")], [Start("c")]]
    assert slots.tick(1e9, anyone) == []


def test_a_session_idle_for_park_after_parks_once_and_a_busy_one_does_not():
    slots = WorkerSlots(park_after=10.0)
    slots.want("a", 0.0, anyone)
    slots.want("b", 0.0, anyone)
    slots.touched("b", 5.0)
    assert slots.tick(9.9, anyone) == []
    busy = {"a"}
    assert slots.tick(10.0, lambda s: s not in busy) == []  # a holds a grant: not now
    assert slots.tick(10.0, anyone) == [Park("a")]
    assert slots.tick(20.0, anyone) == [Park("b")]  # a is parking already: asked once
    assert len(slots.live) == 2  # the parking workers hold their slots until they exit
    slots.exited("a", 21.0, anyone)
    assert list(slots.live) == ["b"]


def test_the_cap_queues_a_request_and_parks_the_least_recently_used_idle_session():
    slots = WorkerSlots(max_workers=2)
    slots.want("a", 0.0, anyone)
    slots.want("b", 1.0, anyone)
    slots.touched("a", 2.0)  # b is now the least recently used
    assert slots.want("c", 3.0, anyone) == [Park("b")]
    assert slots.queued_s("c", 4.5) == 1.5
    assert slots.exited("b", 5.0, anyone) == [Start("c")]
    assert list(slots.live) == ["a", "c"]


def test_a_session_that_cannot_park_is_passed_over_and_the_request_waits_if_none_can():
    slots = WorkerSlots(max_workers=2)
    slots.want("a", 0.0, anyone)
    slots.want("b", 1.0, anyone)
    computing = {"a", "b"}
    idle = lambda s: s not in computing  # noqa: E731
    assert slots.want("c", 2.0, idle) == []  # both compute: c waits
    computing.discard("b")  # b's compute ended; the next event looks again
    assert slots.tick(3.0, idle) == [Park("b")]


def test_a_worker_that_declines_is_not_asked_again_until_its_client_sends_something():
    slots = WorkerSlots(max_workers=1, park_after=1.0)
    slots.want("a", 0.0, anyone)
    assert slots.want("b", 1.0, anyone) == [Park("a")]
    assert slots.declined_to_park("a", 1.1, anyone) == []  # a kept forward: nobody else to park, b waits
    assert slots.tick(100.0, anyone) == []
    slots.touched("a", 101.0)  # its backward came
    assert slots.tick(101.5, anyone) == [Park("a")]
    assert slots.exited("a", 102.0, anyone) == [Start("b")]


def test_each_waiter_parks_one_session_and_waiters_start_first_come_first_served():
    slots = WorkerSlots(max_workers=3)
    for i, s in enumerate("abc"):
        slots.want(s, float(i), anyone)
    assert slots.want("x", 10.0, anyone) == [Park("a")]
    assert slots.want("y", 11.0, anyone) == [Park("b")]
    assert slots.exited("b", 12.0, anyone) == [Start("x")]  # the first to come, whoever's slot freed
    assert slots.exited("a", 13.0, anyone) == [Start("y")]


def test_a_session_that_ends_leaves_the_queue_and_frees_its_slot():
    slots = WorkerSlots(max_workers=1)
    computing = lambda s: False  # noqa: E731  a computes throughout
    slots.want("a", 0.0, computing)
    slots.want("b", 1.0, computing)
    slots.want("c", 2.0, computing)
    assert slots.forget("b", 3.0, computing) == []  # b's client gave up waiting
    assert slots.forget("a", 4.0, computing) == [Start("c")]
    with pytest.raises(ValueError, match="already"):
        slots.want("c", 5.0, anyone)


def test_a_waiter_whose_memory_does_not_fit_waits_those_behind_it_that_fit_pass_and_idle_sessions_park():
    slots = WorkerSlots(max_workers=3)
    room = {"b": False}
    slots.fits = lambda sid: room.get(sid, True)
    slots.want("a", 0.0, anyone)
    assert slots.want("b", 1.0, anyone) == [Park("a")]  # a free slot, but b's standing memory does not fit
    assert slots.want("c", 2.0, anyone) == [Start("c")]  # c's fits: it does not wait behind b
    assert list(slots.waiting) == ["b"]
    room["b"] = True  # a's standing memory came back
    assert slots.exited("a", 3.0, anyone) == [Start("b")]


@pytest.mark.parametrize("seed", range(5))
def test_the_cap_holds_under_any_sequence_of_events(seed):
    """Random wants, touches, declines, exits of parked workers and ends: never more than N live
    workers, never a session both live and waiting, nobody waits while a slot is free, and
    while waiters outnumber the parking, every idle session not yet asked is asked."""
    rng = random.Random(seed)
    slots = WorkerSlots(max_workers=3, park_after=rng.choice([0.0, 2.0]))
    busy: set[str] = set()
    parkable = lambda s: s not in busy  # noqa: E731
    parking: set[str] = set()
    now = 0.0
    for _ in range(400):
        now += rng.random()
        sid = f"s{rng.randrange(8)}"
        event = rng.randrange(6)
        if event == 0 and sid not in slots.live and sid not in slots.waiting:
            out = slots.want(sid, now, parkable)
        elif event == 1:
            slots.touched(sid, now)
            busy.symmetric_difference_update({sid})
            out = slots.tick(now, parkable)
        elif event == 2 and parking:
            out = slots.exited(parking.pop(), now, parkable)
        elif event == 3:
            parking.discard(sid)
            out = slots.forget(sid, now, parkable)
        elif event == 4 and parking:
            out = slots.declined_to_park(parking.pop(), now, parkable)
        else:
            out = slots.tick(now, parkable)
        for d in out:
            if isinstance(d, Park):
                assert d.sid in slots.live and d.sid not in busy and d.sid not in parking
                parking.add(d.sid)
            else:
                assert d.sid in slots.live
        assert len(slots.live) <= 3
        assert not set(slots.live) & set(slots.waiting)
        assert not slots.waiting or len(slots.live) == 3
        if len(slots.waiting) > len(slots.parking):
            assert not [s for s in slots.live if s not in slots.parking and s not in slots.declined and parkable(s)]


@pytest.mark.parametrize("state", [S.IDLE, S.WAITING, S.COMPUTING, S.HOLDING, S.GENERATING, S.CLOSING])
def test_a_request_to_a_session_with_a_worker_goes_to_it(state):
    assert route(state, goodbye=False, generation_end=False, held=0) is Route.FORWARD
    assert route(state, goodbye=True, generation_end=False, held=0) is Route.FORWARD


def test_a_request_while_its_session_parks_or_wakes_is_held_and_a_parked_one_wakes_for_it():
    for state in (S.PARKING, S.WAKING):
        assert route(state, goodbye=False, generation_end=False, held=0) is Route.HOLD
        assert route(state, goodbye=True, generation_end=False, held=1) is Route.HOLD  # after what came first
    assert route(S.PARKED, goodbye=False, generation_end=False, held=0) is Route.WAKE


def test_a_goodbye_ends_a_parked_session_without_waking_it_and_a_generation_end_is_dropped():
    assert route(S.PARKED, goodbye=True, generation_end=False, held=0) is Route.END
    for state in (S.PARKED, S.PARKING, S.WAKING):
        assert route(state, goodbye=False, generation_end=True, held=0) is Route.DROP
    # ... unless a generation's prompt is held: its end follows it
    assert route(S.WAKING, goodbye=False, generation_end=True, held=1) is Route.HOLD


def test_requests_held_while_parking_wake_the_session_once_parked_unless_the_first_is_a_goodbye():
    assert after_parking(held_goodbye_first=False, held=0) is None
    assert after_parking(held_goodbye_first=False, held=2) is Route.WAKE
    assert after_parking(held_goodbye_first=True, held=1) is Route.END
