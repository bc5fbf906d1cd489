"""menos-generate: what a model fine-tuned through Menos says, with the base on the server.

    menos-generate --connect tcp://HOST:5555 --adapter ./adapter --prompt "Once upon a time"

Connects as a client (one prompt, batch 1), starts from the PEFT adapter that
``Client.save_adapter`` wrote (``--adapter``; without it, the base alone) and prints the
new text as it is produced. The tokenizer is ``--tokenizer``, else the adapter's base
model or ``--model`` where that directory ships one. A model without a tokenizer (the
built-in one has random weights and none) takes ``--prompt-ids`` and prints token ids.
"""

from __future__ import annotations

import argparse
import os
import sys

from menos.errors import MenosError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="menos-generate", allow_abbrev=False,
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
        import menos

        base_model = None
        if args.adapter:
            import json

            path = os.path.join(os.path.expanduser(args.adapter), "adapter_config.json")
            if os.path.isfile(path):
                with open(path) as f:
                    base_model = json.load(f).get("base_model_name_or_path")
        tokenizer = find_tokenizer(args, base_model)
        if args.prompt is not None:
            if tokenizer is None:
                raise ValueError("no tokenizer found for --prompt (pass --tokenizer DIR, or --prompt-ids)")
            ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        else:
            try:
                ids = [[int(t) for t in args.prompt_ids.split()]]
            except ValueError:
                raise ValueError(f"--prompt-ids {args.prompt_ids!r}: space-separated integers") from None
            if not ids[0]:
                raise ValueError("--prompt-ids is empty")
        if tokenizer is not None:
            from transformers import TextStreamer

            streamer = TextStreamer(tokenizer)  # the prompt too: the tokenizer decides the spacing after it
        else:
            streamer = IdStreamer()
        with menos.connect(args.connect, batch_size=1, seq_len=len(ids[0]), model=args.model,
                           init_adapter=args.adapter, client_key=args.client_key, server_key=args.server_key) as c:  # fmt: skip
            c.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, streamer=streamer)  # fmt: skip
    except MenosError as exc:
        print(f"menos-generate: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"menos-generate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
