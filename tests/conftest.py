"""Shared fixtures: tiny checkpoints on disk, and a real manager process that is always reaped."""

from __future__ import annotations

import psutil
import pytest
import torch
import transformers
from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from menos.models import random_model, save_checkpoint
from tools.harness import ManagerProcess

torch.set_num_threads(1)  # the suite shares 2 cores with managers and workers
transformers.utils.logging.disable_progress_bar()

TINY = {
    "llama": lambda: LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    # activations dominate its memory at batch 4 x 128: for scheduling tests
    "small": lambda: LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    ),
    # word_embed_proj_dim != hidden_size exercises OPT's project_in / project_out; tied head.
    "opt": lambda: OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
    ),
}  # fmt: skip


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> directory of a tiny seeded-random checkpoint, made on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = save_checkpoint(random_model(TINY[name](), seed=1), str(root / name))
        return made[name]

    return get


@pytest.fixture
def start_manager(tmp_path):
    """Start managers with extra flags; all are stopped and reaped at teardown."""
    started = []

    def start(*args: str, state_dir: str | None = None) -> ManagerProcess:
        m = ManagerProcess(state_dir or str(tmp_path / f"state{len(started)}"), *args)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture(scope="session")
def shared_manager(tmp_path_factory, checkpoints):
    """``shared_manager(name)``: one manager with default flags per checkpoint, shared by
    every test that needs no fresh one (a manager start costs seconds). Tests on it use
    their own identities and look only at their own sessions."""
    started: dict[str, ManagerProcess] = {}

    def get(name: str = "llama") -> ManagerProcess:
        m = started.get(name)
        if m is None or m.proc.poll() is not None:
            m = started[name] = ManagerProcess(str(tmp_path_factory.mktemp(f"shared-{name}")), "--model", checkpoints(name))
        return m

    yield get
    for m in started.values():
        m.stop()


@pytest.fixture(autouse=True, scope="session")
def reap_children():
    """Whatever a test left running is killed at the end of the session."""
    yield
    for c in psutil.Process().children(recursive=True):
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass


# The files that take longest (seconds on this project's 2-core machine, --durations), first:
# `make test` hands whole files to its 2 processes in collection order (--dist loadfile), so
# starting the longest first keeps one process from running a long file alone at the end.
LONGEST_FIRST = ("test_benchmarks.py", "test_scheduling.py", "test_resume.py", "test_tenants.py", "test_cluster.py",
                 "test_chain.py", "test_estimate.py", "test_generation.py", "test_trainers.py",
                 "test_outside_memory.py", "test_audit.py", "test_memory_sharing.py", "test_first_hour.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
