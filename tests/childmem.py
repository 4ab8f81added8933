"""Memory measured in a child process, never with the test runner's own high-water mark (which holds whatever
earlier tests allocated, so a growth measured there can read 0 whatever the code under test does).

``in_child(module, function, *args)`` imports ``module`` in a fresh interpreter, calls ``function(*args)`` there
(arguments and result as JSON) and returns the result and how far the child's own peak RSS (VmHWM) rose during
the call, in MiB."""
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
print(json.dumps({"grown_kib": high_water_kib() - base, "result": result}))
"""


def in_child(module: str, function: str, *args, timeout: float = 120) -> tuple[object, float]:
    done = subprocess.run([sys.executable, "-c", _CHILD, module, function, json.dumps(args)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["result"], report["grown_kib"] / 1024
