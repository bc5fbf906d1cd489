"""An operator tells the server's processes apart in ps and top: the launcher and each
client's worker are forks of the manager, and would otherwise show its command line."""

import psutil

import menos


def _title(p: psutil.Process) -> str:
    return " ".join(" ".join(p.cmdline()).split())  # setproctitle pads the old argv's room with spaces


def test_the_launcher_and_each_worker_are_named(shared_manager):
    m = shared_manager()
    with menos.connect(m.endpoint, batch_size=2, seq_len=16, identity="title-check") as client:
        client.train_step(__import__("torch").randint(0, 128, (2, 16)))
        titles = [_title(p) for p in m.children()]
        assert f"menos-launcher {m.pid}" in titles, titles
        mine = [t for t in titles if t.startswith("menos-worker ") and t.endswith(" title-check")]
        assert len(mine) == 1, titles
        assert len(mine[0].split()) == 3  # menos-worker SESSION IDENTITY
