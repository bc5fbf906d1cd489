"""Out of memory during a compute: free, release, retry once under an exclusive grant."""

import pytest

from worker.main import is_oom, run_with_oom_retry


class Grants:
    def __init__(self):
        self.log = []

    def release(self):
        self.log.append("release")

    def exclusive(self):
        self.log.append("exclusive")
        return lambda: self.log.append("release exclusive")


def test_oom_is_retried_once_under_an_exclusive_grant():
    g, calls = Grants(), []

    def fn():
        calls.append("fn")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    out = run_with_oom_retry(fn, lambda: calls.append("retry") or 42, g.release, g.exclusive)
    assert out == 42 and calls == ["fn", "retry"]
    assert g.log == ["release", "exclusive", "release exclusive"]


def test_second_oom_propagates_and_still_releases():
    g = Grants()

    def oom():
        raise MemoryError()

    with pytest.raises(MemoryError):
        run_with_oom_retry(oom, oom, g.release, g.exclusive)
    assert g.log == ["release", "exclusive", "release exclusive"]


def test_other_errors_are_not_retried():
    g = Grants()
    with pytest.raises(ValueError):
        run_with_oom_retry(lambda: (_ for _ in ()).throw(ValueError("x")), lambda: 1, g.release, g.exclusive)
    assert g.log == []


def test_is_oom_recognises_cuda_and_cpu_messages():
    import torch

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
