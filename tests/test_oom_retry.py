"""Out of memory during a compute, in the worker's real I/O shell (its socket replaced by a
recorder): free, release, retry once under an exclusive grant, and still answer."""

import pytest
import torch
from transformers import LlamaConfig

from menos.messages import (Activations, Backward, Error, Forward, Gradients, Hello, LoraSpec, Policy, TokenKind,
                            TokenRelease, TokenRequest)  # fmt: skip
from menos.models import random_model
from worker import main as worker_main
from worker.engine import ServerEngine
from worker.failures import is_fatal, is_oom
from worker.policy import GrantPolicy

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip


class Setup:
    checkpoint_every = 0
    client = Hello()  # no codec


def _worker(fail_times: int, exc: Exception):
    w = worker_main.WorkerProcess.__new__(worker_main.WorkerProcess)
    hello = Hello(head_layers=1, tail_layers=1, adapter=LoraSpec(r=2, alpha=4), batch_size=2, seq_len=8)
    w.engine = ServerEngine(CFG, random_model(CFG).state_dict(), (1, 2), hello, torch.float32)
    w.policy = GrantPolicy(Policy.ON_DEMAND, 10, 40)
    w.serving, w.setup, w.computing, w.saved_step, w.context_lost = None, Setup(), False, 0, False
    w.woken_queue_s = 0.0
    w.sent = []
    w.send = lambda msg, tensors=(): w.sent.append(msg)
    backward = w.engine.backward
    left = [fail_times]

    def flaky(*a, **kw):
        if left[0]:
            left[0] -= 1
            raise exc
        return backward(*a, **kw)

    w.engine.backward = flaky
    return w


def _grant_last_request(w):
    (req,) = [m for m in w.sent if isinstance(m, TokenRequest)][-1:]
    w.run(w.policy.granted(req.request_id))
    return req


def _forward_then_backward(w):
    x = torch.randn(2, 8, 32)
    w.accept(Forward(step=1, train=True), [x])
    _grant_last_request(w)
    assert isinstance(w.sent[-1], Activations)
    w.sent.clear()
    w.accept(Backward(step=1), [torch.randn(2, 8, 32) * 1e-3])
    return _grant_last_request(w)


def test_cpu_out_of_memory_is_retried_under_an_exclusive_grant():
    w = _worker(1, RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    first = _forward_then_backward(w)
    # the failed compute gave its grant back and asked for everything, once
    release, retry = w.sent[1], w.sent[2]
    assert isinstance(release, TokenRelease) and release.request_id == first.request_id
    assert isinstance(retry, TokenRequest) and retry.retry and retry.nbytes == 40  # M_b at least, alone
    assert retry.kind is TokenKind.BACKWARD
    _grant_last_request(w)
    assert isinstance(w.sent[-2], TokenRelease) and w.sent[-2].request_id == retry.request_id
    assert isinstance(w.sent[-1], Gradients) and w.engine.steps == 1  # the step still happened
    assert w.policy.idle


def test_a_second_out_of_memory_answers_with_an_error_and_releases():
    w = _worker(2, torch.cuda.OutOfMemoryError("CUDA out of memory"))
    _forward_then_backward(w)
    retry = _grant_last_request(w)
    assert isinstance(w.sent[-2], TokenRelease) and w.sent[-2].request_id == retry.request_id
    err = w.sent[-1]
    assert isinstance(err, Error) and err.code == "internal" and "out of memory" in err.message
    assert w.policy.idle and w.engine.steps == 0


def test_other_errors_are_not_retried():
    w = _worker(1, ValueError("shape mismatch"))
    first = _forward_then_backward(w)
    assert [type(m).__name__ for m in w.sent] == ["TokenRequest", "TokenRelease", "Error"]
    assert w.sent[1].request_id == first.request_id


@pytest.mark.parametrize("exc, oom, fatal", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), True, False), (MemoryError(), True, False),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), True, False),
    # a real allocation failure on a full GPU that the old check missed
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True, False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False, True),
    (RuntimeError("CUDA error: device-side assert triggered"), False, True),
    (RuntimeError("shape mismatch"), False, False),
])  # fmt: skip
def test_compute_errors_are_classified(exc, oom, fatal):
    assert (is_oom(exc), is_fatal(exc)) == (oom, fatal)


def test_a_fatal_cuda_error_releases_the_grant_and_ends_the_worker():
    w = _worker(1, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(worker_main._Exit):  # noqa: SLF001
        _forward_then_backward(w)
    assert isinstance(w.sent[-1], TokenRelease)  # the grant went back first; the client hears worker_died
    assert w.context_lost  # no final checkpoint from an unusable device


def test_a_worker_failing_every_step_releases_every_grant():
    w = _worker(10, ValueError("broken"))
    for _ in range(10):
        _forward_then_backward(w)
    asked = sum(isinstance(m, TokenRequest) for m in w.sent)
    assert asked == sum(isinstance(m, TokenRelease) for m in w.sent) and w.policy.idle
