"""A trainer over the split: seconds and bytes per optimizer step, against Client.fit's own loop.

    python -m benchmarks.trainers                                      # the defaults below
    python -m benchmarks.trainers --shape tiny --steps 2 --warmup 1    # CI smoke size

One client on one manager (the iteration-time benchmark's fp32 model, ``--shape``; head 1
block, tail 0; LoRA r=8 on q,v), the same ``--batch`` x ``--seq`` rows of text in every
run, ``--accum`` micro-batches per optimizer step, clipping at 1.0, AdamW:

- ``client.fit``: Menos's own recipe, both optimizers in lockstep (train_step in a loop);
- ``Trainer``: transformers' Trainer over ``client.hf_model()`` (the rows pre-tokenized);
- ``SFTTrainer``: TRL's, over ``client.hf_model()`` from the text.

Each: the median over ``--steps`` optimizer steps after ``--warmup``, timed between step
ends, and the bytes the client sent and received per optimizer step (the cut's
activations and gradients; for the trainers also the server adapter's gradients, once
per step, and its stepped weights). Writes trainers.csv and trainers.png under --out.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings

from benchmarks.common import base_args, describe, model_path, pyplot, table, write_csv
from tools.harness import ManagerProcess


def _texts(n: int, seq: int) -> list[str]:
    """Rows of exactly ``seq`` characters (char_tokenizer: ``seq`` tokens)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jam".split()
    out = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(seq))
        out.append(text[:seq])
    return out


def _connect(endpoint: str, path: str, batch: int, seq: int, accum: int, lr: float):
    import menos
    from menos.messages import LoraSpec

    return menos.connect(endpoint, model=path, head_layers=1, tail_layers=0, batch_size=batch, seq_len=seq,
                         adapter=LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj")), lr=lr,
                         max_grad_norm=1.0, grad_accum_steps=accum)  # fmt: skip


def _traffic(client) -> int:
    return client.bytes_sent + client.bytes_received


def run_fit(endpoint, path, texts, tok, batch, seq, accum, steps, warmup, lr) -> dict:
    import torch

    ids = torch.tensor([tok(t)["input_ids"] for t in texts])
    ends, traffic = [], []
    with _connect(endpoint, path, batch, seq, accum, lr) as c:
        for step in range(warmup + steps):
            for k in range(accum):
                row = (step * accum + k) * batch % len(texts)
                c.train_step(ids[row:row + batch])
            ends.append(time.perf_counter())
            traffic.append(_traffic(c))
    return _summary(ends, traffic, warmup)


def run_trainer(kind, endpoint, path, texts, tok, batch, seq, accum, steps, warmup, lr, out) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    from trl import SFTConfig, SFTTrainer

    ends, traffic = [], []

    with _connect(endpoint, path, batch, seq, accum, lr) as c:
        class StepEnds(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())
                traffic.append(_traffic(c))

        common = dict(output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=batch,
                      gradient_accumulation_steps=accum, learning_rate=lr, max_grad_norm=1.0, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, logging_steps=10_000,
                      dataloader_drop_last=True)  # fmt: skip
        if kind == "SFTTrainer":
            args = SFTConfig(max_length=seq, **common)
            trainer = SFTTrainer(model=c.hf_model(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                 processing_class=tok, callbacks=[StepEnds()])  # fmt: skip
        else:
            rows = [tok(t)["input_ids"] for t in texts]
            ds = Dataset.from_dict({"input_ids": rows, "labels": rows})
            trainer = Trainer(model=c.hf_model(), args=TrainingArguments(**common), train_dataset=ds,
                              data_collator=default_data_collator, callbacks=[StepEnds()])  # fmt: skip
        trainer.train()
    return _summary(ends, traffic, warmup)


def _summary(ends: list[float], traffic: list[int], warmup: int) -> dict:
    seconds = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])] if warmup else []
    moved = [b - a for a, b in zip(traffic[warmup - 1:], traffic[warmup:])] if warmup else []
    return {"s_per_step": statistics.median(seconds), "mb_per_step": statistics.median(moved) / 1e6}


def plot(rows: list[dict], title: str, png: str) -> str:
    import textwrap

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8, 3.5))
    loops = [r["loop"] for r in rows]
    ax.bar(loops, [float(r["s_per_step"]) for r in rows])
    ax.set_ylabel("s / optimizer step (median)")
    bx.bar(loops, [float(r["mb_per_step"]) for r in rows], color="tab:orange")
    bx.set_ylabel("MB on the wire / optimizer step")
    fig.suptitle(textwrap.fill(title, 110), fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def main(argv=None) -> int:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--shape", default="opt-350m-v4k")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker-threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step's end starts the clock)")

    import datasets
    import torch
    import transformers

    from menos.data import char_tokenizer

    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    path = model_path(args.shape, "float32", args.models)
    vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
    tok = char_tokenizer(min(vocab, 256))
    n_rows = args.batch * args.accum * (args.warmup + args.steps)
    texts = _texts(n_rows, args.seq)
    title = (f"{args.shape}-shaped ({describe(path)}), float32, batch {args.batch} x {args.seq}, accumulation "
             f"{args.accum}, LoRA r=8 q,v, 1 client, {args.worker_threads} worker threads")  # fmt: skip
    print(title, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="menos-bench-") as state:
        with ManagerProcess(state, "--model", path, worker_threads=args.worker_threads) as mgr:
            common = (mgr.endpoint, path, texts, tok, args.batch, args.seq, args.accum, args.steps, args.warmup, 1e-4)
            rows.append({"loop": "client.fit", **run_fit(*common)})
            print(f"  client.fit: {rows[-1]['s_per_step']:.3f} s/step", flush=True)
            for kind in ("Trainer", "SFTTrainer"):
                rows.append({"loop": kind, **run_trainer(kind, *common, os.path.join(state, kind))})
                print(f"  {kind}: {rows[-1]['s_per_step']:.3f} s/step", flush=True)
    base = rows[0]["s_per_step"]
    for r in rows:
        r["vs_fit"] = round(r["s_per_step"] / base, 3)
    csv_path = write_csv(os.path.join(args.out, "trainers.csv"), rows)
    png = plot(rows, title, os.path.join(args.out, "trainers.png"))
    print(table(rows, ["loop", "s_per_step", "vs_fit", "mb_per_step"]))
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
