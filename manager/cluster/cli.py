"""menos-cluster: many managers on a Ray cluster behind one gateway endpoint.

``start`` runs in the foreground (Ctrl-C or ``menos-cluster stop`` ends it and everything
it started): it joins a Ray cluster (``--address``) or starts a local one, places one
manager actor per GPU (``--per-gpu``) or N per node, and serves the gateway on
``--listen``. Flags it does not know are the managers' own (``menos-manager start``'s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from manager.cluster import state_file
from manager.config import ManagerConfig, add_arguments, from_args
from manager.preflight import StartupError, check_manager_flags, check_port_free, claim_state_dir

DEFAULT_LISTEN = "tcp://127.0.0.1:5555"
_OWN_FLAGS = ("--listen", "--state-dir", "--device", "--memory-share")  # the cluster sets these for each manager


def _default_state_dir() -> str:
    return os.path.join(os.path.dirname(ManagerConfig().state_dir), "menos-cluster")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="menos-cluster", description="A Menos cluster on Ray: one endpoint, many managers.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the cluster in the foreground; other flags go to every manager",
                           allow_abbrev=False)  # a manager flag must never pass for an abbreviation of ours
    start.add_argument("--address", help="join this Ray cluster (auto, or HOST:PORT); default: start a local one")
    group = start.add_mutually_exclusive_group()
    group.add_argument("--managers-per-node", type=int, default=1, metavar="N", help="managers per node (CPU nodes)")
    group.add_argument("--per-gpu", action="store_true", help="one manager per GPU (Ray resource num_gpus=1)")
    start.add_argument("--stages", type=int, default=1, metavar="K",
                       help="split the server's blocks into K ranges, manager i holding range i mod K: a client gets "
                            "a chain of K managers, each stage placed by free memory (start a multiple of K managers)")
    start.add_argument("--listen", default=DEFAULT_LISTEN, help=f"the gateway's endpoint (default {DEFAULT_LISTEN})")
    start.add_argument("--state-dir", default=_default_state_dir(),
                       help="keys (as menos-manager keys), cluster.json; each manager's state under managers/ on its node")
    start.add_argument("--insecure", action="store_true", help="allow plain text on an address other than loopback")
    status = sub.add_parser("status", help="the cluster's managers and clients (a table, or --json)")
    status.add_argument("--connect", default=DEFAULT_LISTEN, help="the gateway's endpoint")
    status.add_argument("--json", action="store_true")
    status.add_argument("--client-key", help="CURVE: your .key_secret file")
    status.add_argument("--server-key", help="CURVE: the cluster's public server.key")
    stop = sub.add_parser("stop", help="stop a cluster started with `menos-cluster start`")
    stop.add_argument("--state-dir", default=_default_state_dir())
    stop.add_argument("--timeout", type=float, default=60.0)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "start":
            return _start(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _status(args) if args.command == "status" else _stop(args)
    except StartupError as exc:
        print(f"menos-cluster: {exc}", file=sys.stderr)
        return 2


def manager_config(flags: list[str]) -> ManagerConfig:
    """The managers' flags, checked as ``menos-manager start`` would (StartupError names a bad one)."""
    for f in flags:
        if f.split("=")[0] in _OWN_FLAGS:
            raise StartupError(f"{f.split('=')[0]}: the cluster sets it for each manager (use start's own --listen "
                               "and --state-dir; --per-gpu for CUDA)")  # fmt: skip
    p = argparse.ArgumentParser(prog="menos-cluster start", add_help=False, exit_on_error=False)
    add_arguments(p)
    try:
        ns = p.parse_args(flags)
    except argparse.ArgumentError as exc:
        raise StartupError(f"manager flags: {exc}") from None
    cfg = from_args(ns)
    check_manager_flags(cfg)
    return cfg


def _start(args, flags: list[str]) -> int:
    from manager.curve import plain_text_refusal

    cfg = manager_config(flags)
    check_layout(args, cfg)
    stages = stage_ranges(args, cfg)
    state_dir = os.path.expanduser(args.state_dir)
    refusal = plain_text_refusal(state_dir, args.listen, args.insecure)
    if refusal:
        raise StartupError(refusal.replace("menos-manager: ", "", 1))
    check_port_free(args.listen)
    held = claim_state_dir(state_dir, "cluster", args.listen, state_file.FILENAME)  # one live cluster per state dir
    try:
        return _run(args, flags, cfg, state_dir, stages)
    finally:
        held.release()


def check_layout(args, cfg: ManagerConfig) -> None:
    """How many managers go on a node, against what they would share there."""
    n = args.managers_per_node
    if cfg.blocks is not None:
        raise StartupError(f"--blocks {cfg.blocks}: the cluster gives each manager its range; use --stages K")
    if n < 1:
        raise StartupError(f"--managers-per-node {n}: 1 or more (or --per-gpu: one per GPU)")
    if n > 1 and cfg.metrics_port:
        raise StartupError(f"--metrics-port {cfg.metrics_port}: the {n} managers of a node would all serve on it; "
                           "drop it, or --managers-per-node 1")  # fmt: skip


def stage_ranges(args, cfg: ManagerConfig) -> tuple[tuple[int, int], ...]:
    """Each stage's blocks [start, stop) (``--stages K``): () without stages."""
    if args.stages < 1:
        raise StartupError(f"--stages {args.stages}: 1 or more")
    if args.stages == 1:
        return ()
    from menos.chain import split_range
    from tools.cli_args import raw_config

    layers = raw_config(cfg.model)["num_hidden_layers"]  # the model was checked with the managers' flags
    try:
        ranges = split_range(cfg.min_head_layers, layers, args.stages)
    except ValueError as exc:
        raise StartupError(f"--stages {args.stages}: {exc} (--min-head-layers {cfg.min_head_layers})") from None
    return tuple(ranges)


def _run(args, flags: list[str], cfg: ManagerConfig, state_dir: str, stages: tuple[tuple[int, int], ...]) -> int:
    if args.insecure:
        flags = [*flags, "--insecure"]
    try:
        import ray
    except ImportError:
        raise StartupError("Ray is not installed: pip install 'menos[cluster]'") from None
    from manager.cluster.fleet import Fleet

    temp_dir = None if args.address else tempfile.mkdtemp(prefix="menos-ray-")
    stopping = []
    fleet = gateway = None
    try:
        if args.address:
            try:
                ray.init(address=args.address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise StartupError(f"--address {args.address}: no Ray cluster to join ({exc})") from None
        else:  # a local instance, all of whose files live (and go) in temp_dir
            ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir,
                     object_store_memory=100 << 20)  # fmt: skip
        # after ray.init, which installs handlers of its own that end the process at once
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
        try:
            fleet = Fleet.start(ray, state_dir, flags, args.listen, args.per_gpu, args.managers_per_node, stages)
        except RuntimeError as exc:  # no node to place on, no manager that starts: one line, exit 2
            raise StartupError(f"{exc} (each manager's log: {state_dir}/managers/ID/manager.log on its node)") from None
        gateway = fleet.gateway(args.listen, cfg, stages)
        alive = gateway.wait_first_refresh()  # managers whose status the gateway has read: placeable now
        state_file.write(state_dir, pid=os.getpid(), endpoint=gateway.endpoint, ray=ray.get_runtime_context().gcs_address,
                         managers=[i["id"] for i in fleet.infos()])  # fmt: skip
        print(f"menos-cluster: gateway on {gateway.endpoint}, {alive} of {len(fleet.actors)} managers up", flush=True)
        gateway.serve(until=lambda: bool(stopping))
    finally:
        if gateway is not None:
            gateway.close()
        if fleet is not None:
            fleet.stop()
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        state_file.remove(state_dir, os.getpid())
    return 0


def cluster_status(endpoint: str, client_key: str | None = None, server_key: str | None = None,
                   timeout_s: float = 10.0) -> dict:  # fmt: skip
    """A running cluster's status (``status --json``), asked of its gateway; MenosError if none answers."""
    from menos.channel import Channel, WrongService
    from menos.keys import CurveKeys
    from menos.messages import ClusterStatus, Status, StatusRequest

    chan = Channel(endpoint, timeout_s, CurveKeys.load(client_key, server_key) if client_key or server_key else None)
    try:
        chan.wait_connected(3.0)
        chan.send(StatusRequest())
        st = chan.recv((ClusterStatus, Status))[0]
    finally:
        chan.close()
    if isinstance(st, Status):
        raise WrongService(f"{endpoint} is a manager, not a cluster's gateway; use menos-manager status --connect {endpoint}")
    return json.loads(st.json)


def _status(args) -> int:
    from manager.cli import quiet_stdout
    from menos.channel import WrongService
    from menos.errors import MenosError

    try:
        st = cluster_status(args.connect, args.client_key, args.server_key)
    except (WrongService, ValueError) as exc:  # a mistake in --connect or a key's name: as an argument's
        print(f"menos-cluster status: {exc}", file=sys.stderr)
        return 2
    except (MenosError, OSError) as exc:
        print(f"menos-cluster status: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(st, indent=2) if args.json else table(st), flush=True)
    except BrokenPipeError:  # `status | head`: the reader has what it wanted
        quiet_stdout()
    return 0


def table(st: dict) -> str:
    from menos.chain import blocks_text
    from menos.sizes import format_size

    lines = [f"{'manager':<9}{'node':<18}{'device':<8}{'endpoint':<26}{'pid':>8}  {'alive':<6}{'clients':>8}"
             f"{'capacity':>11}{'granted':>10}{'free':>11}{'restarts':>9}  blocks"]  # fmt: skip
    for m in st["managers"]:
        mem = m["memory"]
        lines.append(f"{m['id']:<9}{m['node'][:17]:<18}{m['device']:<8}{m['endpoint'] or '-':<26}{m['pid']:>8}  "
                     f"{'yes' if m['alive'] else 'NO':<6}{m['clients']:>8}{format_size(mem['capacity']):>11}"
                     f"{format_size(mem['granted']):>10}{format_size(mem['free']):>11}{m.get('restarts', 0):>9}  "
                     + (blocks_text(m["blocks"]) if m.get("blocks") else "-"))  # fmt: skip
    lines += [f"node {node}: {n} managers share its memory (each one's default capacity: 1/{n} of it)"
              for node, n in sharing(st).items()]  # fmt: skip
    lines.append("")
    lines += [f"client {c['identity'][:40] or '(anonymous)'} on {c['manager']}" for c in st["clients"]] or ["(no clients)"]
    return "\n".join(lines)


def sharing(st: dict) -> dict[str, int]:
    """node -> how many managers share its memory (CPU managers on one node; a GPU is one manager's)."""
    count: dict[str, int] = {}
    for m in st["managers"]:
        if m["device"] == "cpu":
            count[m["node"]] = count.get(m["node"], 0) + 1
    return {node: n for node, n in count.items() if n > 1}


def _stop(args) -> int:
    state_dir = os.path.expanduser(args.state_dir)
    info = state_file.read(state_dir)
    if info is None or not state_file.running(state_dir):
        print(f"menos-cluster stop: no cluster runs from {state_dir}", file=sys.stderr)
        return 1
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while state_file.running(state_dir):
        if time.monotonic() > deadline:
            print(f"menos-cluster stop: pid {info['pid']} still running after {args.timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"menos-cluster: stopped (pid {info['pid']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
