"""The worker's grant/policy state machine, driven in one process against the real pure
scheduler: events in, actions out, no sockets, no torch."""

from __future__ import annotations

import pytest

from manager.scheduler import Grant, Scheduler
from menos.messages import Policy, TokenKind
from worker.policy import (
    Ask,
    Compute,
    DropGraph,
    DropCache,
    DropKept,
    Fail,
    FreeMemory,
    GrantPolicy,
    Hold,
    Job,
    ProtocolViolation,
    Release,
    Reply,
    SwapIn,
    SwapOut,
)

M_F, M_B = 10, 40


class Cluster:
    """Workers' policies and one scheduler, routed the way the manager and the worker's
    I/O loop route them; computes succeed unless told otherwise."""

    def __init__(self, capacity: int, policy: Policy, n: int = 2, m_b: int = M_B):
        self.scheduler = Scheduler(capacity)
        self.workers = {f"w{i}": GrantPolicy(policy, M_F, m_b) for i in range(n)}
        self.log: dict[str, list] = {w: [] for w in self.workers}
        self.outcome: dict[str, list[str]] = {w: [] for w in self.workers}  # scripted: "oom", "fail"
        self.replies: dict[str, list[str]] = {w: [] for w in self.workers}
        self.kept = {w: False for w in self.workers}  # the engine holds a graph

    def run(self, w: str, actions) -> None:
        for act in actions:
            self.log[w].append(act)
            p = self.workers[w]
            if isinstance(act, Ask):
                self._grants(self.scheduler.request(w, act.request_id, act.nbytes,
                                                    preserve_nbytes=act.preserve_nbytes, exclusive=act.retry))
            elif isinstance(act, Release):
                self._grants(self.scheduler.release(w, act.request_id))
            elif isinstance(act, Hold):
                self.scheduler.set_reclaimable(w, act.request_id, busy=act.busy)
                self._reclaims()
            elif isinstance(act, Compute):
                assert self.scheduler.used <= self.scheduler.capacity
                script = self.outcome[w].pop(0) if self.outcome[w] else "ok"
                if script == "oom":
                    self.run(w, p.out_of_memory())
                elif script == "fail":
                    self.run(w, p.failed())
                else:
                    if p.request.job is not Job.EVAL:  # as the engine: an evaluation leaves a kept forward
                        self.kept[w] = act.keep_graph and p.request.job is Job.FORWARD
                    self.run(w, p.done(0.1))
            elif isinstance(act, SwapIn):
                if self.outcome[w] and self.outcome[w][0] == "swap-fail":
                    self.outcome[w].pop(0)
                    self.run(w, p.failed())
                else:
                    self.run(w, p.swapped_in())
            elif isinstance(act, (DropGraph, DropKept)):
                self.kept[w] = False
            elif isinstance(act, (Reply, Fail)):
                self.replies[w].append(type(act).__name__)

    def _grants(self, decisions) -> None:
        for g in decisions:
            p = self.workers[g.owner]
            self.run(g.owner, p.granted(g.request_id, g.preserve) if isinstance(g, Grant) else p.refused(g.request_id))
        self._reclaims()

    def reading(self, free: int, now: float = 0.0) -> None:
        self._grants(self.scheduler.device_free(free, now))

    def _reclaims(self) -> None:
        for owner, rid in self.scheduler.to_reclaim():
            self.run(owner, self.workers[owner].reclaim(rid))

    def step(self, w: str, job: Job, nbytes: int = 0) -> list:
        start = len(self.log[w])
        self.run(w, self.workers[w].start(job, nbytes))
        return self.log[w][start:]

    def act(self, w: str, actions) -> list:
        start = len(self.log[w])
        self.run(w, actions)
        return self.log[w][start:]


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_on_demand_forward_keeps_nothing_and_backward_recomputes():
    c = Cluster(100, Policy.ON_DEMAND, n=1)
    fwd = c.step("w0", Job.FORWARD)
    assert kinds(fwd) == ["Ask", "Compute", "Release", "Reply"]
    assert fwd[0].nbytes == M_F and fwd[0].kind is TokenKind.FORWARD and fwd[1].keep_graph is False
    bwd = c.step("w0", Job.BACKWARD)
    assert kinds(bwd) == ["Ask", "Compute", "Release", "Reply"]
    assert bwd[0].nbytes == M_B and bwd[0].kind is TokenKind.BACKWARD
    assert c.scheduler.used == 0 and c.workers["w0"].idle


def test_eval_asks_for_a_forward_token_under_every_policy():
    for policy in (Policy.ON_DEMAND, Policy.PRESERVE, Policy.ADAPTIVE):
        c = Cluster(1000, policy, n=1)
        acts = c.step("w0", Job.EVAL)
        assert (acts[0].nbytes, acts[0].kind, acts[0].preserve_nbytes) == (M_F, TokenKind.EVAL, 0), policy
        assert c.scheduler.used == 0


def test_preserve_holds_the_backward_token_from_forward_to_backward():
    c = Cluster(100, Policy.PRESERVE, n=1)
    fwd = c.step("w0", Job.FORWARD)
    assert kinds(fwd) == ["Ask", "Compute", "Reply"] and fwd[0].nbytes == M_B and fwd[1].keep_graph
    assert c.scheduler.used == M_B  # held through the client's round trip
    bwd = c.step("w0", Job.BACKWARD)
    assert kinds(bwd) == ["Compute", "Release", "Reply"]  # no new grant
    assert c.scheduler.used == 0


def test_a_second_forward_supersedes_the_kept_one():
    c = Cluster(100, Policy.PRESERVE, n=1)
    c.step("w0", Job.FORWARD)
    again = c.step("w0", Job.FORWARD)
    assert kinds(again)[:3] == ["DropGraph", "Release", "Ask"]
    assert c.scheduler.used == M_B


def test_adaptive_keeps_activations_while_plentiful_and_drops_them_on_reclaim():
    c = Cluster(100, Policy.ADAPTIVE)  # M_B leaves 60% free: plentiful
    fwd = c.step("w0", Job.FORWARD)
    assert kinds(fwd) == ["Ask", "Compute", "Hold", "Reply"]
    assert fwd[0].preserve_nbytes == M_B and fwd[1].keep_graph
    assert c.scheduler.used == M_B and c.kept["w0"]
    # w1's forward is not plentiful any more (M_B + M_B leaves 20% < 25%): it asks M_F only
    fwd1 = c.step("w1", Job.FORWARD)
    assert fwd1[1].keep_graph is False
    c.scheduler.capacity = 70  # room for w1's backward only if w0's kept grant is reclaimed
    bwd1 = c.step("w1", Job.BACKWARD)
    assert kinds(c.log["w0"][-2:]) == ["DropGraph", "Release"]  # reclaimed
    assert not c.kept["w0"] and c.replies["w1"][-1] == "Reply" and kinds(bwd1)[-1] == "Reply"
    bwd0 = c.step("w0", Job.BACKWARD)  # recomputes under a new M_b grant
    assert kinds(bwd0) == ["Ask", "Compute", "Release", "Reply"] and bwd0[0].nbytes == M_B
    assert c.scheduler.used == 0


def test_a_stale_reclaim_is_ignored():
    c = Cluster(100, Policy.ADAPTIVE, n=1)
    c.step("w0", Job.FORWARD)
    held = c.workers["w0"].held
    c.step("w0", Job.BACKWARD)  # used and released the kept grant
    assert c.workers["w0"].reclaim(held) == []


def test_out_of_memory_retries_once_under_an_exclusive_grant():
    c = Cluster(100, Policy.ON_DEMAND, n=1)
    c.outcome["w0"] = ["oom"]
    acts = c.step("w0", Job.BACKWARD)
    assert kinds(acts) == ["Ask", "Compute", "DropGraph", "FreeMemory", "Release", "Ask", "Compute", "Release", "Reply"]
    retry = acts[5]
    assert retry.retry and retry.nbytes == M_B and retry.kind is TokenKind.BACKWARD  # at least M_b, alone
    assert acts[4].request_id == acts[0].request_id and acts[7].request_id == retry.request_id
    assert c.scheduler.used == 0


def test_a_kept_forward_that_runs_out_of_memory_is_retried_without_keeping():
    c = Cluster(100, Policy.PRESERVE, n=1)
    c.outcome["w0"] = ["oom"]
    acts = c.step("w0", Job.FORWARD)
    assert acts[1].keep_graph and acts[6].keep_graph is False
    assert kinds(acts)[-2:] == ["Release", "Reply"] and c.scheduler.used == 0
    assert kinds(c.step("w0", Job.BACKWARD))[0] == "Ask"  # nothing kept: it asks for M_b


def test_a_second_out_of_memory_fails_the_request_and_releases():
    c = Cluster(100, Policy.ON_DEMAND, n=1)
    c.outcome["w0"] = ["oom", "oom"]
    acts = c.step("w0", Job.FORWARD)
    assert kinds(acts)[-4:] == ["DropKept", "FreeMemory", "Release", "Fail"]  # memory back before the grant
    assert c.scheduler.used == 0 and c.workers["w0"].idle


def test_a_failed_compute_releases_its_grant():
    c = Cluster(100, Policy.ADAPTIVE, n=1)
    c.outcome["w0"] = ["fail"]
    assert kinds(c.step("w0", Job.FORWARD))[-4:] == ["DropKept", "FreeMemory", "Release", "Fail"]
    assert c.scheduler.used == 0 and c.workers["w0"].held is None


def test_events_out_of_order_are_refused():
    p = GrantPolicy(Policy.ON_DEMAND, M_F, M_B)
    with pytest.raises(ProtocolViolation):
        p.granted(1)
    with pytest.raises(ProtocolViolation):
        p.done(0.1)
    (ask,) = p.start(Job.FORWARD)
    with pytest.raises(ProtocolViolation):
        p.start(Job.BACKWARD)  # one request at a time
    with pytest.raises(ProtocolViolation):
        p.granted(ask.request_id + 1)


def test_expected_times_follow_a_running_mean():
    p = GrantPolicy(Policy.ON_DEMAND, M_F, M_B, t_f=1.0, t_b=2.0)
    (ask,) = p.start(Job.FORWARD)
    assert ask.expected_s == 1.0
    p.granted(ask.request_id)
    p.done(2.0)
    (ask,) = p.start(Job.BACKWARD)
    assert ask.expected_s == 2.0  # backwards keep their own mean
    p.granted(ask.request_id)
    p.done(0.0)
    (ask,) = p.start(Job.EVAL)
    assert ask.expected_s == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)


# --------------------------------------------------------------------------- vanilla

TASK = 60


def test_vanilla_task_stays_resident_across_iterations():
    c = Cluster(100, Policy.VANILLA, n=1, m_b=TASK)
    fwd = c.step("w0", Job.FORWARD)
    assert kinds(fwd) == ["Ask", "SwapIn", "Hold", "Compute", "Reply"]
    assert fwd[0].kind is TokenKind.TASK and fwd[0].nbytes == TASK and fwd[2].busy and fwd[3].keep_graph
    bwd = c.step("w0", Job.BACKWARD)
    assert kinds(bwd) == ["Compute", "Hold", "Reply"] and bwd[1].busy is False  # idle now, still resident
    assert kinds(c.step("w0", Job.FORWARD)) == ["Hold", "Compute", "Reply"]  # no swap
    assert c.scheduler.used == TASK


def test_vanilla_reclaim_waits_for_the_open_iteration_then_swaps_out():
    c = Cluster(100, Policy.VANILLA, n=2, m_b=TASK)
    c.step("w0", Job.FORWARD)  # w0 resident, iteration open (graph kept)
    c.step("w1", Job.FORWARD)  # w1 waits: two tasks do not fit; w0 is asked to leave
    assert c.workers["w0"].reclaim_pending and c.workers["w0"].resident is not None
    assert c.replies["w1"] == []
    bwd = c.step("w0", Job.BACKWARD)
    assert kinds(bwd)[:4] == ["Compute", "DropKept", "SwapOut", "Release"]
    assert c.replies["w1"] == ["Reply"]  # w1 swapped in once w0 left
    assert c.workers["w0"].resident is None and c.scheduler.used == TASK


def test_vanilla_idle_task_is_swapped_out_at_once():
    c = Cluster(100, Policy.VANILLA, n=2, m_b=TASK)
    c.step("w0", Job.FORWARD)
    c.step("w0", Job.BACKWARD)  # idle, resident
    acts = c.step("w1", Job.FORWARD)
    assert kinds(c.log["w0"][-3:]) == ["DropKept", "SwapOut", "Release"]
    assert kinds(acts) == ["Ask", "SwapIn", "Hold", "Compute", "Reply"]


def test_vanilla_failed_swap_in_releases_and_fails():
    c = Cluster(100, Policy.VANILLA, n=1, m_b=TASK)
    c.outcome["w0"] = ["swap-fail"]
    acts = c.step("w0", Job.FORWARD)
    assert kinds(acts) == ["Ask", "SwapIn", "FreeMemory", "Release", "Fail"]
    assert c.workers["w0"].resident is None and c.scheduler.used == 0
    assert kinds(c.step("w0", Job.FORWARD))[:2] == ["Ask", "SwapIn"]  # tries again next time


def test_vanilla_does_not_retry_out_of_memory():
    c = Cluster(100, Policy.VANILLA, n=1, m_b=TASK)
    c.outcome["w0"] = ["oom"]
    acts = c.step("w0", Job.FORWARD)
    assert kinds(acts)[-4:] == ["DropKept", "FreeMemory", "Hold", "Fail"]  # still resident, now idle
    assert c.scheduler.used == TASK


def test_free_memory_is_part_of_every_retry():
    c = Cluster(100, Policy.ADAPTIVE, n=1)
    c.outcome["w0"] = ["oom"]
    assert any(isinstance(a, FreeMemory) for a in c.step("w0", Job.FORWARD))
    assert not any(isinstance(a, SwapOut) for a in c.log["w0"])


def test_an_out_of_memory_retry_completes_while_others_hold_and_wait():
    """Worker contexts hold 30 of 100 for good; the old retry asked for all 100 and blocked everyone."""
    c = Cluster(100, Policy.ADAPTIVE, n=3)
    c.reading(70)
    c.step("w0", Job.FORWARD)  # keeps its activations: 40 held, reclaimable
    c.outcome["w1"] = ["oom"]
    acts = c.step("w1", Job.BACKWARD)
    retry = next(a for a in acts if isinstance(a, Ask) and a.retry)
    grant = c.log["w1"][c.log["w1"].index(retry) + 1]
    assert isinstance(grant, Compute) and c.replies["w1"] == ["Reply"]
    c.step("w2", Job.FORWARD)
    c.step("w2", Job.BACKWARD)
    c.step("w0", Job.BACKWARD)  # its activations were reclaimed for the retry: it recomputes
    assert all(r == ["Reply"] * len(r) and r for r in c.replies.values()), c.replies
    assert c.scheduler.used == 0 and not c.scheduler.waiting


def test_a_refused_request_fails_and_frees_the_worker_for_the_next():
    c = Cluster(100, Policy.ON_DEMAND, n=1)
    c.scheduler.give_up_s = 5
    c.reading(5, now=0.0)
    c.step("w0", Job.BACKWARD)  # needs 40; the device has 5, nothing is granted
    c.reading(5, now=10.0)
    assert c.replies["w0"] == ["Fail"] and c.workers["w0"].idle and not c.scheduler.waiting
    c.reading(100, now=11.0)
    assert kinds(c.step("w0", Job.BACKWARD))[-1] == "Reply"


def test_a_worker_failing_every_step_never_drains_the_capacity():
    c = Cluster(100, Policy.PRESERVE, n=2)
    for _ in range(20):
        c.outcome["w0"] = ["fail"]
        c.step("w0", Job.FORWARD)
        assert c.scheduler.used == 0
    assert kinds(c.step("w1", Job.FORWARD))[-1] == "Reply"


@pytest.mark.parametrize("policy", [Policy.ON_DEMAND, Policy.PRESERVE, Policy.ADAPTIVE])
def test_a_generation_holds_one_cache_token_from_its_prompt_to_its_end(policy):
    c = Cluster(100, policy)
    prompt = c.step("w0", Job.GENERATE, nbytes=30)
    assert kinds(prompt) == ["Ask", "Compute", "Reply"]  # no release: held between token steps
    assert (prompt[0].nbytes, prompt[0].kind, prompt[0].retry) == (30, TokenKind.CACHE, False)
    assert c.scheduler.used == 30
    for _ in range(3):
        assert kinds(c.step("w0", Job.DECODE)) == ["Compute", "Reply"]  # under the same grant
    assert c.scheduler.used == 30
    c.step("w1", Job.BACKWARD)  # the others train beside it
    assert c.replies["w1"] == ["Reply"] and c.scheduler.used == 30
    end = c.act("w0", c.workers["w0"].end_generation())
    assert kinds(end) == ["DropCache", "FreeMemory", "Release"] and c.scheduler.used == 0
    assert c.act("w0", c.workers["w0"].end_generation()) == []  # a second end is a no-op
    with pytest.raises(ProtocolViolation):
        c.workers["w0"].start(Job.DECODE)  # nothing is open


def test_any_other_request_ends_the_generation_first_and_failures_free_the_cache():
    c = Cluster(100, Policy.ON_DEMAND, n=1)
    c.step("w0", Job.GENERATE, nbytes=30)
    fwd = c.step("w0", Job.FORWARD)
    assert kinds(fwd)[:3] == ["DropCache", "FreeMemory", "Release"] and c.scheduler.used == 0
    c.step("w0", Job.BACKWARD)
    c.step("w0", Job.GENERATE, nbytes=30)
    c.outcome["w0"] = ["fail"]
    failed = c.step("w0", Job.DECODE)
    assert kinds(failed) == ["Compute", "DropCache", "FreeMemory", "Release", "Fail"] and c.scheduler.used == 0
    c.outcome["w0"] = ["oom"]  # a prompt out of memory fails: an exclusive grant would stop everyone
    oom = c.step("w0", Job.GENERATE, nbytes=30)
    assert kinds(oom) == ["Ask", "Compute", "DropCache", "FreeMemory", "Release", "Fail"]
    assert c.scheduler.used == 0 and c.workers["w0"].idle
    with pytest.raises(ProtocolViolation):
        GrantPolicy(Policy.VANILLA, M_F, M_B).start(Job.GENERATE, 30)


def test_a_generation_given_up_while_its_prompt_waits_releases_its_grant_once_done():
    """GenerationEnd while the prompt waits for its grant (the client timed out or was
    interrupted): the prompt still runs when granted, then gives the cache back at once."""
    from worker.policy import GENERATION_EXPECTED_S

    p = GrantPolicy(Policy.ON_DEMAND, M_F, M_B)
    (ask,) = p.start(Job.GENERATE, 30)
    assert ask.kind is TokenKind.CACHE and ask.expected_s == GENERATION_EXPECTED_S  # EASY: no free pass
    assert p.end_generation() == []  # nothing open yet
    assert kinds(p.granted(ask.request_id)) == ["Compute"]
    done = p.done(0.1)
    assert kinds(done) == ["DropCache", "FreeMemory", "Release", "Reply"] and done[2].request_id == ask.request_id
    assert p.cache is None and p.idle
    assert kinds(p.start(Job.FORWARD)) == ["Ask"]  # nothing left to end


def test_vanilla_an_evaluation_between_forward_and_backward_keeps_the_iteration_open():
    """DPO scores its reference between the policy's forward and backward: a reclaim then
    still waits for the backward, which finds its kept forward."""
    c = Cluster(100, Policy.VANILLA, n=2, m_b=TASK)
    c.step("w0", Job.FORWARD)
    c.step("w0", Job.EVAL)
    assert c.workers["w0"].graph and c.kept["w0"]
    c.step("w1", Job.FORWARD)  # w0 is asked to leave: not before its backward
    assert c.workers["w0"].resident is not None and c.kept["w0"] and c.replies["w1"] == []
    bwd = c.step("w0", Job.BACKWARD)
    assert kinds(bwd)[:4] == ["Compute", "DropKept", "SwapOut", "Release"] and c.replies["w1"] == ["Reply"]


@pytest.mark.parametrize("policy", [Policy.PRESERVE, Policy.VANILLA])
def test_a_void_kept_forward_gives_back_what_held_it(policy):
    """A driven session's new weights void its kept forward: the policy drops it and frees
    its grant (preserve) or closes the iteration (vanilla)."""
    c = Cluster(100, policy, n=1, m_b=TASK if policy is Policy.VANILLA else M_B)
    c.step("w0", Job.FORWARD)
    used = c.scheduler.used
    c.run("w0", c.workers["w0"].forget_kept())
    assert not c.kept["w0"] and not c.workers["w0"].graph and c.workers["w0"].held is None
    if policy is Policy.PRESERVE:
        assert used == M_B and c.scheduler.used == 0
    else:  # the task stays resident, idle: the first to go when memory is wanted
        assert c.scheduler.used == TASK and c.workers["w0"].busy is False
