"""``make bench``: figures, never pass/fail.

Everything runs on this machine and talks to 127.0.0.1 only. Payloads come from nginx (started and stopped
here, with a configuration in a temporary directory), the Omaha check from the development server, whose
payload URLs point at nginx (``devserver --payload-base``), so the server is not what is measured.

1. Throughput, in the same run, alternating, median of several rounds (``BENCH_MIB``, default 1024):
   - the machine's limit: each stage alone (``curl`` from nginx into /dev/null, ``openssl dgst -sha256`` of
     the cached payload, ``dd`` of zeros onto a slot file with O_DIRECT and fsync) and the slowest of them;
   - the shell pipeline doing the agent's job: ``curl | tee >(openssl dgst -sha256) | dd oflag=direct
     conv=fsync``;
   - the agent: a whole update through ``omaha-agent daemon --once`` (check, the release's signature, stream
     onto a file slot while hashing, fsync, verify, set the trial, report), measured from outside the process.
     Each payload is signed with a release key made for the run (``<payload>.sig`` beside it on nginx) and the
     devices trust it: ``trust.require_signature`` stays on, as in the default configuration.
   Every command runs under a small reaper (this module with ``--reap``) that waits for all its descendants,
   process substitutions included, so CPU time and peak RSS cover the whole pipeline.
2. Memory: the peak RSS of ``daemon --once`` for a 1 GiB and a 4 GiB payload; the RSS of the idle daemon on
   a private system bus; start-up time to ``READY=1`` on a notify socket.
3. ``GetStatus`` latency over D-Bus, 20 calls a second, while a full-speed install runs, over
   ``BENCH_LATENCY_ROUNDS`` installs (default 10) so the p99 rests on a few hundred calls; and the same calls
   to the idle daemon just before, the floor the machine sets at the time.
4. Capped downloads (``install.max_rate_interactive``, as ``daemon --once`` checks interactively): a
   ``BENCH_CAP_MIB`` payload (default 128) at 8 and 32 MiB/s and uncapped, alternating: the achieved rate as a
   ratio to the cap (the agent's own download time, from its log) and CPU seconds per GiB capped and uncapped.
5. A fleet: 100 000 devices over 7 days with ``agent.schedule``'s own functions, a 6-hour server outage in
   the middle.
5. Adaptive updates (``tests/bench_adaptive.py``): a real Debian pair (a monthly security update; not under
   ``BENCH_QUICK``) and a synthetic pair, cut into chunks: the bytes a device holding the old image fetches, then
   the device side itself against nginx (``tests/bench_adaptive_device.py``: wire, requests, time, peak RSS).

``BENCH_OUT=PATH`` writes the figures as one JSON object; ``BENCH_QUICK=1`` runs a reduced set.
Run: ``make bench`` or ``python -m tests.bench``.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = "{5b8f2c1e-7a3d-4e6b-9c0f-1d2e3f405162}"
MiB = 1 << 20
GiB = 1 << 30
PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
SIZE_MIB = int(os.environ.get("BENCH_MIB") or (256 if QUICK else 1024))
ROUNDS = int(os.environ.get("BENCH_ROUNDS") or (2 if QUICK else 5))
LATENCY_ROUNDS = int(os.environ.get("BENCH_LATENCY_ROUNDS") or (2 if QUICK else 10))
TIMEOUT = 900  # seconds for any one measured command


def env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, PATH=PATH)


# ---------------------------------------------------------------------------------------------- measuring
def reap_main(fd: int, argv: list[str]) -> int:
    """``python -m tests.bench --reap FD CMD...``: run CMD as a child subreaper, wait for every descendant (a
    process substitution outlives its pipeline stage), then write wall seconds, CPU seconds and the largest
    peak RSS among them as JSON to ``FD``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned descendants are re-parented to us
    signal.alarm(TIMEOUT)  # bounded: a stuck descendant ends the measurement
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    code = proc.wait()
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    wall = time.perf_counter() - start
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with os.fdopen(fd, "w") as out:
        json.dump({"code": code, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_kib": ru.ru_maxrss}, out)
    return 0


def measure(argv: list[str], **kw) -> dict:
    """Wall time, CPU time (all descendants) and peak RSS of one command run under the reaper."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench", "--reap", str(w), *argv], cwd=ROOT, env=env(),
                            pass_fds=(w,), stdout=kw.get("stdout", subprocess.DEVNULL),
                            stderr=kw.get("stderr", subprocess.DEVNULL))
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    proc.wait(TIMEOUT)
    if not text:
        raise RuntimeError(f"the measurement of {argv[:3]} produced nothing")
    result = json.loads(text)
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(argv)[:200]} exited {result['code']}")
    return result


def make_payload(path: str, size: int) -> None:
    block = os.urandom(MiB)  # incompressible: sniffed as raw, streamed as is
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])


def sha256_of(path: str) -> str:
    out = subprocess.run(["openssl", "dgst", "-sha256", "-r", path], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------- servers
class Nginx:
    """nginx on 127.0.0.1 serving ``root``, with its configuration, pid, logs and temp files under ``workdir``;
    ``http`` goes into its http block (the benchmark's: no access log, sendfile), ``directives`` into its server
    block (e.g. ``max_ranges 1;``)."""

    HTTP = "access_log off;\n  sendfile on;\n  tcp_nopush on;"

    def __init__(self, root: str, workdir: str, directives: str = "", http: str = HTTP, installer: str = "make bench"):
        self.binary = shutil.which("nginx", path=PATH)
        if self.binary is None:
            raise RuntimeError(f"nginx is not installed ({installer} installs Debian's package when run as root)")
        self.dir = os.path.join(workdir, "nginx")
        os.makedirs(self.dir)
        self.port = free_port()
        temps = "\n".join(f"  {name}_temp_path {self.dir}/{name};"
                          for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""{'user root;' if os.geteuid() == 0 else ''}
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
  {http}
  default_type application/octet-stream;
{temps}
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
    {directives}
    location / {{ }}
  }}
}}
""")
        # -e: the error log before the configuration is read (else nginx opens its global one)
        self.proc = subprocess.Popen([self.binary, "-p", self.dir, "-c", conf, "-e", f"{self.dir}/error.log"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port, self.proc, "nginx", 30)
        except RuntimeError:
            self.close()
            raise
        self.base = f"http://127.0.0.1:{self.port}/"

    @property
    def version(self) -> str:
        return subprocess.run([self.binary, "-v"], capture_output=True, text=True).stderr.strip()

    def close(self) -> None:
        stop(self.proc)


class DevServer:
    """The development server in its own process, answering the Omaha check with URLs on nginx."""

    def __init__(self, payload: str, payload_base: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "devserver", "--payload", payload, "--version", "2.0.0",
             "--appid", APP, "--port", str(self.port), "--payload-base", payload_base], cwd=ROOT, env=env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port, self.proc, "the development server", 300)  # it hashes the payload first
        except RuntimeError:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{self.port}/v1/update/"

    def close(self) -> None:
        stop(self.proc)


class ReleaseKey:
    """An Ed25519 release key in ``tmp``: the benchmark signs each payload with it, as a build host would, and the
    devices trust its public half (``trust.require_signature`` stays on, its default)."""

    def __init__(self, tmp: str):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.public = os.path.join(tmp, "release.pub.pem")
        with open(self.public, "wb") as f:
            f.write(self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))

    def sign(self, path: str, sha256_hex: str, size: int) -> None:
        """``<path>.sig``, the DSSE envelope the agent fetches from beside the payload's URL."""
        from agent.trust import sign_statement, statement
        body = statement(os.path.basename(path), sha256_hex, APP, "2.0.0", size)
        with open(path + ".sig", "wb") as f:
            f.write(sign_statement(body, self.key))


KEY: ReleaseKey | None = None  # set by main()


def device(workdir: str, url: str, slot_size: int, extra: str = "") -> str:
    """A file-slot device with the sim bootloader at 1.0.0 (like tests/simdevice.py) that trusts ``KEY``; returns
    its config path."""
    from agent.boot.sim import SimBoot
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
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
trust: {{keys: ["{KEY.public}"]}}
{extra}""")
    return config


class Payload:
    """A payload in nginx's root, and a development server offering it."""

    def __init__(self, tmp: str, www: str, nginx: Nginx, size: int):
        self.size = size
        self.name = f"payload-{size // MiB}.bin"
        self.path = os.path.join(www, self.name)
        make_payload(self.path, size)
        self.sha256 = sha256_of(self.path)
        KEY.sign(self.path, self.sha256, size)
        self.url = nginx.base + self.name
        self.server = DevServer(self.path, nginx.base)

    def close(self) -> None:
        self.server.close()
        os.unlink(self.path)
        os.unlink(self.path + ".sig")


def agent_update(workdir: str, payload: Payload) -> dict:
    config = device(workdir, payload.server.url, payload.size + MiB)
    out = os.path.join(workdir, "out.txt")
    with open(out, "w") as f:
        m = measure([sys.executable, "-m", "agent.cli", "daemon", "--once", "--config", config], stdout=f,
                    stderr=subprocess.STDOUT)
    text = open(out).read()
    if "installed" not in text:
        raise RuntimeError(f"the agent did not install the update: {text[-2000:]}")
    with open(os.path.join(workdir, "slot-b.img"), "rb") as f:  # spot check: the last MiB is the payload's
        f.seek(payload.size - MiB)
        tail = f.read(MiB)
    with open(payload.path, "rb") as f:
        f.seek(payload.size - MiB)
        if f.read(MiB) != tail:
            raise RuntimeError("the slot does not hold the payload")
    shutil.rmtree(workdir)
    return m


# ---------------------------------------------------------------------------------------------- 1. throughput
def throughput(tmp: str, www: str, nginx: Nginx, results: dict) -> None:
    size = SIZE_MIB * MiB
    payload = Payload(tmp, www, nginx, size)
    slot = os.path.join(tmp, "dd-slot.img")
    hash_out = os.path.join(tmp, "pipeline.sha256")
    runs: dict[str, list[dict]] = {k: [] for k in ("curl", "sha256", "dd", "pipeline", "agent")}
    pipeline = (f"curl -s {payload.url} | tee >(openssl dgst -sha256 -r >{hash_out}) | "
                f"dd of={slot} bs=4M iflag=fullblock oflag=direct conv=fsync status=none")
    try:
        for i in range(ROUNDS):  # alternating: a slow patch of the shared machine hits every kind alike
            runs["curl"].append(measure(["curl", "-s", "-o", "/dev/null", payload.url]))
            runs["sha256"].append(measure(["openssl", "dgst", "-sha256", payload.path]))
            runs["dd"].append(measure(["dd", "if=/dev/zero", f"of={slot}", "bs=4M", f"count={size // (4 * MiB)}",
                                       "oflag=direct", "conv=fsync", "status=none"]))
            os.unlink(slot)
            runs["pipeline"].append(measure(["bash", "-c", pipeline]))
            got = open(hash_out).read().split()[0]
            if got != payload.sha256 or os.path.getsize(slot) != size:
                raise RuntimeError(f"the pipeline's hash {got} or size is wrong")
            os.unlink(slot)
            runs["agent"].append(agent_update(os.path.join(tmp, "dev"), payload))
            line = "  ".join(f"{k} {SIZE_MIB / r[-1]['wall']:.0f}" for k, r in runs.items())
            print(f"  round {i + 1}/{ROUNDS} (MiB/s): {line}", flush=True)
    finally:
        payload.close()
    rate = {k: SIZE_MIB / median([r["wall"] for r in v]) for k, v in runs.items()}
    cpu = {k: median([r["cpu"] for r in v]) / (size / GiB) for k, v in runs.items()}
    limit = min(rate["curl"], rate["sha256"], rate["dd"])
    results.update({
        "size_mib": SIZE_MIB, "rounds": ROUNDS,
        "curl_mb_s": rate["curl"], "sha256_mb_s": rate["sha256"], "dd_mb_s": rate["dd"],
        "limit_mb_s": limit, "pipeline_mb_s": rate["pipeline"], "install_mb_s": rate["agent"],
        "install_ratio": rate["agent"] / rate["pipeline"], "limit_ratio": rate["agent"] / limit,
        "cpu_s_per_gib": cpu["agent"], "pipeline_cpu_s_per_gib": cpu["pipeline"],
        "install_wall_s": [round(r["wall"], 3) for r in runs["agent"]],
        "pipeline_wall_s": [round(r["wall"], 3) for r in runs["pipeline"]],
        "install_peak_rss_mib": max(r["rss_kib"] for r in runs["agent"]) / 1024,
    })
    print(f"throughput, {SIZE_MIB} MiB payload, median of {ROUNDS} rounds (MiB/s; CPU s per GiB):")
    print(f"  limit: curl {rate['curl']:.0f}, openssl sha256 {rate['sha256']:.0f}, dd O_DIRECT {rate['dd']:.0f}"
          f" -> {limit:.0f}")
    print(f"  pipeline curl|tee >(openssl)|dd: {rate['pipeline']:.0f} MiB/s, {cpu['pipeline']:.2f} CPU s/GiB")
    print(f"  agent daemon --once:             {rate['agent']:.0f} MiB/s, {cpu['agent']:.2f} CPU s/GiB; "
          f"ratio to pipeline {results['install_ratio']:.2f}, to limit {results['limit_ratio']:.2f}", flush=True)


CAP_MIB = int(os.environ.get("BENCH_CAP_MIB") or (64 if QUICK else 128))
CAPS = (8, 32)  # MiB/s


def capped(tmp: str, www: str, nginx: Nginx, results: dict) -> None:
    import re
    size = CAP_MIB * MiB
    payload = Payload(tmp, www, nginx, size)
    runs: dict[int, list[tuple[float, float, float]]] = {cap: [] for cap in (*CAPS, 0)}  # download s, CPU s: run, download
    curls: dict[int, list[float]] = {cap: [] for cap in runs}
    try:
        for _ in range(max(1, ROUNDS // 2)):
            for cap in runs:
                workdir = os.path.join(tmp, "capped")
                extra = f"install: {{max_rate_interactive: {cap}M}}\n" if cap else ""
                config = device(workdir, payload.server.url, size + MiB, extra)
                out = os.path.join(tmp, "capped.txt")
                with open(out, "w") as f:
                    m = measure([sys.executable, "-m", "agent.cli", "daemon", "--once", "--verbose", "--config",
                                 config], stdout=f, stderr=subprocess.STDOUT)
                found = re.search(r"verified 2\.0\.0: \d+ bytes in ([\d.]+) s \(([\d.]+) CPU s\)", open(out).read())
                if not found:
                    raise RuntimeError(f"the capped install did not finish: {open(out).read()[-2000:]}")
                runs[cap].append((float(found[1]), m["cpu"], float(found[2])))
                shutil.rmtree(workdir)
                # the machine's own price of a cap: curl, capped the same way, into /dev/null
                curl = measure(["curl", "-sS", "-o", "/dev/null", payload.url] +
                               (["--limit-rate", f"{cap}M"] if cap else []))
                curls[cap].append(curl["cpu"])
    finally:
        payload.close()

    def per_gib(cap: int, k: int) -> float:
        return median([r[k] for r in runs[cap]]) / (size / GiB)

    def curl_per_gib(cap: int) -> float:
        return median(curls[cap]) / (size / GiB)

    plain_cpu, plain_dl = per_gib(0, 1), per_gib(0, 2)
    print(f"capped downloads, {CAP_MIB} MiB payload (achieved/cap from the agent's download time; CPU s per GiB of "
          "the download itself, from the agent's log, and of the whole run, start-up and check included):")
    for cap in CAPS:
        ratio = (CAP_MIB / median([r[0] for r in runs[cap]])) / cap
        cpu, dl = per_gib(cap, 1), per_gib(cap, 2)
        results[f"cap_{cap}_ratio"], results[f"cap_{cap}_cpu_s_per_gib"] = ratio, cpu
        results[f"cap_{cap}_download_cpu_s_per_gib"] = dl
        curl = curl_per_gib(cap) / curl_per_gib(0)
        results[f"cap_{cap}_download_cpu_ratio"], results[f"cap_{cap}_curl_cpu_ratio"] = dl / plain_dl, curl
        print(f"  cap {cap} MiB/s: achieved/cap {ratio:.3f}; download {dl:.2f} CPU s/GiB, uncapped {plain_dl:.2f}: "
              f"x{dl / plain_dl:.2f} (curl --limit-rate against plain curl, the machine's own price of a cap: "
              f"x{curl:.2f}); whole run {cpu:.2f}, uncapped {plain_cpu:.2f}", flush=True)
    results["uncapped_download_cpu_s_per_gib"] = plain_dl
    results["uncapped_cpu_s_per_gib"] = plain_cpu


# ---------------------------------------------------------------------------------------------- 2. memory
def peak_rss(tmp: str, www: str, nginx: Nginx, size_mib: int) -> float:
    payload = Payload(tmp, www, nginx, size_mib * MiB)
    try:
        return agent_update(os.path.join(tmp, f"rss-{size_mib}"), payload)["rss_kib"] / 1024
    finally:
        payload.close()


class NotifiedDaemon:
    """``omaha-agent daemon`` with a notify socket, the way systemd starts it."""

    def __init__(self, tmp: str, config: str):
        self.dir = tempfile.mkdtemp(prefix="omaha-notify-", dir="/tmp")  # socket paths are short
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.path.join(self.dir, "notify"))
        self.log = open(os.path.join(tmp, f"daemon-{time.monotonic_ns()}.log"), "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "daemon", "--config", config], cwd=ROOT,
                                     env=dict(env(), NOTIFY_SOCKET=os.path.join(self.dir, "notify")),
                                     stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            if "READY=1" in msg:
                return time.perf_counter() - self.started
        raise RuntimeError("the daemon sent no READY=1 in 30 s")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def close(self) -> None:
        stop(self.proc)
        self.log.close()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def private_bus():
    if shutil.which("dbus-daemon", path=PATH) is None:
        return None
    sys.path.insert(0, ROOT)
    from tests.conftest import PrivateBus
    return PrivateBus()


def idle_and_startup(tmp: str, results: dict) -> None:
    bus = private_bus()
    if bus is None:
        print("idle daemon, start-up: dbus-daemon is not installed, skipped")
        return
    try:
        startups, rss = [], []
        for _ in range(3 if QUICK else 5):
            config = device(os.path.join(tmp, "idle"), "http://127.0.0.1:9/v1/update/", 4 * MiB,
                            "schedule: {initial_delay: 3600}\n")
            daemon = NotifiedDaemon(tmp, config)
            try:
                startups.append(daemon.wait_ready())
                time.sleep(3)
                rss.append(daemon.rss_mib())
            finally:
                daemon.close()
        results.update({"startup_s": median(startups), "idle_rss_mib": median(rss)})
        print(f"daemon on a private system bus: start-up to READY=1 {median(startups):.3f} s (median of "
              f"{len(startups)}), idle RSS {median(rss):.1f} MiB", flush=True)
    finally:
        bus.close()


# ---------------------------------------------------------------------------------------------- 3. latency
async def _poll_status(rate_hz: float, limit_s: float) -> tuple[list[float], list[float], str]:
    from agent.dbus.client import Client
    client = await Client.connect()
    try:
        await client.call("CheckForUpdate", "b", [True])
        during, all_calls, last = [], [], ""
        period, deadline = 1 / rate_hz, time.monotonic() + limit_s
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            start = time.perf_counter()
            status = await client.status()
            took = (time.perf_counter() - start) * 1000
            all_calls.append(took)
            last = status["operation"]
            if last in ("downloading", "verifying", "finalizing"):
                during.append(took)
            if last in ("updated-need-reboot", "reporting-error") or (last == "idle" and during):
                break
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        return during, all_calls, last
    finally:
        client.bus.disconnect()


async def _idle_status(rate_hz: float, count: int) -> list[float]:
    """``GetStatus`` of an idle daemon: what the machine (the bus, the scheduler) alone costs at the moment."""
    from agent.dbus.client import Client
    client = await Client.connect()
    try:
        calls = []
        for _ in range(count):
            start = time.perf_counter()
            await client.status()
            calls.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(1 / rate_hz)
        return calls
    finally:
        client.bus.disconnect()


def getstatus_latency(tmp: str, www: str, nginx: Nginx, results: dict) -> None:
    """``LATENCY_ROUNDS`` whole installs, each by a new daemon onto a new device, every call during them counted:
    one install of 1 GiB lasts a few seconds, too few calls for a p99 of their own."""
    bus = private_bus()
    if bus is None:
        print("GetStatus latency: dbus-daemon is not installed, skipped")
        return
    payload = Payload(tmp, www, nginx, SIZE_MIB * MiB)
    during: list[float] = []
    idle: list[float] = []
    try:
        for i in range(LATENCY_ROUNDS):
            config = device(os.path.join(tmp, "latency"), payload.server.url, payload.size + MiB,
                            "schedule: {initial_delay: 3600}\n")
            daemon = NotifiedDaemon(tmp, config)
            try:
                daemon.wait_ready()
                if i == 0:
                    idle = sorted(asyncio.run(_idle_status(20, 200)))
                calls, _, last = asyncio.run(_poll_status(20, TIMEOUT))
            finally:
                daemon.close()
            if last != "updated-need-reboot" or not calls:
                raise RuntimeError(f"the install under GetStatus calls ended in {last!r}")
            during += calls
    finally:
        payload.close()
        bus.close()
    during.sort()
    p = lambda q: during[min(len(during) - 1, int(q * len(during)))]
    q = lambda values, at: values[min(len(values) - 1, int(at * len(values)))]
    results.update({"getstatus_p50_ms": p(0.5), "getstatus_p99_ms": p(0.99), "getstatus_max_ms": during[-1],
                    "getstatus_calls": len(during), "getstatus_rounds": LATENCY_ROUNDS,
                    "getstatus_idle_p50_ms": q(idle, 0.5), "getstatus_idle_p99_ms": q(idle, 0.99)})
    print(f"GetStatus during the install, {len(during)} calls at 20/s over {LATENCY_ROUNDS} installs: p50 "
          f"{p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {during[-1]:.1f} ms (the idle daemon, {len(idle)} calls "
          f"just before: p50 {q(idle, 0.5):.1f} ms, p99 {q(idle, 0.99):.1f} ms)", flush=True)


# ---------------------------------------------------------------------------------------------- 4. fleet
def fleet(results: dict, devices: int = 100_000, days: int = 7, seed: int = 17) -> None:
    """Every device runs ``agent.schedule`` as the daemon does: ``first_check`` at start, ``next_check`` after
    each check (with its count of failures). The server is down for 6 hours from day 3: checks in that time
    fail. Normal is the time before the outage; "after" is every minute from the end of the outage on."""
    from agent import schedule
    policy = schedule.Policy()
    rng = random.Random(seed)
    end = days * 86400
    down_from, down_to = 3 * 86400, 3 * 86400 + 6 * 3600
    minutes = [0] * (end // 60)
    first_second = total = 0
    for _ in range(devices):
        # daemons started at random times before the window: the fleet is in its steady state at 0
        t = schedule.first_check(-rng.uniform(0, 2 * policy.interval), rng, policy).at
        failures = 0
        while t < end:
            if t >= 0:
                minutes[int(t // 60)] += 1
                if t < down_from:
                    total += 1
                    first_second += (t % 60) < 1
            failures = failures + 1 if down_from <= t < down_to else 0
            t = schedule.next_check(t, rng, policy, failures).at
    normal = minutes[: down_from // 60]
    mean = sum(normal) / len(normal)
    outage, after = minutes[down_from // 60: down_to // 60], minutes[down_to // 60:]
    results.update({"fleet_devices": devices, "fleet_mean_per_min": mean,
                    "fleet_peak_over_mean": max(normal) / mean, "fleet_first_second_share": first_second / total,
                    "fleet_recovery_peak_over_mean": max(after) / mean,
                    "fleet_outage_retry_peak_over_mean": max(outage) / mean})
    print(f"fleet of {devices} devices over {days} days: {mean:.0f} checks a minute on average, peak minute "
          f"{max(normal) / mean:.2f} x the mean, {first_second / total:.4f} of checks in a minute's first second; "
          f"a 6-hour outage: retries peak at {max(outage) / mean:.2f} x the mean, after it the peak minute is "
          f"{max(after) / mean:.2f} x the mean", flush=True)


# ---------------------------------------------------------------------------------------------- main
def machine() -> dict:
    info = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/etc/os-release") as f:
            info["os"] = next(l.split("=", 1)[1].strip().strip('"') for l in f if l.startswith("PRETTY_NAME="))
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main() -> int:
    if sys.argv[1:2] == ["--reap"]:
        return reap_main(int(sys.argv[2]), sys.argv[3:])
    results: dict = {"machine": machine(), "quick": QUICK}
    started = time.monotonic()
    global KEY
    with tempfile.TemporaryDirectory(prefix="omaha-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        KEY = ReleaseKey(tmp)
        www = os.path.join(tmp, "www")
        os.makedirs(www)
        nginx = Nginx(www, tmp)
        results["machine"]["nginx"] = nginx.version
        print(f"nginx on {nginx.base}; {os.cpu_count()} CPUs shared by the servers, the agent and the tools",
              flush=True)
        try:
            throughput(tmp, www, nginx, results)
            results["peak_rss_mib_1g"] = (results["install_peak_rss_mib"] if SIZE_MIB == 1024
                                          else peak_rss(tmp, www, nginx, 1024))
            results["peak_rss_mib_4g"] = peak_rss(tmp, www, nginx, 4096)
            print(f"peak RSS of daemon --once: {results['peak_rss_mib_1g']:.1f} MiB (1 GiB payload), "
                  f"{results['peak_rss_mib_4g']:.1f} MiB (4 GiB payload)", flush=True)
            getstatus_latency(tmp, www, nginx, results)
            capped(tmp, www, nginx, results)
        finally:
            nginx.close()
        idle_and_startup(tmp, results)
    fleet(results, devices=20_000 if QUICK else 100_000)
    if os.environ.get("BENCH_ADAPTIVE", "1") != "0":
        from . import bench_adaptive
        with tempfile.TemporaryDirectory(prefix="omaha-bench-adaptive-", dir=os.environ.get("BENCH_DIR")) as tmp:
            bench_adaptive.run(QUICK, tmp, results)
    results["bench_s"] = round(time.monotonic() - started, 1)
    out = os.environ.get("BENCH_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
            f.write("\n")
        print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
