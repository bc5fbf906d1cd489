"""Scheduler decision latency vs number of waiting requests (paper: under 0.1 ms).

Three events per queue length N, each timed alone (time.perf_counter_ns around one
call, fresh scheduler state for every repetition):
- arrival: a request arrives behind a blocked head (the common case under load);
- release: a release lets the head in; none of the N-1 others fits (the pass stops
  at once: not even the smallest waiting request fits);
- release, scan all: as above, but only the LAST waiting request fits, so the
  backfill pass walks all N-1 others (Algorithm 2's worst case).

    python benchmarks/scheduler_latency.py [--reps 300]

Writes benchmarks/results/scheduler_latency.csv and .png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from manager.scheduler import Scheduler  # noqa: E402

CAPACITY = 1000


def _loaded(n: int, backfill: str, last_fits: bool) -> Scheduler:
    s = Scheduler(CAPACITY, backfill)
    s.request("blocker", 0, CAPACITY, now=0.0, expected_s=1.0)
    s.request("head", 0, 600, now=0.0, expected_s=1.0)
    for i in range(n - 1):
        small = last_fits and i == n - 2
        s.request(f"c{i}", 0, 100 if small else 500, now=0.0, expected_s=1.0)  # 400 left after the head
    return s


def measure(n: int, backfill: str, reps: int) -> dict[str, float]:
    out = {}
    for event in ("arrival", "release", "scan_all"):
        samples = []
        for _ in range(reps):
            s = _loaded(n, backfill, last_fits=event == "scan_all")
            gc.disable()  # time the decision, not a collection triggered by the state built above
            if event == "arrival":
                t0 = time.perf_counter_ns()
                s.request("new", 0, 100, now=0.5, expected_s=1.0)
            else:
                t0 = time.perf_counter_ns()
                s.release("blocker", 0, now=1.0)  # head granted, then the backfill pass
            samples.append(time.perf_counter_ns() - t0)
            gc.enable()
        samples.sort()
        out[f"{event}_median_us"] = statistics.median(samples) / 1e3
        out[f"{event}_p99_us"] = samples[min(len(samples) - 1, int(0.99 * len(samples)))] / 1e3
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--sizes", default="4,16,64,256,1024")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    rows = []
    for backfill in ("fcfs", "easy"):
        for n in map(int, args.sizes.split(",")):
            rows.append({"backfill": backfill, "waiting": n, **measure(n, backfill, args.reps)})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scheduler_latency.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.reps} repetitions; microseconds per decision")  # fmt: skip
    print("| backfill | waiting | arrival median / p99 | release median / p99 | release, scan all median / p99 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[e + '_median_us']:.1f} / {r[e + '_p99_us']:.1f}" for e in ("arrival", "release", "scan_all")]
        print(f"| {r['backfill']} | {r['waiting']} | " + " | ".join(cells) + " |")
    png = os.path.join(args.out, "scheduler_latency.png")
    plot(rows, png)
    print(f"wrote {path} and {png}")
    return 0


def plot(rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for backfill, style in (("fcfs", "-"), ("easy", "--")):
        for event, label in (("arrival", "arrival"), ("release", "release"), ("scan_all", "release, scan all")):
            pts = [(r["waiting"], r[f"{event}_median_us"]) for r in rows if r["backfill"] == backfill]
            ax.plot(*zip(*pts), style, marker="o", label=f"{label} ({backfill})")
    ax.axhline(100, color="grey", lw=0.8, ls=":")  # the paper's 0.1 ms
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("waiting requests")
    ax.set_ylabel("median decision time, us")
    ax.set_title("scheduler decision latency (paper: under 100 us)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
