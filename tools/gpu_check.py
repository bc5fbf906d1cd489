"""make gpu-check: the GPU path, checked in one command by a GPU's owner.

Runs, each as its own step with a pass or fail: the CUDA tests, the demo with
``--device cuda``, the memory and iteration-time benchmarks at a small size on CUDA,
and a reading of NVML's per-process device memory (each worker's CUDA context shows
there) while a manager serves two clients. Writes one report,
benchmarks/results/gpu_check.md (and .json): device, driver, torch and CUDA versions,
and per step its result, time and the end of its output. Without a GPU it says so and
exits non-zero.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "results")
PY = sys.executable

STEPS = [
    ("cuda tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sharing.py", "tests/test_swap.py",
                    "tests/test_outside_memory.py"]),
    ("demo on cuda", [PY, "-m", "tools.demo", "--device", "cuda", "--steps", "10"]),
    ("persistent memory, cuda", [PY, "-m", "benchmarks.persistent_memory", "--device", "cuda", "--shape", "small",
                                 "--dtype", "float32", "--clients", "2", "--out", os.path.join(OUT, "gpu")]),
    ("iteration time, cuda", [PY, "-m", "benchmarks.iteration_time", "--device", "cuda", "--shape", "small",
                              "--clients", "1-3", "--steps", "3", "--out", os.path.join(OUT, "gpu")]),
    ("per-process device memory", [PY, "-m", "tools.gpu_check", "--nvml-processes"]),
]  # fmt: skip


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--nvml-processes"]:
        return nvml_processes()
    facts = device_facts()
    if not facts["cuda_available"]:
        print("gpu-check: no CUDA device is visible here (torch.cuda.is_available() is False); "
              "run it on a machine with a GPU and a CUDA build of torch", file=sys.stderr)  # fmt: skip
        return 2
    os.makedirs(OUT, exist_ok=True)
    results = []
    for name, cmd in STEPS:
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        results.append({"step": name, "passed": proc.returncode == 0, "seconds": round(time.monotonic() - t0, 1),
                        "output_tail": (proc.stdout + proc.stderr)[-3000:]})  # fmt: skip
        print(f"{'PASS' if proc.returncode == 0 else 'FAIL'}  {name} ({results[-1]['seconds']} s)", flush=True)
    report = {"device": facts, "steps": results}
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["# gpu-check", "", *(f"- {k}: {v}" for k, v in facts.items()), ""]
    for r in results:
        lines += [f"## {'PASS' if r['passed'] else 'FAIL'}: {r['step']} ({r['seconds']} s)", "", "```",
                  r["output_tail"].strip(), "```", ""]  # fmt: skip
    with open(os.path.join(OUT, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {os.path.join(OUT, 'gpu_check.md')}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
