"""What the benchmark scripts share: model shapes, the client process, CSV and plots.

Models are seeded random weights in a transformers config's shape (nothing can be
downloaded here), saved once as a real checkpoint under benchmarks/results/models.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

SHAPES = {
    # OPT-1.3B's dimensions (facebook/opt-1.3b): the paper's smaller model.
    "opt-1.3b": lambda: OPTConfig(
        vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
        max_position_embeddings=2048, word_embed_proj_dim=2048, dropout=0.0,
    ),
    # OPT-350M's blocks (24 x 1024 wide) with a small vocabulary: a 2-core CPU can
    # train several clients on it while its base weights (1.1 GB fp32) dominate memory,
    # as OPT-1.3B's do on a V100.
    "opt-350m-v4k": lambda: OPTConfig(
        vocab_size=4096, hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
        max_position_embeddings=2048, word_embed_proj_dim=1024, dropout=0.0,
    ),
    # Hundreds of tenants (benchmarks/tenants.py): OPT-350M's blocks, 6 of them, and a vocabulary
    # small enough that 256 clients' ends (embeddings and head) fit beside the server.
    "opt-350m-blocks": lambda: OPTConfig(
        vocab_size=512, hidden_size=1024, ffn_dim=4096, num_hidden_layers=6, num_attention_heads=16,
        max_position_embeddings=256, word_embed_proj_dim=1024, dropout=0.0,
    ),
    # CI: weights (100 MB fp32, 88 MB in the server's 7 blocks) well above the noise in a
    # process's memory, so two vanilla copies visibly exceed one shared copy.
    "small": lambda: OPTConfig(
        vocab_size=256, hidden_size=512, ffn_dim=2048, num_hidden_layers=8, num_attention_heads=8,
        max_position_embeddings=128, word_embed_proj_dim=512, dropout=0.0,
    ),
    # Privacy: a Llama and an OPT beside the built-in model, 6 blocks (cuts 1, 2, 4).
    "privacy-llama": lambda: LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "privacy-opt": lambda: OPTConfig(
        vocab_size=256, hidden_size=256, ffn_dim=1024, num_hidden_layers=6, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=256, dropout=0.0,
    ),
    # and the other two supported architectures (python -m benchmarks.privacy --models-list mistral qwen2 --runs 2)
    "privacy-mistral": lambda: MistralConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
    "privacy-qwen2": lambda: Qwen2Config(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
    # CI smoke runs.
    "tiny": lambda: OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.0,
    ),
}  # fmt: skip


def model_path(shape: str, dtype: str, root: str = RESULTS) -> str:
    """A checkpoint of ``shape`` in ``dtype`` (made once, then reused)."""
    import torch

    from menos.models import random_model, save_checkpoint
    from menos.wire import dtype_from_name

    path = os.path.join(root, "models", f"{shape}-{dtype}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(f"making the {shape} checkpoint ({dtype}, seeded random weights) in {path}", flush=True)
        torch.set_num_threads(os.cpu_count() or 1)
        save_checkpoint(random_model(SHAPES[shape](), seed=0, dtype=dtype_from_name(dtype)), path)
    return path


def describe(path: str) -> str:
    """'opt, 24 blocks, hidden 2048, 1.32 B parameters' for a checkpoint."""
    from transformers import AutoConfig

    from menos.estimator import model_params

    c = AutoConfig.from_pretrained(path)
    return (f"{c.model_type}, {c.num_hidden_layers} blocks, hidden {c.hidden_size}, vocab {c.vocab_size}, "
            f"{model_params(c) / 1e6:,.1f} M parameters")  # fmt: skip


def base_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=RESULTS, help="where CSV and PNG go (default: benchmarks/results)")
    p.add_argument("--models", default=RESULTS, help="where the generated checkpoints are kept")
    p.add_argument("--threads", action="store_true",
                   help="run the clients as threads of this process (quick checks); default: a process each")
    return p


def counts(text: str) -> list[int]:
    """'1,2,4' or '1-6' -> client counts."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(c) for c in text.split(",")]


def train_client(endpoint: str, connect: dict, steps: int, warmup: int, vocab: int, seed: int, barrier) -> dict:
    """A client process: connect, wait for the others, train ``warmup + steps`` steps on
    random tokens, return the losses and the median step times after the warm-up."""
    import torch
    import transformers

    import menos

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # one bar per client drowns the results
    gen = torch.Generator().manual_seed(seed)
    with menos.connect(endpoint, seed=seed, **connect) as client:
        barrier.wait()  # everyone's worker is up: start together
        t0 = time.perf_counter()
        losses = [
            client.train_step(torch.randint(0, vocab, (connect["batch_size"], connect["seq_len"]), generator=gen))
            for _ in range(warmup + steps)
        ]
        wall = time.perf_counter() - t0
        barrier.wait()  # nobody leaves (and frees memory) before everyone is done
        return {"losses": losses, "wall_s": wall, **client.times.summary(skip=warmup)}


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def write_csv(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` (floats to 3 significant decimals)."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
