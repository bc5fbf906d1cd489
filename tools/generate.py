"""menos-generate: what a model fine-tuned through Menos says, with the base on the server.

    menos-generate --connect tcp://HOST:5555 --adapter ./adapter --prompt "Once upon a time"

Connects as a client (one prompt, batch 1), starts from the PEFT adapter that
``Client.save_adapter`` wrote (``--adapter``; without it, the base alone) and prints the
new text as it is produced. The tokenizer is ``--tokenizer``, else the adapter's base
model or ``--model`` where that directory ships one. A model without a tokenizer (the
built-in one has random weights and none) takes ``--prompt-ids`` and prints token ids.

Every argument is checked, and the endpoint reached, before torch and transformers are
imported (seconds): a mistake is one line on stderr (exit status 2; 1 for an endpoint
that does not answer or a server that refuses).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from menos.adapter_files import check_weights
from menos.client_config import ClientConfig
from menos.errors import MenosError
from menos.messages import ErrorCode
from tools.cli_args import OneLineParser, read_json_object


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="menos-generate", allow_abbrev=False,
                                description="Generate text through a Menos server from a trained adapter.")  # fmt: skip
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the manager's (or cluster's) endpoint")
    p.add_argument("--adapter", help="a PEFT adapter directory (Client.save_adapter); default: the base alone")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt's text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", help="the prompt as space-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--tokenizer", help="a directory with the tokenizer (default: the adapter's base model, --model)")
    p.add_argument("--model", help="a local checkpoint of the base (default: the server sends this client's sections)")
    p.add_argument("--client-key", help="CURVE: your .key_secret file")
    p.add_argument("--server-key", help="CURVE: the server's public .key file")
    return p


def find_tokenizer(args: argparse.Namespace, base_model: str | None):
    """The first of --tokenizer, the adapter's base model and --model that holds a tokenizer, or None."""
    from transformers import AutoTokenizer

    for where in (args.tokenizer, base_model, args.model):
        if where and os.path.isdir(os.path.expanduser(where)):
            try:
                return AutoTokenizer.from_pretrained(os.path.expanduser(where), local_files_only=True)
            except (OSError, ValueError):
                if where == args.tokenizer:
                    raise ValueError(f"--tokenizer {where}: no tokenizer there") from None
    return None


class IdStreamer:
    """Prints new token ids as they come (a model without a tokenizer)."""

    def __init__(self):
        self.prompt = True

    def put(self, value) -> None:
        if self.prompt:
            self.prompt = False
            return
        print(" ".join(str(int(t)) for t in value.reshape(-1)), end=" ", flush=True)

    def end(self) -> None:
        print(flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ids, base_model = check_args(args)
        check_reachable(args.connect, ClientConfig.connect_timeout_s, args.client_key, args.server_key)
        generate(args, ids, base_model)
    except MenosError as exc:
        print(f"menos-generate: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"menos-generate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read, a socket's failure: no traceback either
        print(f"menos-generate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def check_args(args: argparse.Namespace) -> tuple[list[int] | None, str | None]:
    """(the prompt's ids, if given as ids; the adapter's base model), or ValueError naming
    the flag: every check that needs no torch, before its import."""
    from menos.channel import check_endpoint

    try:
        check_endpoint(args.connect)
    except ValueError as exc:
        raise ValueError(f"--connect: {exc}") from None
    for flag, ok, want in (("max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
                           ("temperature", args.temperature > 0, "more than 0"),
                           ("top_k", args.top_k is None or args.top_k >= 1, "at least 1"),
                           ("top_p", args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]")):  # fmt: skip
        if not ok:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be {want}")
    for flag in ("tokenizer", "model"):
        where = getattr(args, flag)
        if where and not os.path.isdir(os.path.expanduser(where)):
            raise ValueError(f"--{flag} {where}: no such directory")
    _check_keys(args)
    base_model = _adapter_base(args.adapter) if args.adapter else None
    if args.prompt is not None:
        if not any(w and os.path.isdir(os.path.expanduser(w)) for w in (args.tokenizer, base_model, args.model)):
            raise ValueError("no tokenizer found for --prompt (pass --tokenizer DIR, or --prompt-ids)")
        return None, base_model
    return _prompt_ids(args.prompt_ids), base_model


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: space-separated integers") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    if min(ids) < 0:
        raise ValueError(f"--prompt-ids {text!r}: token ids are 0 or more")
    return ids


def _check_keys(args: argparse.Namespace) -> None:
    if (args.client_key is None) != (args.server_key is None):
        raise ValueError("CURVE needs both --client-key (your .key_secret file) and --server-key (the server's .key)")
    for flag in ("client_key", "server_key"):
        path = getattr(args, flag)
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")


def _adapter_base(adapter: str) -> str | None:
    """The base model an adapter directory names (its tokenizer's likely home), checking
    that it is one; menos.export checks the rest once PEFT is imported."""
    directory = os.path.expanduser(adapter)
    if not os.path.isdir(directory):
        raise ValueError(f"--adapter {adapter}: no such directory (one that Client.save_adapter wrote)")
    path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--adapter {adapter}: no adapter_config.json there; is it a PEFT adapter directory?")
    config = read_json_object(path, f"--adapter {adapter}")
    check_weights(directory, f"--adapter {adapter}")
    base = config.get("base_model_name_or_path")
    return base if isinstance(base, str) else None


def check_reachable(endpoint: str, timeout_s: float, client_key: str | None, server_key: str | None) -> None:
    """MenosError now if nothing answers at ``endpoint`` (or its handshake fails), rather
    than after the imports and connect's own wait."""
    from menos.channel import Channel
    from menos.keys import CurveKeys

    _tcp_probe(endpoint, timeout_s)
    try:
        curve = CurveKeys.load(client_key, server_key) if client_key else None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--client-key/--server-key: {exc}") from None
    chan = Channel(endpoint, timeout_s, curve)
    try:
        chan.wait_connected(timeout_s)
    except MenosError as exc:
        raise MenosError(exc.code, f"--connect: {exc.message}") from None
    finally:
        chan.close()


def _tcp_probe(endpoint: str, timeout_s: float) -> None:
    """A refused TCP connection is known at once; ZeroMQ would retry until the timeout."""
    if not endpoint.startswith("tcp://"):
        return
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except socket.gaierror as exc:
        raise ValueError(f"--connect {endpoint}: no such host {host!r} ({exc.strerror})") from None
    except OSError as exc:
        raise MenosError(ErrorCode.UNREACHABLE, f"--connect {endpoint}: nothing answered ({exc.strerror or exc}); "
                         "is a manager running there? start one (menos-manager start) or pass its endpoint") from None  # fmt: skip


def generate(args: argparse.Namespace, ids: list[int] | None, base_model: str | None) -> None:
    """Load the tokenizer, connect and print what the model generates (the imports are here)."""
    import menos

    tokenizer = find_tokenizer(args, base_model)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("no tokenizer found for --prompt (pass --tokenizer DIR, or --prompt-ids)")
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids.tolist()[0]
    if tokenizer is not None:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer)  # the prompt too: the tokenizer decides the spacing after it
    else:
        streamer = IdStreamer()
    with menos.connect(args.connect, batch_size=1, seq_len=len(ids), model=args.model, init_adapter=args.adapter,
                       client_key=args.client_key, server_key=args.server_key) as c:  # fmt: skip
        c.generate([ids], max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, streamer=streamer)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
