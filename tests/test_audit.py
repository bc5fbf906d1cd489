"""menos-audit (issue 30): the tap relays unchanged, the attacks see only traffic and the
public base, and they really recover a planted signal (the victim's own tokens)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import torch

from menos.models import load_base
from menos.privacy import attacks
from menos.privacy.tap import Tap
from menos.privacy.traffic import Step, Traffic
from tools import audit
from tools.harness import ManagerProcess

STEPS, BATCH, SEQ = 3, 2, 16
CHANCE = 1 / 256  # the built-in model's vocabulary: bytes


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    with ManagerProcess(str(tmp_path_factory.mktemp("audit"))) as m:  # the built-in model
        yield m


@pytest.fixture(scope="module")
def base():
    return load_base(None, torch.float32)[1]


@pytest.fixture(scope="module")
def tapped(manager):
    """A victim at head_layers=1, tail_layers=0 through the tap: (its run, the traffic)."""
    with Tap(manager.endpoint) as tap:
        victim = audit.run_victim(tap.endpoint, None, 256, 1, 0, "none", "none", STEPS, BATCH, SEQ)
    assert tap.error is None
    return victim, tap.traffic


def test_the_tap_forwards_traffic_unchanged(manager, tapped):
    victim, traffic = tapped
    direct = audit.run_victim(manager.endpoint, None, 256, 1, 0, "none", "none", STEPS, BATCH, SEQ)
    assert victim["losses"] == direct["losses"]  # bit for bit: same seed, same data
    assert victim["victim_loss"] == direct["victim_loss"]
    assert (traffic.head_layers, traffic.tail_layers, traffic.codec) == (1, 0, "none")
    steps = traffic.complete()
    assert len(steps) == STEPS  # the held-out evaluation's forward is not a training step
    for s in steps:
        assert s.received.shape == s.sent.shape == s.gradient.shape == (BATCH, SEQ, 256)


def test_nearest_neighbour_recovers_a_planted_signal(tapped, base):
    """No defence, head_layers=1: the victim's own tokens come back far above chance."""
    victim, traffic = tapped
    rate = audit.recovery(attacks.nearest_neighbour(traffic, base), victim["inputs"])
    assert rate > 5 * CHANCE, rate


def test_label_recovery_above_chance_with_no_tail(tapped, base):
    victim, traffic = tapped
    predicted = attacks.label_recovery(traffic, base)
    assert [p.shape for p in predicted] == [(BATCH, SEQ - 1)] * STEPS
    assert audit.recovery(predicted, [t[:, 1:] for t in victim["inputs"]]) > 5 * CHANCE


def test_label_recovery_through_the_clients_tail_block(manager, base):
    """tail_layers=1: the gradient passes through the client's own block and adapter, which
    the server does not hold; the public block stands in for it, and the labels still come back."""
    with Tap(manager.endpoint) as tap:
        victim = audit.run_victim(tap.endpoint, None, 256, 1, 1, "none", "none", STEPS, BATCH, SEQ)
    assert tap.error is None and tap.traffic.tail_layers == 1
    predicted = attacks.label_recovery(tap.traffic, base)
    assert [p.shape for p in predicted] == [(BATCH, SEQ - 1)] * STEPS
    assert audit.recovery(predicted, [t[:, 1:] for t in victim["inputs"]]) > 5 * CHANCE


def test_attacks_get_only_traffic_and_the_public_base():
    for fn in (attacks.nearest_neighbour, attacks.label_recovery):
        assert list(inspect.signature(fn).parameters) == ["traffic", "base"]
    params = inspect.signature(attacks.learned_inversion).parameters
    assert list(params)[:3] == ["traffic", "base", "public_ids"]  # public_ids: the attacker's own text
    assert all(p.default is not inspect.Parameter.empty for p in list(params.values())[3:])  # hyperparameters
    # What crossed the cut and nothing else: tensors the server saw, no token ids, no labels.
    assert {f.name for f in dataclasses.fields(Traffic)} == {"head_layers", "tail_layers", "codec", "dtype", "steps"}
    assert {f.name for f in dataclasses.fields(Step)} == {"step", "received", "sent", "gradient"}


def test_cli_json_rows(manager, capsys, monkeypatch):
    """--json: one row per attack with exactly the issue's keys (on the shared manager)."""
    monkeypatch.setattr("tools.harness.ManagerProcess", lambda *a, **k: contextlib.nullcontext(manager))
    assert audit.main(["--head-layers", "1", "--steps", "1", "--batch-size", "2", "--seq-len", "8", "--inversion-steps",
                       "20", "--json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert [r["attack"] for r in rows] == list(audit.ATTACKS)
    for r in rows:
        assert set(r) == set(audit.KEYS)
        assert (r["head_layers"], r["tail_layers"], r["codec"], r["defence"], r["chance"]) == (1, 0, "none", "none", CHANCE)
        assert 0 <= r["recovery"] <= 1 and r["victim_loss"] > 0


@pytest.mark.parametrize("argv", [["--head-layers", "6"], ["--head-layers", "4", "--tail-layers", "0", "2"], ["--defence", "noise"], ["--steps", "0"]])
def test_an_argument_mistake_is_one_line_before_torch(argv):
    code = ("import sys\nfrom tools import audit\ntry:\n    audit.main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, e.code)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "2"]
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("menos-audit: ")


def test_table_and_plot_of_rows(tmp_path):
    rows = [dict(head_layers=h, tail_layers=0, codec="none", defence="none", attack=a, recovery=None if a == "label_recovery" else 0.5,
                 chance=CHANCE, victim_loss=4.0) for h in (1, 2) for a in audit.ATTACKS]  # fmt: skip
    text = audit.table(rows)
    assert len(text.splitlines()) == 1 + len(rows) and "n/a" in text
    audit.plot(rows, str(tmp_path / "audit.png"))
    assert (tmp_path / "audit.png").stat().st_size > 0


def test_the_privacy_benchmark_runs_and_plots(tmp_path):
    """benchmarks/privacy.py at CI size (so it does not rot): its CSV rows and its plot."""
    import csv

    from benchmarks import privacy

    assert privacy.main(["--models-list", "builtin", "--steps", "2", "--runs", "2", "--batch-size", "2",
                         "--seq-len", "16", "--inversion-steps", "20", "--out", str(tmp_path)]) == 0  # fmt: skip
    with open(tmp_path / "privacy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["head_layers"], r["attack"]) for r in rows] == [
        (h, a) for h in ("1", "2") for a in ("nearest_neighbour", "learned_inversion", "label_recovery")]
    assert all(0 <= float(r["recovery"]) <= 1 and float(r["victim_loss"]) > 0 for r in rows)
    assert (tmp_path / "privacy.png").stat().st_size > 0
