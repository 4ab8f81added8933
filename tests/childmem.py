"""Memory measured in a child process, never with the test runner's own high-water mark (which holds whatever
earlier tests allocated, so a growth measured there can read 0 whatever the code under test does).

``in_child(module, function, *args)`` imports ``module`` in a fresh interpreter, calls ``function(*args)`` there
(arguments and result as JSON) and returns the result and how far the child's own peak RSS (VmHWM) rose during
the call, in MiB; ``run_in_child`` returns the child's whole report. (Not wait4's ru_maxrss: Linux carries the
spawning process's high-water mark across fork and exec into the child, so it reports the test runner's.)"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD = r"""
import asyncio, importlib, json, sys
def high_water_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
module = importlib.import_module(sys.argv[1])
base = high_water_kib()
result = getattr(module, sys.argv[2])(*json.loads(sys.argv[3]))
if asyncio.iscoroutine(result):
    result = asyncio.run(result)
print(json.dumps({"base_kib": base, "peak_kib": high_water_kib(), "result": result}))
"""


def run_in_child(module: str, function: str, *args, timeout: float = 120, env: dict | None = None) -> dict:
    """``function(*args)`` of ``module`` in a child process (``env``: extra variables for it): its result, and
    the child's own peak RSS after its imports (``base_mib``) and at its end (``peak_mib``)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, module, function, json.dumps(args)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"result": report["result"], "base_mib": report["base_kib"] / 1024, "peak_mib": report["peak_kib"] / 1024}


def in_child(module: str, function: str, *args, timeout: float = 120) -> tuple[object, float]:
    report = run_in_child(module, function, *args, timeout=timeout)
    return report["result"], report["peak_mib"] - report["base_mib"]
