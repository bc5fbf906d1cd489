"""make gpu-check (or tools/gpu-check-offline.sh on a machine with no registry): the GPU
path, checked in one command by a GPU's owner.

Runs, each as its own step with a pass or fail: the imports and the supported-release
check; the tests that touch transformers' internals and the CUDA tests, under this
machine's own releases; the demo with ``--device cuda``; the memory and iteration-time
benchmarks at a small size on CUDA; and a reading of NVML's per-process device memory
(each worker's CUDA context shows there) while a manager serves two clients. Every step
has a time cap and all share ``--budget-s``, so a lent machine's minutes leave room for
a second try. The report, OUT/gpu_check.md (and .json: device, driver, torch and CUDA
versions, and per step its result, time and the end of its output), is rewritten after
each step. Without a GPU it says so and exits non-zero; ``--allow-no-gpu`` runs the CPU
steps alone (a dry run of the offline path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# The tests that touch transformers' internals (surgery, caches, masks, PEFT's layers) and
# the ones with CUDA cases: on a lent machine they run under the image's own releases.
TESTS = ["tests/test_versions.py", "tests/test_sharing.py", "tests/test_swap.py", "tests/test_outside_memory.py",
         "tests/test_split_parity.py", "tests/test_generation.py", "tests/test_methods.py", "tests/test_scoring.py",
         "tests/test_adapter_export.py", "tests/test_qlora.py"]  # fmt: skip


@dataclass(frozen=True)
class Step:
    name: str
    cmd: list[str]
    cuda: bool  # needs a CUDA device (else it runs on the CPU too: a dry run checks it)
    cap_s: float  # the most it may take, so the whole check fits a lent machine's minutes


def steps(out: str) -> list[Step]:
    gpu_out = os.path.join(out, "gpu")
    return [
        Step("imports and versions", [PY, "-c", IMPORTS], cuda=False, cap_s=60),
        Step("tests under this machine's releases", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                                     "--timeout", "120", *TESTS], cuda=False, cap_s=240),
        Step("demo on cuda", [PY, "-m", "tools.demo", "--device", "cuda", "--steps", "10"], cuda=True, cap_s=120),
        Step("persistent memory, cuda", [PY, "-m", "benchmarks.persistent_memory", "--device", "cuda", "--shape", "small",
                                         "--dtype", "float32", "--clients", "2", "--out", gpu_out], cuda=True, cap_s=120),
        Step("iteration time, cuda", [PY, "-m", "benchmarks.iteration_time", "--device", "cuda", "--shape", "small",
                                      "--clients", "1-3", "--steps", "3", "--out", gpu_out], cuda=True, cap_s=150),
        Step("per-process device memory", [PY, "-m", "tools.gpu_check", "--nvml-processes"], cuda=True, cap_s=90),
    ]  # fmt: skip


# Every module the server and the client import, and the supported-release check.
IMPORTS = """
import importlib, sys
for m in ["zmq", "msgspec", "psutil", "safetensors", "prometheus_client", "pynvml", "peft", "transformers",
          "torch", "menos.client", "manager.server", "worker.main", "tools.demo", "benchmarks.common"]:
    importlib.import_module(m)
from menos.versions import check_transformers
check_transformers()
import torch, transformers, peft, zmq, msgspec
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "pyzmq", zmq.__version__, "msgspec", msgspec.__version__)
"""


def device_facts() -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
             "cuda_available": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(device=p.name, memory_bytes=p.total_memory, devices=torch.cuda.device_count())
        try:
            import pynvml

            pynvml.nvmlInit()
            facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001
            facts["driver"] = f"NVML unavailable: {exc}"
    return facts


def nvml_processes() -> int:
    """A manager on cuda with two clients; print each server process's device memory."""
    import menos
    from tools.harness import ManagerProcess

    with tempfile.TemporaryDirectory(prefix="menos-gpu-") as state, ManagerProcess(state, "--device", "cuda") as mgr:
        clients = [menos.connect(mgr.endpoint, batch_size=2, seq_len=32, seed=i) for i in range(2)]
        try:
            for c in clients:
                c.train_step(__import__("torch").randint(0, 256, (2, 32)))
            used = mgr.gpu_bytes()
        finally:
            for c in clients:
                c.close()
    print(json.dumps({str(pid): b for pid, b in used.items()}))
    return 0 if len(used) >= 1 else 1


def run_step(step: Step, timeout_s: float) -> dict:
    """One step in its own process group (a timeout ends the managers it started too)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(step.cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        result = "PASS" if proc.returncode == 0 else "FAIL"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        result, output = "FAIL", f"{output}\n[gpu-check: stopped after {timeout_s:.0f} s]"
    return {"step": step.name, "result": result, "seconds": round(time.monotonic() - t0, 1),
            "output_tail": output[-3000:]}  # fmt: skip


def write_report(out: str, facts: dict, results: list[dict]) -> str:
    """Written after every step: a run cut short still leaves what it found."""
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({"device": facts, "steps": results}, f, indent=2)
    lines = ["# gpu-check", "", *(f"- {k}: {v}" for k, v in facts.items()), ""]
    lines += [f"| {r['result']} | {r['step']} | {r['seconds']} s |" for r in results]
    lines.insert(len(lines) - len(results), "| result | step | time |\n|---|---|---:|")
    for r in results:
        lines += ["", f"## {r['result']}: {r['step']} ({r['seconds']} s)", "", "```", r["output_tail"].strip(), "```"]
    path = os.path.join(out, "gpu_check.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description="The CUDA path in one report.")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"), help="where the report goes")
    parser.add_argument("--budget-s", type=float, default=480, help="all steps together stop after this")
    parser.add_argument("--allow-no-gpu", action="store_true",
                        help="without a CUDA device: run the CPU steps, skip the CUDA ones, exit 0 if they pass (a dry run)")
    parser.add_argument("--nvml-processes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.nvml_processes:
        return nvml_processes()
    facts = device_facts()
    if not facts["cuda_available"] and not args.allow_no_gpu:
        print("gpu-check: no CUDA device is visible here (torch.cuda.is_available() is False); "
              "run it on a machine with a GPU and a CUDA build of torch (--allow-no-gpu: the CPU steps only)",
              file=sys.stderr)  # fmt: skip
        return 2
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    results = []
    for step in steps(args.out):
        left = deadline - time.monotonic()
        if step.cuda and not facts["cuda_available"]:
            results.append({"step": step.name, "result": "SKIP", "seconds": 0.0, "output_tail": "no CUDA device"})
        elif left < 5:
            results.append({"step": step.name, "result": "FAIL", "seconds": 0.0,
                            "output_tail": f"not started: the check's --budget-s {args.budget_s:.0f} was spent"})  # fmt: skip
        else:
            results.append(run_step(step, min(step.cap_s, left)))
        r = results[-1]
        print(f"{r['result']}  {r['step']} ({r['seconds']} s)", flush=True)
        path = write_report(args.out, facts, results)
    print(f"wrote {path}")
    return 0 if all(r["result"] != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
