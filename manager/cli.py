"""menos-manager: start the server, or ask a running one for its status."""

from __future__ import annotations

import json
import os
import sys
import time

from manager import runinfo
from manager.config import ManagerConfig, add_arguments, from_args
from manager.preflight import (StartupError, check_config, check_device, check_quantization_runs, check_state_dir,
                               claim_state_dir)  # fmt: skip
from menos.procs import bound_heap
from tools.cli_args import OneLineParser


def main(argv=None) -> int:
    # Mistakes in one line (the usage block of ~20 flags would bury them), as the other tools'.
    parser = OneLineParser(prog="menos-manager", description="Menos split fine-tuning server.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run the manager in the foreground (Ctrl-C stops it cleanly)")
    add_arguments(start)
    status = sub.add_parser("status", help="print a running manager's status (a table, or --json)")
    status.add_argument("--connect", default=ManagerConfig.listen, help="the manager's client endpoint")
    status.add_argument("--json", action="store_true", help="one JSON object (keys model, memory, queue, clients)")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")  # fmt: skip
    status.add_argument("--client-key", help="CURVE: your .key_secret file")
    status.add_argument("--server-key", help="CURVE: the server's public .key file")
    _add_keys_commands(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "keys":
            return _keys(args)
        if args.command == "start":
            return _start(from_args(args))
        return _status(args)
    except StartupError as exc:
        if getattr(args, "log_level", "").lower() == "debug":
            raise
        print(f"menos-manager: {exc}", file=sys.stderr)
        return 2


def _status(args) -> int:
    if args.watch is not None and not 0 < args.watch < float("inf"):
        raise StartupError(f"status --watch {args.watch:g}: give the seconds between refreshes, more than 0 (e.g. --watch 2)")
    try:
        return _show_status(args)
    except KeyboardInterrupt:  # Ctrl-C ends --watch
        return 0
    except BrokenPipeError:  # `status | head`: the reader has what it wanted
        quiet_stdout()
        return 0


def _show_status(args) -> int:
    from manager.status_view import as_dict, table
    from menos.channel import WrongService, status as get_status
    from menos.errors import MenosError

    while True:
        try:
            st = get_status(args.connect, client_key=args.client_key, server_key=args.server_key)
        except (WrongService, ValueError) as exc:  # a mistake in --connect or a key's name: as an argument's
            print(f"menos-manager status: {exc}", file=sys.stderr)
            return 2
        except (MenosError, OSError) as exc:
            print(f"menos-manager status: {exc}", file=sys.stderr)
            return 1
        text = json.dumps(as_dict(st), indent=2) if args.json else table(st)
        if args.watch:
            print("\033[2J\033[H" + time.strftime("%H:%M:%S  ") + args.connect, flush=True)
        print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def quiet_stdout() -> None:
    """After EPIPE: point stdout at /dev/null, so that the flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _start(cfg: ManagerConfig) -> int:
    from manager.curve import plain_text_refusal

    refusal = plain_text_refusal(cfg.state_dir, cfg.listen, cfg.insecure)
    if refusal:
        raise SystemExit(refusal)  # before anything is loaded or started: fail fast, say how to fix it
    check_config(cfg)  # the model directory, the device's name, the ports, the state directory
    held = claim_state_dir(cfg.state_dir, "manager", cfg.listen, runinfo.FILENAME)  # one live manager per state dir
    try:
        _serve(cfg)
    finally:
        held.release()
    # Everything is released: skip the interpreter's teardown of torch's and transformers'
    # module state, which takes about 2 s here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(cfg: ManagerConfig) -> None:
    import logging
    import signal

    from manager.workers import WorkerSpawner

    if cfg.quantization == "none":
        # PEFT imports bitsandbytes wherever it is installed, and bitsandbytes torch's compiler: 2 s of
        # CPU in every manager start here. This manager, its launcher and its workers never use it.
        sys.modules.setdefault("bitsandbytes", None)
    if cfg.device.startswith("cuda"):
        from menos import allocator

        try:  # before torch starts CUDA; the workers inherit it
            os.environ[allocator.ENV] = allocator.shareable(os.environ.get(allocator.ENV))
        except ValueError as exc:
            raise SystemExit(f"menos-manager: {exc}") from None
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a server log is no terminal (nor the loader's)
    # The worker launcher is forked from this process after it imported what workers need
    # (torch, transformers, PEFT): one copy of those pages for all. Before check_device:
    # a fork after CUDA starts cannot use CUDA.
    spawner = WorkerSpawner()
    bound_heap()  # this process's heap only: workers keep glibc's default (their profiles are calibrated on it)
    check_device(cfg.device, torch)
    check_quantization_runs(cfg.quantization, cfg.device, cfg.dtype)
    from manager.base import BaseLoadError
    from manager.server import Manager  # heavy imports (torch) only when starting

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s manager %(levelname)s %(message)s")
    mgr = Manager(cfg, spawner)
    signal.signal(signal.SIGINT, mgr.stop)
    signal.signal(signal.SIGTERM, mgr.stop)
    try:
        try:
            mgr.start()
        except BaseLoadError as exc:  # the loader's reason: the exception's type and message
            if cfg.log_level.lower() == "debug":
                raise
            raise StartupError(f"the model did not load: {exc}") from None
        except (OSError, ValueError, zmq_error()) as exc:  # a bind that fails, a full disk
            if cfg.log_level.lower() == "debug":
                raise
            raise StartupError(f"{type(exc).__name__}: {exc}") from None
        mgr.serve_forever()
    finally:
        mgr.close()
        logging.shutdown()


def zmq_error() -> type:
    import zmq

    return zmq.ZMQError


def _add_keys_commands(sub) -> None:
    k = sub.add_parser("keys", help="CURVE keys: the server's pair and the clients it admits")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    state = dict(default=ManagerConfig().state_dir, help="the manager's state directory")
    init = ksub.add_parser("init", help="create the server's key pair in STATE_DIR/keys")
    init.add_argument("--state-dir", **state)
    add = ksub.add_parser("add", help="admit a client: copy its public key into STATE_DIR/keys/clients")
    add.add_argument("name")
    add.add_argument("keyfile", help="the client's public NAME.key file")
    add.add_argument("--state-dir", **state)
    new = ksub.add_parser("new", help="create a key pair for a client (NAME.key, NAME.key_secret)")
    new.add_argument("name")
    new.add_argument("--out", default=".", help="directory for the two files")


def _keys(args) -> int:
    from menos import keys

    if args.keys_command == "init":
        state_dir = os.path.expanduser(args.state_dir)
        check_state_dir(state_dir)
        try:
            pub, sec = keys.new_pair(keys.server_dir(state_dir), "server")
            os.makedirs(keys.clients_dir(state_dir), mode=0o700, exist_ok=True)
        except FileExistsError as exc:  # run once per state dir: clients already hold this public key
            raise StartupError(f"keys init: {exc}; this state dir has its pair already (keys add admits clients); "
                               "to replace it, delete server.key and server.key_secret first") from None  # fmt: skip
        except (ValueError, OSError) as exc:
            raise StartupError(f"keys init: {exc}") from None
        print(f"server key pair: {pub} (give this public key to clients), {sec} (keep secret)")
    elif args.keys_command == "add":
        keyfile = os.path.expanduser(args.keyfile)
        if not os.path.isfile(keyfile):
            raise StartupError(f"keys add: {keyfile}: no such file (the client's public NAME.key)")
        check_state_dir(os.path.expanduser(args.state_dir))
        try:
            print(f"admitted: {keys.add_client(os.path.expanduser(args.state_dir), args.name, keyfile)}")
        except (ValueError, OSError) as exc:
            raise StartupError(f"keys add: {keyfile}: {exc}") from None
    else:
        try:
            pub, sec = keys.new_pair(os.path.expanduser(args.out), args.name)
        except FileExistsError as exc:
            raise StartupError(f"keys new {args.name}: {exc}; pick another NAME or --out") from None
        except (ValueError, OSError) as exc:
            raise StartupError(f"keys new {args.name}: {exc}") from None
        print(f"client key pair: {pub} (give to the server operator), {sec} (keep secret)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
