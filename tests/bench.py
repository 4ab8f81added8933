"""``make bench``: figures, not assertions.

1. Throughput: one update (check, stream onto a file slot while hashing, fsync, verify, set the trial) against
   a baseline in the same process: the plainest aiohttp client that downloads the same payload from the same
   development server into a file. The ratio says what hashing, checkpoints and the thread hand-offs cost.
2. Memory: the peak RSS of ``omaha-agent daemon --once`` for a small and a large payload (it must not grow
   with the payload), and the RSS of the idle daemon on a private D-Bus system bus, with whether aiohttp is
   loaded (it is imported only when the first check runs).

Everything talks to 127.0.0.1 only. Run: ``.venv/bin/python -m tests.bench [--size MiB] [--rounds N]``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = "{5b8f2c1e-7a3d-4e6b-9c0f-1d2e3f405162}"
MiB = 1 << 20


def make_payload(path: str, size: int) -> None:
    block = os.urandom(MiB)  # incompressible enough: sniffed as raw, streamed as is
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The development server in its own process, so it does not share the measured process's CPU time."""

    def __init__(self, payload: str, version: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "devserver", "--payload", payload, "--version", version,
             "--appid", APP, "--port", str(self.port)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.close()
            raise RuntimeError("the development server did not start within 30 s")
        self.url = f"http://127.0.0.1:{self.port}/v1/update/"
        self.payload_url = f"http://127.0.0.1:{self.port}/packages/{os.path.basename(payload)}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def device(workdir: str, url: str, slot_size: int, extra: str = "") -> str:
    """A file-slot device with the sim bootloader at 1.0.0; returns its config path."""
    from agent.boot.sim import SimBoot
    os.makedirs(workdir, exist_ok=True)
    slots = {s: os.path.join(workdir, f"slot-{s}.img") for s in "ab"}
    for path in slots.values():
        with open(path, "wb") as f:
            f.truncate(slot_size)
    SimBoot(os.path.join(workdir, "bootenv.json"), slots).initialize("a", "1.0.0")
    config = os.path.join(workdir, "agent.yaml")
    with open(config, "w") as f:
        f.write(f"""server: {{url: "{url}", insecure_http: true, timeout: 30}}
app: {{id: "{APP}", version: "1.0.0"}}
slots:
  a: {{file: {slots['a']}}}
  b: {{file: {slots['b']}}}
boot: {{backend: sim, env: {workdir}/bootenv.json, tries: 2}}
state_dir: {workdir}/state
reboot: {{policy: manual}}
health: {{commands: ["true"], after: start}}
{extra}""")
    return config


async def baseline(url: str, dest: str) -> float:
    import aiohttp
    start = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        resp.raise_for_status()
        with open(dest, "wb") as f:
            async for data in resp.content.iter_chunked(1 << 16):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


async def one_update(workdir: str, url: str, size: int) -> tuple[float, float]:
    """Seconds for the whole update, and for its streaming phase (downloading → verified)."""
    from agent.config import load
    from agent.daemon import Agent
    shutil.rmtree(workdir, ignore_errors=True)
    agent = Agent(load(device(workdir, url, size + MiB)))
    marks: dict[str, float] = {}
    agent.listeners.append(lambda snap: marks.setdefault(snap["operation"], time.perf_counter()))
    start = time.perf_counter()
    try:
        outcome = await agent.run_once()
    finally:
        await agent.close()
    took = time.perf_counter() - start
    if "installed" not in outcome:
        raise RuntimeError(f"the update did not install: {outcome}")
    return took, marks["finalizing"] - marks["downloading"]


def throughput(tmp: str, size: int, rounds: int) -> None:
    payload = os.path.join(tmp, "payload.bin")
    make_payload(payload, size)
    server = Server(payload, "2.0.0")
    try:
        raw, agent = [], []
        for _ in range(rounds):  # interleaved, so a slow patch of the machine hits both
            raw.append(asyncio.run(baseline(server.payload_url, os.path.join(tmp, "raw.bin"))))
            os.unlink(os.path.join(tmp, "raw.bin"))
            agent.append(asyncio.run(one_update(os.path.join(tmp, "dev"), server.url, size)))
    finally:
        server.close()
        os.unlink(payload)
    raw_best = min(raw)
    whole, streaming = min(a[0] for a in agent), min(a[1] for a in agent)
    mib = size / MiB
    print(f"throughput, {mib:.0f} MiB raw payload, best of {rounds}:")
    print(f"  baseline (aiohttp GET into a file + fsync):        {mib / raw_best:7.1f} MiB/s  ({raw_best:.2f} s)")
    print(f"  agent, streaming phase (GET, sha256, slot writes, checkpoints, fsync, verify): "
          f"{mib / streaming:7.1f} MiB/s  ({streaming:.2f} s), ratio {raw_best / streaming:.2f}")
    print(f"  agent, whole update (+ check, 3 event posts, state saves, set trial): "
          f"{mib / whole:7.1f} MiB/s  ({whole:.2f} s), ratio {raw_best / whole:.2f}")
    shutil.rmtree(os.path.join(tmp, "dev"), ignore_errors=True)


def peak_rss_of_once(tmp: str, size: int) -> int:
    payload = os.path.join(tmp, f"payload-{size // MiB}.bin")
    make_payload(payload, size)
    server = Server(payload, "2.0.0")
    try:
        workdir = os.path.join(tmp, f"once-{size // MiB}")
        config = device(workdir, server.url, size + MiB)
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "daemon", "--once", "--config", config],
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        out = proc.stdout.read().decode()
        if os.waitstatus_to_exitcode(status) != 0 or "installed" not in out:
            raise RuntimeError(f"daemon --once failed: {out} {proc.stderr.read().decode()}")
        shutil.rmtree(workdir)
    finally:
        server.close()
        os.unlink(payload)
    return usage.ru_maxrss  # KiB on Linux


def idle_daemon(tmp: str) -> None:
    if shutil.which("dbus-daemon") is None:
        print("idle daemon: dbus-daemon is not installed, skipped")
        return
    sys.path.insert(0, ROOT)
    from tests.conftest import PrivateBus
    bus = PrivateBus()
    try:
        config = device(os.path.join(tmp, "idle"), "http://127.0.0.1:9/v1/update/", 4 * MiB,
                        "schedule: {initial_delay: 3600}\n")
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "daemon", "--config", config], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if subprocess.run([sys.executable, "-m", "agent.cli", "status"], cwd=ROOT, capture_output=True,
                                  env=dict(os.environ, PYTHONPATH=ROOT)).returncode == 0:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError("the daemon did not answer on D-Bus within 30 s")
            time.sleep(2)
            fields = {}
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
            with open(f"/proc/{proc.pid}/maps") as f:
                aiohttp_loaded = "aiohttp" in f.read()
            print(f"idle daemon on D-Bus (after answering a status call): RSS {fields['VmRSS']}, "
                  f"peak {fields['VmHWM']}; aiohttp loaded: {'yes' if aiohttp_loaded else 'no'}")
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        bus.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB of payload for the throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omaha-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        throughput(tmp, args.size * MiB, args.rounds)
        small, large = peak_rss_of_once(tmp, 32 * MiB), peak_rss_of_once(tmp, 512 * MiB)
        print(f"peak RSS of daemon --once: {small / 1024:.1f} MiB for a 32 MiB payload, "
              f"{large / 1024:.1f} MiB for a 512 MiB payload (growth {(large - small) / 1024:+.1f} MiB)")
        idle_daemon(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
