"""With three workers attached, the base weights exist once (issue: Sharing)."""

from __future__ import annotations

import glob
import time

import psutil
import pytest
import torch
from transformers import LlamaConfig

import menos
from menos.messages import LoraSpec
from menos.models import random_model, save_checkpoint

# About 400 MB of fp32 weights, nearly all in the 8 blocks (the embeddings are tiny).
BIG = dict(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)  # fmt: skip
EMPTY = dict(BIG, hidden_size=8, intermediate_size=8, num_attention_heads=1, num_key_value_heads=1)


def _serve_three(start_manager, path):
    """Start a manager on ``path``, attach three workers, train a step each; return figures."""
    mgr = start_manager("--model", path)
    # The manager did not load the model itself (its loader did, and is gone): it maps the
    # block it adopted without having touched a page of it.
    deadline = time.monotonic() + 10
    while len(mgr.children()) > 1 and time.monotonic() < deadline:  # the loader exits after its reply
        time.sleep(0.05)
    assert len(mgr.children()) == 1  # the launcher
    assert _resident_in_segment(mgr.pid) == 0
    spec = LoraSpec(r=8, alpha=16)
    clients = [menos.connect(mgr.endpoint, batch_size=1, seq_len=8, adapter=spec) for _ in range(3)]
    try:
        ids = torch.randint(0, 256, (1, 8))
        for c in clients:
            c.train_step(ids)
        status = menos.status(mgr.endpoint)
        workers = {c.pid: psutil.Process(c.pid) for c in status.clients}
        uss = [w.memory_full_info().uss for w in workers.values()]
        # the whole server group: manager, launcher, workers (and any helper process)
        pss_total = sum(p.memory_full_info().pss for p in [psutil.Process(mgr.pid), *mgr.children()])
        (segment,) = glob.glob(f"/dev/shm/menos_{mgr.pid}_*")
        mapped = []
        for pid in workers:  # the kernel's view: each worker maps the manager's one segment
            with open(f"/proc/{pid}/maps") as f:
                mapped.append(segment in f.read())
        return status, uss, pss_total, mapped
    finally:
        for c in clients:
            c.close()


def _resident_in_segment(pid: int) -> int:
    """Bytes of ``pid``'s mappings of Menos segments that are resident (touched)."""
    rss, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                inside = len(head) > 5 and "/dev/shm/menos_" in head[5]
            elif inside and head[0] == "Rss:":
                rss += int(head[1]) * 1024
    return rss


@pytest.mark.timeout(600)
def test_workers_share_one_copy_of_the_base_weights(tmp_path, start_manager):
    big = save_checkpoint(random_model(LlamaConfig(**BIG), seed=0), str(tmp_path / "big"))
    empty = save_checkpoint(random_model(LlamaConfig(**EMPTY), seed=0), str(tmp_path / "empty"))

    status, uss_big, pss_big, mapped = _serve_three(start_manager, big)
    weights = status.shared_bytes
    assert weights >= 300e6
    assert all(mapped)
    assert len(status.clients) == 3
    _, uss_empty, pss_empty, _ = _serve_three(start_manager, empty)

    extra = [b - min(uss_empty) for b in uss_big]
    print(f"\nbase weights: {weights / 1e6:.1f} MB in one shared segment")
    print("worker USS, big model:   " + ", ".join(f"{u / 1e6:.1f} MB" for u in uss_big))
    print("worker USS, empty model: " + ", ".join(f"{u / 1e6:.1f} MB" for u in uss_empty))
    print("extra private memory per worker: " + ", ".join(f"{e / 1e6:.1f} MB ({e / weights:.1%} of weights)" for e in extra))
    print(f"total PSS, manager + launcher + 3 workers: big {pss_big / 1e6:.1f} MB, empty {pss_empty / 1e6:.1f} MB; "
          f"difference {(pss_big - pss_empty) / 1e6:.1f} MB for {weights / 1e6:.1f} MB of weights")  # fmt: skip
    assert max(extra) < 0.10 * weights
    # Had each worker its own copy, the group would pay the weights four times.
    assert pss_big - pss_empty < 1.5 * weights
