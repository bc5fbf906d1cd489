"""Session admission as a pure verdict: a Hello in; admit, wait or refuse out."""

from __future__ import annotations

import pytest

from manager.admission import Admission, Admit, Refuse, Wait
from manager.scheduler import Scheduler
from manager.sessions import Session, checkpoint_dir
from menos.cut import Cut
from menos.estimator import estimate, with_margin
from menos.messages import (PROTOCOL_VERSION, ErrorCode, Hello, LoraSpec, PrefixSpec, Recipe, Schedule, SessionState,
                            TokenKind)
from menos.models import builtin_config

CFG = builtin_config()


class _Proc:
    pid = 0


def _admission(capacity=1 << 40, vanilla=False, steps=None, max_clients=4):
    s = Scheduler(capacity)
    steps = steps or {}
    return Admission(config=CFG, elem_bytes=4, check=s.check, room_for=s.room_for, state_dir="/state",
                     max_clients=max_clients, vanilla=vanilla, block_bytes=lambda blocks: 1000 * len(blocks),
                     steps_of=lambda d: steps.get(d, []))  # fmt: skip


def _session(identity, state=SessionState.IDLE):
    s = Session("sid", b"c", Hello(), Cut(6, 1, 0), 1, 2, _Proc(), identity=identity)
    s.state = state
    return s


def test_admits_with_the_estimated_tokens_and_the_cut():
    v = _admission().admit(Hello(head_layers=2, tail_layers=1, batch_size=2, seq_len=64), None, [], False)
    est = estimate(CFG, 2, 1, 2, 64, 4)
    assert v == Admit("", Cut(6, 2, 1), with_margin(est.m_f), with_margin(est.m_b), -1)


@pytest.mark.parametrize("hello, connected, code, text", [
    (Hello(), True, ErrorCode.BAD_REQUEST, "already has a session"),
    (Hello(protocol=PROTOCOL_VERSION + 1), False, ErrorCode.BAD_REQUEST, "protocol"),
    (Hello(seq_len=513), False, ErrorCode.BAD_REQUEST, "seq_len in 1..512"),
    (Hello(batch_size=0), False, ErrorCode.BAD_REQUEST, "batch_size"),
    (Hello(head_layers=3, tail_layers=3), False, ErrorCode.BAD_REQUEST, "no block for the server"),
    (Hello(batch_size=1 << 20), False, ErrorCode.TOO_LARGE, "capacity"),
    # what a client library would refuse, sent raw: the server says so too
    (Hello(adapter=LoraSpec(r=0)), False, ErrorCode.BAD_REQUEST, "rank must be positive"),
    (Hello(adapter=PrefixSpec(num_virtual_tokens=0)), False, ErrorCode.BAD_REQUEST, "num_virtual_tokens"),
    (Hello(adapter=LoraSpec(target_modules=("nope",))), False, ErrorCode.BAD_REQUEST, "match no Linear"),
    (Hello(recipe=Recipe(grad_accum_steps=0)), False, ErrorCode.BAD_REQUEST, "grad_accum_steps"),
    (Hello(recipe=Recipe(lr_schedule=Schedule.COSINE)), False, ErrorCode.BAD_REQUEST, "total_steps"),
    (Hello(seq_len=500, adapter=PrefixSpec(num_virtual_tokens=20)), False, ErrorCode.BAD_REQUEST,
     "seq_len in 1..492 with 20 virtual tokens"),
])  # fmt: skip
def test_refusals_say_why(hello, connected, code, text):
    v = _admission(capacity=1 << 30).admit(hello, None, [], connected)
    assert isinstance(v, Refuse) and v.code == code and text in v.message


def test_a_full_server_and_a_taken_identity_are_refused_and_a_closing_one_waits():
    a = _admission(max_clients=2)
    assert "full" in a.admit(Hello(), None, [_session("x"), _session("y")], False).message
    busy = a.admit(Hello(identity="alice"), None, [_session("alice")], False)
    assert isinstance(busy, Refuse) and "identity already" in busy.message
    closing = _session("alice", SessionState.CLOSING)
    assert a.admit(Hello(identity="alice"), None, [closing], False) == Wait(closing)
    # an authenticated key wins over the claimed name
    assert a.admit(Hello(identity="alice"), "KEY", [_session("alice")], False).identity == "KEY"


def test_resume_takes_the_latest_step_both_sides_have():
    a = _admission(steps={checkpoint_dir("/state", "bob"): [3, 6, 9]})
    assert a.admit(Hello(identity="bob", resume_steps=(6, 9, 12)), None, [], False).resume_step == 9
    v = a.admit(Hello(identity="carol", resume_steps=(6,)), None, [], False)
    assert isinstance(v, Refuse) and v.code == ErrorCode.NO_CHECKPOINT
    v = a.admit(Hello(resume_steps=(6,)), None, [], False)
    assert isinstance(v, Refuse) and "needs an identity" in v.message


def test_vanilla_asks_one_token_for_the_whole_task():
    v = _admission(vanilla=True).admit(Hello(), None, [], False)
    task = 1000 * 5 + with_margin(estimate(CFG, 1, 0, 4, 128, 4).m_b)  # 5 server blocks of "1000 bytes"
    assert (v.m_f, v.m_b) == (task, task)  # the worker also loads and profiles under m_b (WorkerSetup.load_nbytes)


def test_standing_memory_that_does_not_fit_is_refused_at_connect():
    est = estimate(CFG, 1, 0, 4, 128, 4)
    s = Scheduler(with_margin(est.m_b) + est.standing + 10)
    a = Admission(config=CFG, elem_bytes=4, check=s.check, room_for=s.room_for, state_dir="/s", max_clients=9)
    assert isinstance(a.admit(Hello(), None, [], False), Admit)
    s.reserve("first", est.standing, with_margin(est.m_b))
    v = a.admit(Hello(), None, [], False)
    assert isinstance(v, Refuse) and v.code == ErrorCode.TOO_LARGE and "standing memory" in v.message


def test_held_gradients_count_in_the_standing_memory():
    """Accumulating or clipping keeps the adapter's gradients between requests."""
    est = estimate(CFG, 1, 0, 4, 128, 4)
    plain = Scheduler(1 << 40)
    room = []
    plain.room_for = lambda standing, m_b: room.append(standing) or True
    for recipe in (Recipe(), Recipe(grad_accum_steps=4), Recipe(max_grad_norm=1.0)):
        Admission(config=CFG, elem_bytes=4, check=plain.check, room_for=plain.room_for, state_dir="/s", max_clients=4,
                  vanilla=False, block_bytes=len, steps_of=lambda d: []).admit(Hello(recipe=recipe), None, [], False)  # fmt: skip
    # accumulating: the accumulated gradients and the backward's copy of them; clipping: the gradients
    assert room == [est.standing, est.standing + 2 * est.adapter_weights, est.standing + est.adapter_weights]
    assert est.adapter_weights > 0


def test_a_codec_the_operator_does_not_allow_is_refused():
    from menos.codecs import Codec

    a = _admission()
    a.codecs = frozenset({Codec.NONE, Codec.BF16})  # --compression-allowed none,bf16
    v = a.admit(Hello(compression=Codec.INT8), None, [], False)
    assert isinstance(v, Refuse) and v.code == ErrorCode.BAD_REQUEST and "'int8' is not allowed here (bf16, none)" in v.message
    assert isinstance(a.admit(Hello(compression=Codec.BF16), None, [], False), Admit)


def test_a_starting_session_stays_starting_while_its_worker_loads_under_a_grant():
    """Until WorkerReady the manager answers the client itself and reads the worker's exit as a
    refusal; the load grant must not make the session look served (a CI run saw worker_died)."""
    s = _session("alice", SessionState.STARTING)
    s.asked(0, TokenKind.LOAD, 0.0)
    assert s.state is SessionState.STARTING
    s.granted(0, 1.0)
    assert s.state is SessionState.STARTING
    s.released(0, 2.0)
    assert s.state is SessionState.STARTING and s.requests == 1 and s.compute_s == 1.0
    s.state = SessionState.IDLE  # WorkerReady
    s.asked(1, TokenKind.FORWARD, 3.0)
    assert s.state is SessionState.WAITING
