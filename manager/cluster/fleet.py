"""The cluster's managers as Ray actors: placed on nodes, asked for their state, stopped.

Each manager is a ``ManagerRunner`` actor pinned to its node (a hard node-affinity
strategy: a manager's checkpoints are on that node's disk, so it must not move). On GPU
nodes each actor takes one GPU (``num_gpus=1``: Ray sets CUDA_VISIBLE_DEVICES, so the
manager's ``cuda`` is that GPU); on CPU nodes N actors per node take no Ray CPU, the
manager and its workers being processes of their own, and split the node's memory
(``--memory-share 1/N``: each would otherwise count on all of it). With CURVE the cluster's key
pair and admitted client keys are copied to every manager (and kept in step), together
with the public key of a pair the gateway makes at each start to read the managers'
status. Those files travel through Ray's control plane: enable Ray's TLS where the
network between nodes is not trusted.
"""

from __future__ import annotations

import glob
import logging
import os
import time

from manager.cluster.actor import ManagerRunner
from menos.chain import blocks_text
from manager.curve import has_keys
from menos import keys

log = logging.getLogger("menos.cluster")

GATEWAY_KEY = "menos-gateway"
INFO_TIMEOUT_S = 2.0
# An actor that is slow to answer (a loaded node) keeps its last state this long; one
# that died, or stays silent longer, counts as not alive.
SILENT_S = 15.0


class Fleet:
    def __init__(self, ray, actors: dict, state_dir: str):
        self.ray = ray
        self.actors = actors  # manager id -> actor handle
        self.state_dir = state_dir
        self._last = {mid: {"id": mid, "node": "?", "device": "?", "endpoint": "", "pid": 0, "alive": False}
                      for mid in actors}  # fmt: skip
        self._heard = dict.fromkeys(actors, float("-inf"))  # manager id -> when its actor last answered
        self._keys_seen = None

    @classmethod
    def start(cls, ray, state_dir: str, flags: list[str], listen: str, per_gpu: bool, per_node: int,
              stages: tuple[tuple[int, int], ...] = ()) -> "Fleet":  # fmt: skip
        """``stages``: the blocks of each stage of a cluster of stages; manager i holds stage i mod K's."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(ManagerRunner)
        key_files = _key_files(state_dir)
        loopback = keys.is_loopback(listen)  # a gateway on loopback: one machine, managers on loopback too
        actors, n = {}, 0
        nodes = sorted((node for node in ray.nodes() if node["Alive"]), key=lambda node: node["NodeID"])
        counts = [int(node["Resources"].get("GPU", 0)) if per_gpu else per_node for node in nodes]
        k = len(stages) or 1
        blocks = [["--blocks", f"{a}:{b}"] for a, b in stages] or [[]]  # each stage's own flag
        if sum(counts) % k:
            raise RuntimeError(f"{sum(counts)} managers do not split evenly into {len(stages)} stages: start a "
                               "multiple of --stages (--managers-per-node, or GPUs)")  # fmt: skip
        for node, count in zip(nodes, counts):
            device = "cuda" if per_gpu else "cpu"
            host = "127.0.0.1" if loopback else node["NodeManagerAddress"]
            node_flags = [*flags, *share_flags(count, per_gpu)]
            for _ in range(count):
                mid, own = f"m{n}", blocks[n % k]
                n += 1
                opts = dict(num_cpus=0, num_gpus=1 if per_gpu else 0, max_concurrency=8, max_restarts=3,
                            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))  # fmt: skip
                actors[mid] = remote.options(**opts).remote(
                    mid, os.path.join(state_dir, "managers", mid), [*node_flags, *own],
                    host, key_files, device)  # fmt: skip
        if not actors:
            raise RuntimeError("no node to place a manager on" + (" (no GPUs: drop --per-gpu)" if per_gpu else ""))
        fleet = cls(ray, actors, state_dir)
        started = ray.get([a.wait_started.remote() for a in actors.values()])
        failed = [f"{i['id']}: {i['error']}" for i in started if not i["alive"]]
        if len(failed) == len(started):
            fleet.stop()
            raise RuntimeError("no manager started: " + "; ".join(failed))
        lost = [s for s in range(k) if k > 1 and not any(i["alive"] for i in started[s::k])]
        if lost:  # no client could get a chain through that stage
            fleet.stop()
            raise RuntimeError(f"no manager of stage {lost[0]} (blocks {blocks_text(stages[lost[0]])}) started: "
                               + "; ".join(failed))  # fmt: skip
        for f in failed:
            log.error("manager %s", f)
        return fleet

    def infos(self) -> list[dict]:
        """Every manager's actor state, read now; a dead or silent actor counts as not alive."""
        refs = {mid: a.info.remote() for mid, a in self.actors.items()}
        out = []
        for mid, ref in refs.items():
            try:
                self._last[mid] = self.ray.get(ref, timeout=INFO_TIMEOUT_S)
                self._heard[mid] = time.monotonic()
            except self.ray.exceptions.GetTimeoutError as exc:  # slow, not dead: its last state, for a while
                if time.monotonic() - self._heard[mid] > SILENT_S:
                    self._last[mid] = dict(self._last[mid], alive=False, endpoint="", error=str(exc)[:200])
            except Exception as exc:  # noqa: BLE001  the actor (its node) is gone
                self._last[mid] = dict(self._last[mid], alive=False, endpoint="", error=str(exc)[:200])
            out.append(dict(self._last[mid]))
        return out

    def gateway(self, listen: str, cfg, stages: tuple[tuple[int, int], ...] = ()):
        """The gateway on ``listen``, estimating clients against the managers' model ``cfg``;
        ``stages``: the ranges of a cluster of stages."""
        from manager.cluster.gateway import Gateway
        from menos import wire
        from menos.models import builtin_config

        if cfg.model is None:
            config = builtin_config()
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(cfg.model)
        status_keys = None
        if has_keys(self.state_dir):
            status_keys = (os.path.join(_gateway_dir(self.state_dir), f"{GATEWAY_KEY}.key_secret"),
                           os.path.join(keys.server_dir(self.state_dir), "server.key"))  # fmt: skip
        return Gateway(listen, self.state_dir, config, wire.dtype_from_name(cfg.dtype).itemsize, self.infos,
                       status_keys, cfg.max_clients, on_refresh=self.sync_keys, quantization=cfg.quantization,
                       stages=stages)  # fmt: skip

    def sync_keys(self) -> None:
        """Admitted client keys added or removed in STATE_DIR/keys/clients reach every manager."""
        if not has_keys(self.state_dir):
            return
        seen = tuple(sorted((p, os.stat(p).st_mtime_ns) for p in glob.glob(os.path.join(keys.clients_dir(self.state_dir), "*"))))
        if seen != self._keys_seen:
            if self._keys_seen is not None:
                files = _key_files(self.state_dir, new_gateway_pair=False)
                self.ray.get([a.set_keys.remote(files) for a in self.actors.values()], timeout=30)
                log.info("admitted client keys sent to %d managers", len(self.actors))
            self._keys_seen = seen

    def stop(self) -> None:
        """Each manager stops its workers and removes its files; then the actors go."""
        try:
            self.ray.get([a.stop.remote() for a in self.actors.values()], timeout=60)
        except Exception as exc:  # noqa: BLE001  a dead actor has nothing left to stop
            log.warning("stopping managers: %s", exc)
        for a in self.actors.values():
            self.ray.kill(a)
        gw = _gateway_dir(self.state_dir)
        for name in glob.glob(os.path.join(gw, f"{GATEWAY_KEY}.key*")):
            os.unlink(name)


def share_flags(count: int, per_gpu: bool) -> list[str]:
    """The CPU managers of one node share its memory: each counts on 1/count of it (a GPU is one manager's)."""
    return [] if per_gpu or count < 2 else ["--memory-share", f"{1 / count:.6g}"]


def _gateway_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "gateway-keys")


def _key_files(state_dir: str, new_gateway_pair: bool = True) -> dict[str, bytes]:
    """relative path -> bytes of the key files every manager holds; {} without CURVE."""
    if not has_keys(state_dir):
        return {}
    if new_gateway_pair:  # a fresh one each start (one a crashed start left is replaced)
        for old in glob.glob(os.path.join(_gateway_dir(state_dir), f"{GATEWAY_KEY}.key*")):
            os.unlink(old)
        keys.new_pair(_gateway_dir(state_dir), GATEWAY_KEY)
    files = {}
    for path in [*glob.glob(os.path.join(keys.server_dir(state_dir), "server.key*")),
                 *glob.glob(os.path.join(keys.clients_dir(state_dir), "*.key"))]:  # fmt: skip
        with open(path, "rb") as f:
            files[os.path.relpath(path, state_dir)] = f.read()
    with open(os.path.join(_gateway_dir(state_dir), f"{GATEWAY_KEY}.key"), "rb") as f:
        files[os.path.join("keys", "clients", f"{GATEWAY_KEY}.key")] = f.read()
    return files
