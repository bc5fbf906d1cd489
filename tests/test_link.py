"""The emulated link: parsing and delays (its effect on real clients: tests/test_benchmarks.py)."""

from __future__ import annotations

import math
import time

import pytest

from menos.link import Link


def test_parse_and_delay():
    link = Link.parse("50ms,100Mbit")
    assert link == Link(0.05, 100e6)
    assert link.delay_s(1_250_000) == pytest.approx(0.05 + 0.1)  # 10 Mbit over 100 Mbit/s
    assert Link.parse("200us, 1Gbit").latency_s == pytest.approx(2e-4)
    assert Link.parse("1s,inf").bandwidth_bps == math.inf
    assert str(Link.parse("20ms,10Mbit")) == "20ms,10Mbit"


@pytest.mark.parametrize("bad", ["50ms", "50,100Mbit", "50ms,100", "50ms,0Mbit", "fast,slow", "50ms,100Mbit,1"])
def test_bad_specs_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="link"):
        Link.parse(bad)


def test_transit_sleeps_for_the_delay():
    t0 = time.perf_counter()
    Link(0.02, 8e6).transit(10_000)  # 20 ms + 10 ms
    assert time.perf_counter() - t0 >= 0.03
