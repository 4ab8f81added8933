"""``omaha-agent demo`` as a user runs it (a child process, no root): every scenario behaves as it says, and the
adaptive update (2.0.0 → 2.1.0, one MiB of 16 changed) fetches a small part of its payload."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_adaptive_update_fetches_under_a_quarter_of_its_payload(tmp_path):
    done = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--dir", str(tmp_path / "device")], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    assert "demo: all four scenarios behaved as described" in out, out[-3000:]
    m = re.search(r"Fetched (\d+) bytes in (\d+) requests \(the index and the ranges\) instead of (\d+)", out)
    assert m, out[-3000:]
    fetched, requests, payload = (int(g) for g in m.groups())
    print(f"\ndemo: the adaptive update fetched {fetched} of {payload} payload bytes ({fetched / payload:.3f}) in "
          f"{requests} requests")
    assert 1 << 20 < fetched < payload // 4  # the changed MiB, not the whole payload
    assert "Slot a holds 2.1.0 byte for byte: yes" in out


def test_demo_without_the_build_extra_skips_the_adaptive_scenario_and_still_passes(tmp_path):
    # a device-only install has no pyfastcdc: a package of that name that fails to import stands in for its absence
    shadow = tmp_path / "shadow" / "pyfastcdc"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('pyfastcdc is not installed')\n")
    done = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--dir", str(tmp_path / "device")], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=f"{shadow.parent}:{ROOT}"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Scenario 4 (an adaptive update) skipped: cutting an image needs pyfastcdc" in done.stdout
    assert "demo: the first three scenarios behaved as described" in done.stdout
