"""A cluster of chains (``menos-cluster start --stages K``) losing a stage's manager to kill -9.

    python -m benchmarks.chain_faults                      # 3 stages x 2 managers, 2 clients
    python -m benchmarks.chain_faults --stages 2 --out /tmp/x.csv     # a quicker check

A local Ray cluster runs 2 managers per stage (manager i holds stage i mod K's blocks). Clients
connect through the gateway, each with an identity and a state_dir, so each keeps a copy of its
stages' server checkpoints. After ``--kill-at`` steps, the manager serving client 0's middle
stage is killed with SIGKILL. Each client whose next step fails reconnects through the gateway
with ``resume=True``: every stage restarts from the latest step all of them saved, the dead
stage on the surviving manager of its range from the client's copy. Measures the seconds from
the kill to each such client's first step after it, and checks that every client's losses equal
those of the same client (seed, data) on one manager that was never interrupted, to 1e-6
(exit status 1 if not), and waits for the killed manager's restart (which removes the shared
blocks it left behind). Writes chain_faults.csv.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
import tempfile
import time

import torch

from benchmarks.common import RESULTS, model_path, table, write_csv
from menos.sharing import SEGMENT_PREFIX

STEPS, KILL_AT, CHECKPOINT_EVERY = 10, 6, 4


def _batch(k: int, i: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1000 * k + i))


def _client(k: int) -> dict:
    from menos.messages import LoraSpec

    return dict(batch_size=2, seq_len=16, adapter=LoraSpec(r=4, alpha=8), lr=1e-2, seed=7 + k, head_layers=1,
                tail_layers=0, timeout_s=30.0)  # fmt: skip


def reference(path: str, clients: int, tmp: str) -> list[list[float]]:
    """Each client's losses on one manager serving the whole range, never interrupted."""
    import menos
    from tools.harness import ManagerProcess

    with ManagerProcess(os.path.join(tmp, "reference"), "--model", path) as mgr:
        out = []
        for k in range(clients):
            with menos.connect(mgr.endpoint, **_client(k)) as c:
                out.append([c.train_step(_batch(k, i)) for i in range(STEPS)])
        return out


def _restarted(cluster, victim: dict, killed_at: float, timeout_s: float = 120.0) -> float:
    """Seconds from the kill until the victim's actor has it up again (a new process, answering)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = next(m for m in cluster.status()["managers"] if m["id"] == victim["id"])
        if m["alive"] and m["pid"] != victim["pid"]:
            return round(time.perf_counter() - killed_at, 1)
        time.sleep(0.2)
    raise TimeoutError(f"manager {victim['id']} was not restarted within {timeout_s:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", help="a benchmarks.common shape (tiny: 4 blocks, 3 on the server)")
    p.add_argument("--models", default=RESULTS, help="where the generated checkpoints are kept")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--out", default=os.path.join(RESULTS, "chain_faults.csv"))
    args = p.parse_args(argv)

    import menos
    from tools.harness import ClusterProcess, free_port

    path = model_path(args.shape, "float32", args.models)
    middle = args.stages // 2  # the stage whose manager dies (of 2: the second)
    with tempfile.TemporaryDirectory(prefix="menos-bench-chain-faults-") as tmp:
        want = reference(path, args.clients, tmp)
        t0 = time.perf_counter()
        cluster = ClusterProcess(os.path.join(tmp, "cluster"), f"tcp://127.0.0.1:{free_port()}", "--stages",
                                 str(args.stages), "--managers-per-node", str(2 * args.stages), "--model", path,
                                 "--checkpoint-every", str(CHECKPOINT_EVERY), "--log-level", "WARNING")  # fmt: skip
        start_s = time.perf_counter() - t0
        try:

            def connect(k: int, **kw):
                return menos.connect(cluster.endpoint, identity=f"c{k}", state_dir=os.path.join(tmp, f"c{k}"),
                                     **_client(k), **kw)  # fmt: skip

            clients = [connect(k) for k in range(args.clients)]
            placed = [[s.manager for s in c.stages] for c in clients]
            losses = [[c.train_step(_batch(k, i)) for i in range(KILL_AT)] for k, c in enumerate(clients)]
            victim_id = placed[0][middle]
            victim = next(m for m in cluster.status()["managers"] if m["id"] == victim_id)
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at = time.perf_counter()
            rows = []
            for k, c in enumerate(clients):
                row = {"client": k, "stages_before": " ".join(placed[k]), "hit": victim_id in placed[k]}
                try:
                    losses[k].append(c.train_step(_batch(k, KILL_AT)))
                except menos.MenosError as exc:
                    row["failed_after_s"] = round(time.perf_counter() - killed_at, 3)
                    row["error"] = exc.code
                    c.close()  # the live stages checkpoint and end; the dead one is gone
                    c = clients[k] = connect(k, resume=True)
                    row["resumed_at_step"] = c.steps
                    losses[k] = losses[k][: c.steps] + [c.train_step(_batch(k, c.steps))]
                    row["training_again_after_s"] = round(time.perf_counter() - killed_at, 3)
                row["stages_after"] = " ".join(s.manager for s in c.stages)
                rows.append(row)
            for k, c in enumerate(clients):
                losses[k] += [c.train_step(_batch(k, i)) for i in range(len(losses[k]), STEPS)]
                c.close()
            # Its actor restarts the killed manager, which removes the shared blocks it left behind.
            restarted_s = _restarted(cluster, victim, killed_at)
            left = len(glob.glob(f"/dev/shm/{SEGMENT_PREFIX}{victim['pid']}_*"))
            for k, row in enumerate(rows):
                row["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses[k], want[k], strict=True))
                row["exact"] = row["max_loss_diff"] <= 1e-6
                row["cluster_start_s"] = round(start_s, 1)
                row["victim_restarted_after_s"] = restarted_s
                row["victim_segments_left"] = left
        finally:
            cluster.stop()
    cols = ["client", "hit", "stages_before", "failed_after_s", "resumed_at_step", "training_again_after_s",
            "stages_after", "max_loss_diff", "exact", "cluster_start_s", "victim_restarted_after_s",
            "victim_segments_left"]  # fmt: skip
    rows = [{c: r.get(c, "") for c in cols} for r in rows]
    write_csv(args.out, rows)
    print(f"{args.stages} stages x 2 managers ({args.shape}), {args.clients} clients; killed {victim_id} "
          f"(stage {middle}) at step {KILL_AT}; server checkpoints every {CHECKPOINT_EVERY} steps")
    print(table(rows, cols))
    print(f"wrote {args.out}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
