"""menos-manager: start the server, or ask a running one for its status."""

from __future__ import annotations

import argparse
import json
import sys

import msgspec

from manager.config import ManagerConfig, add_arguments, from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="menos-manager", description="Menos split fine-tuning server.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run the manager in the foreground (Ctrl-C stops it cleanly)")
    add_arguments(start)
    status = sub.add_parser("status", help="print a running manager's status as JSON")
    status.add_argument("--connect", default=ManagerConfig.listen, help="the manager's client endpoint")
    args = parser.parse_args(argv)

    if args.command == "start":
        from manager.server import run  # heavy imports (torch) only when starting

        return run(from_args(args))
    import menos

    print(json.dumps(msgspec.to_builtins(menos.status(args.connect)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
