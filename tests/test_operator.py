"""Operator and user experience against a real manager: status, metrics, fit, text data."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch

import menos
from menos.data import ByteTokenizer, load_texts, text_batches, tokenizer_for
from menos.messages import LoraSpec

CLIENT = dict(batch_size=2, seq_len=16, adapter=LoraSpec(r=4, alpha=8), lr=2e-2)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_status_and_metrics_match_what_the_scheduler_holds(checkpoints, start_manager):
    port = _free_port()
    mgr = start_manager("--model", checkpoints("llama"), "--policy", "preserve", "--memory-capacity", "512MiB",
                        "--metrics-port", str(port))  # fmt: skip
    with menos.connect(mgr.endpoint, identity="alice", head_layers=2, tail_layers=1, **CLIENT) as a, \
         menos.connect(mgr.endpoint, **CLIENT) as b:  # fmt: skip
        for _ in range(2):
            a.train_step(IDS)
        b.train_step(IDS)
        pending = a.forward_step(IDS)  # preserve: a's token is held until its backward
        out = subprocess.run([sys.executable, "-m", "manager", "status", "--json", "--connect", mgr.endpoint],
                             capture_output=True, text=True, check=True)  # fmt: skip
        st = json.loads(out.stdout)
        table = subprocess.run([sys.executable, "-m", "manager", "status", "--connect", mgr.endpoint],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        m = _metrics(port)
        a.backward_step(pending)
        m_after = _metrics(port)

    assert set(st) == {"model", "memory", "queue", "workers", "clients"}
    assert st["workers"] == {"live": 2, "max": 0, "parked": 0}
    assert st["model"]["type"] == "llama" and st["model"]["bytes"] == st["memory"]["shared"] > 0
    assert st["memory"]["capacity"] == 512 * 2**20
    clients = {c["session"]: c for c in st["clients"]}
    ca, cb = clients[a.session], clients[b.session]
    assert st["memory"]["granted"] == ca["m_b"]  # exactly a's held preserve token
    # each session's standing memory (A + O and its kept input) is held inside the capacity, outside any token
    assert st["memory"]["standing"] == ca["standing_bytes"] + cb["standing_bytes"]
    assert ca["standing_bytes"] == ca["persistent_bytes"] + 2 * 16 * 64 * 4  # batch x seq x hidden, fp32
    assert st["memory"]["free"] == st["memory"]["capacity"] - st["memory"]["standing"] - ca["m_b"]
    assert st["queue"] == {"length": 0, "policy": "preserve"}
    assert ca["identity"] == "alice" and cb["identity"] == ""
    assert (ca["head_layers"], ca["server_layers"], ca["tail_layers"]) == (2, [2, 3], 1)
    assert (ca["steps"], cb["steps"]) == (2, 1)
    assert ca["adapter"]["r"] == 4 and ca["persistent_bytes"] > 0 and 0 < ca["m_f"] < ca["m_b"]
    assert ca["state"] == "computing" and cb["state"] == "idle"
    # preserve: one grant covers forward and backward; plus each worker's start-up grant
    assert ca["requests"] == 1 + 3 and cb["requests"] == 1 + 1
    assert a.session in table and "alice" in table and "policy preserve" in table

    assert m["menos_memory_capacity_bytes"] == 512 * 2**20
    assert m["menos_memory_granted_bytes"] == ca["m_b"]
    assert m["menos_clients_connected"] == 2
    assert m['menos_grants_total{kind="forward"}'] == 4
    assert m['menos_grants_total{kind="load"}'] == 2  # one start-up grant per worker
    assert m["menos_queue_seconds_count"] == 2 + 4
    assert m_after["menos_releases_total"] == 2 + 4 and m_after["menos_memory_granted_bytes"] == 0
    assert m_after["menos_compute_seconds_count"] == 2 + 4 and m_after["menos_compute_seconds_sum"] > 0


def test_fit_returns_a_falling_loss_history_from_text(checkpoints, shared_manager, tmp_path):
    """The README's realistic example: a local checkpoint, a JSONL file of texts, fit()."""
    path = checkpoints("llama")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["the cat sat on the mat. " * 4, "a b c d " * 8]))
    mgr = shared_manager("llama")
    texts = load_texts(str(data))
    tok = tokenizer_for(path)
    assert isinstance(tok, ByteTokenizer)  # the tiny checkpoint ships no tokenizer
    batch = next(text_batches(texts, tok, batch_size=2, seq_len=16))
    with menos.connect(mgr.endpoint, model=path, **CLIENT) as c:
        history = c.fit(itertools.repeat(batch), steps=8, eval_batches=[batch], progress=False)
    assert len(history) == 8
    assert history[-1] < history[0] - 0.1
    assert len(c.eval_losses) == 1 and c.eval_losses[0] < history[0]


def test_text_helpers(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("héllo world")
    assert load_texts(str(txt)) == ["héllo world"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="b.jsonl:2"):
        load_texts(str(bad))
    batches = text_batches(["héllo world"], ByteTokenizer(), batch_size=3, seq_len=5, seed=1)
    b = next(batches)
    assert b.shape == (3, 5) and b.dtype == torch.long and int(b.max()) < 256
