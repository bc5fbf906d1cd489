"""The worker's start-up profile vs memory measured during real training steps."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
from transformers import LlamaConfig, OPTConfig

from menos.messages import Hello, LoraSpec, Recipe
from menos.models import random_model
from menos.procs import malloc_trim
from worker.engine import ServerEngine
from worker.profiling import profile

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def sampled_peak_bytes(fn) -> int:
    """A different method from the profile's kernel high-water mark: a thread samples the
    current RSS (/proc/self/statm) as fast as it can while ``fn`` runs."""
    gc.collect()
    malloc_trim()
    base = _rss()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak[0] - base


CONFIGS = {
    "llama": LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
    "opt": OPTConfig(vocab_size=256, hidden_size=256, ffn_dim=1024, num_hidden_layers=6, num_attention_heads=4,
                     max_position_embeddings=512, dropout=0.0),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("batch, seq", [(4, 64), (4, 128)])
def test_profiled_backward_memory_matches_real_steps(arch, batch, seq):
    cfg = CONFIGS[arch]
    torch.set_num_threads(1)
    engine = ServerEngine(cfg, random_model(cfg).state_dict(), (1, 6), Hello(head_layers=1, tail_layers=0, batch_size=batch, seq_len=seq, recipe=Recipe(lr=1e-3)),
                          torch.float32)  # fmt: skip
    before = [p.detach().clone() for p in engine.params]
    prof = profile(engine, batch, seq)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.params)), "profiling changed the adapter"
    assert not engine.optimizer.state and engine.steps == 0

    real = []
    for step in range(3):  # real steps: client-like activations, then the backward
        engine.forward(step, torch.randn(batch, seq, cfg.hidden_size), train=True)
        grad = torch.randn(batch, seq, cfg.hidden_size) * 1e-3
        real.append(sampled_peak_bytes(lambda: engine.backward(step, grad, want_input_grad=True)))
    peak = max(real)
    err = abs(prof.m_b - peak) / peak
    print(f"\n{arch} B={batch} T={seq}: profiled M_b {prof.m_b / 1e6:.1f} MB ({prof.method}); "
          f"sampled RSS peak of real steps {peak / 1e6:.1f} MB; error {err:.1%}")  # fmt: skip
    assert err < 0.15  # README: the figures measured, and this bound
    assert 0 < prof.m_f < prof.m_b
