"""A Menos cluster on a local Ray instance: how fast the gateway admits clients, and how
long a manager's clients are down when it is killed.

    python -m benchmarks.cluster [--managers 2] [--clients 4] [--hellos 200] [--kills 3]

Measures, in one run:
- placements per second: Hello -> Redirect round trips to the gateway alone (what the
  gateway itself costs; it is not on the data path);
- clients admitted per second end to end: menos.connect through the gateway, i.e. the
  placement, the manager's worker start and profile, and the Welcome, one after the other;
- seconds from a manager's SIGKILL until each of its clients has trained a step again
  on another manager (reconnect through the gateway with resume=True, from its carried
  copy of the server's checkpoint), the median over ``--kills`` kills.
Writes benchmarks/results/cluster.csv.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--managers", type=int, default=2, help="managers on this node")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--hellos", type=int, default=200)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--out", default=os.path.join(RESULTS, "cluster.csv"))
    args = p.parse_args(argv)

    import menos
    from menos.channel import Channel
    from menos.messages import Hello, LoraSpec, Redirect
    from tools.harness import ClusterProcess, free_port

    client = dict(batch_size=2, seq_len=16, adapter=LoraSpec(r=4, alpha=8), lr=1e-2, seed=7)
    batch = lambda i: torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i))  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="menos-bench-cluster-") as tmp:
        t0 = time.perf_counter()
        cluster = ClusterProcess(os.path.join(tmp, "state"), f"tcp://127.0.0.1:{free_port()}", "--managers-per-node",
                                 str(args.managers), "--checkpoint-every", "2", "--max-clients", "1000",
                                 "--log-level", "WARNING")  # fmt: skip
        start_s = time.perf_counter() - t0
        try:
            chan = Channel(cluster.endpoint, 30.0)
            chan.wait_connected(5.0)
            lat = []
            for i in range(args.hellos):
                t = time.perf_counter()
                chan.send(Hello(batch_size=2, seq_len=16, identity=f"probe-{i}"))
                chan.recv(Redirect)
                lat.append(time.perf_counter() - t)
            chan.close()
            time.sleep(4)  # the probes' pending placements expire
            t = time.perf_counter()
            clients = [menos.connect(cluster.endpoint, identity=f"c{k}", state_dir=os.path.join(tmp, f"c{k}"), **client)
                       for k in range(args.clients)]  # fmt: skip
            connect_s = time.perf_counter() - t
            for c in clients:
                for i in range(2):
                    c.train_step(batch(i))
            down = []
            for kill in range(args.kills):
                st = cluster.status()
                live = {m["id"]: m for m in st["managers"] if m["alive"]}
                victim = max(live.values(), key=lambda m: (m["clients"], m["id"]))
                os.kill(victim["pid"], signal.SIGKILL)
                t = time.perf_counter()
                for k, c in enumerate(clients):
                    if c.manager != victim["id"]:
                        continue
                    try:
                        c.train_step(batch(2))
                    except menos.MenosError:
                        c.close()
                    clients[k] = c = menos.connect(cluster.endpoint, identity=f"c{k}", state_dir=c.cfg.state_dir,
                                                   resume=True, **client)  # fmt: skip
                    c.train_step(batch(c.steps))
                    down.append(time.perf_counter() - t)
                # the restarted manager is back before the next kill
                while not all(m["alive"] for m in cluster.status()["managers"]):
                    time.sleep(0.5)
            for c in clients:
                c.close()
        finally:
            cluster.stop()
    med = statistics.median(lat)
    rows = [
        ("cluster start (Ray, gateway, managers up)", "s", start_s),
        ("gateway placements per second (Hello -> Redirect)", "1/s", 1.0 / med),
        ("gateway placement, median round trip", "ms", med * 1e3),
        (f"clients admitted per second end to end ({args.clients} connects)", "1/s", args.clients / connect_s),
        ("kill -9 of a manager until its client trained again elsewhere, median", "s", statistics.median(down)),
        ("same, max", "s", max(down)),
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("measure,unit,value\n")
        for name, unit, value in rows:
            f.write(f"\"{name}\",{unit},{value:.4g}\n")
    print(f"{args.managers} managers, {args.clients} clients, {os.cpu_count()} CPUs; {len(down)} clients resumed "
          f"over {args.kills} kills")  # fmt: skip
    for name, unit, value in rows:
        print(f"  {name:<72} {value:>9.3g} {unit}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
