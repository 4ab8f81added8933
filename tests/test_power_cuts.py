"""Power cuts in the sim: the daemon SIGKILLed at randomized points of its whole flow, then restarted.

One simulated device goes through update after update against the development server on 127.0.0.1 (some
versions good, some that never boot, some whose health step fails). Each run of ``daemon --once`` is
killed (``os._exit``, as SIGKILL: nothing flushed, no handler) at a random delay after a randomly chosen
operation (check, download, verify, arming the slot, the health step, the reports) or after start; at
random the "power cut" also reboots the simulated device. After every run:

* the sim bootloader, asked to boot (on a copy of its env), comes up in a good slot or in a trial whose
  bytes are the version it was armed with;
* no slot is ever trial with bytes other than its version's.

At the end every armed trial has exactly one final report at the server (3/2, or 3/0 with code 44/45);
a resend after a kill keeps its requestid, so reports are counted by requestid.
"""
import asyncio
import os
import random
import shutil
import sys
import time

from agent.boot import BootError
from agent.boot.sim import PANIC_MAGIC, SimBoot

from .conftest import record_count
from .simdevice import ROOT, Device, image

KILL_POINTS = 50  # the floor asserted per run
DEADLINE = 200.0  # seconds: the loop stops adding versions after this (it stops at 60 kills first: ~80 s)
MAX_STEPS = 14  # agent runs per version before it counts as stuck

RUNNER = r"""
import asyncio, os, sys, threading, time
from agent.config import load
from agent.daemon import Agent, AgentError
config, op, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
def cut():
    os._exit(137)
if op == "start":
    threading.Timer(delay, cut).start()
agent = Agent(load(config))
armed = []
def listener(snap):
    if snap["operation"] == op and not armed:
        armed.append(threading.Timer(delay, cut))
        armed[0].start()
agent.listeners.append(listener)
try:
    print(asyncio.run(agent.run_once()))
except AgentError as exc:
    print("error", exc)
sys.stdout.flush()
os._exit(0)
"""

# (operation, longest delay after it): the download is dripped, so it gets the widest window
# (each listed as often as it should be drawn: the download and the health step happen in fewer runs)
POINTS = [("start", 0.6), ("checking", 0.05), ("update-available", 0.05), ("downloading", 0.5),
          ("downloading", 0.5), ("downloading", 0.5), ("verifying", 0.05), ("finalizing", 0.03),
          ("finalizing", 0.03), ("updated-need-reboot", 0.05), ("health-check", 0.25), ("health-check", 0.25),
          ("health-check", 0.25), ("idle", 0.1)]


class Campaign:
    def __init__(self, tmp_path, server, rng):
        self.tmp, self.server, self.rng = tmp_path, server, rng
        self.unhealthy = tmp_path / "unhealthy"
        self.dev = Device(tmp_path, server.url, health=f"sleep 0.15; test ! -e {self.unhealthy}")
        self.images: dict[str, bytes] = {}
        self.armed: set[str] = set()
        self.kills = 0
        self.where: dict[str, int] = {}  # kills per operation they followed
        self.runs = 0
        self.broken: list[str] = []

    async def run(self):
        op, longest = self.rng.choice(POINTS)
        delay = self.rng.uniform(0, longest)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RUNNER, self.dev.config, op, f"{delay:.4f}", env=dict(os.environ, PYTHONPATH=ROOT),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        self.runs += 1
        if proc.returncode == 137:
            self.kills += 1
            self.where[op] = self.where.get(op, 0) + 1
        elif proc.returncode != 0 or b"Traceback" in err:
            self.broken.append(f"run after {op}+{delay:.3f}s exited {proc.returncode}: {err.decode()[-300:]}")
        return op, delay, proc.returncode

    def slot_bytes_match(self, slot: str, version: str | None) -> bool:
        want = self.images.get(version or "")
        if want is None:
            return False
        with open(self.dev.slots[slot], "rb") as f:
            return f.read(len(want)) == want

    def check(self, where: str) -> None:
        """The invariants, after every run."""
        status = self.dev.boot.status()
        for slot, s in status.items():
            if s.state.value == "trial":
                self.armed.add(s.version)
                if not self.slot_bytes_match(slot, s.version):
                    self.broken.append(f"{where}: slot {slot} is trial for {s.version} with other bytes")
        copy = self.tmp / "bootenv-probe.json"
        shutil.copyfile(self.tmp / "bootenv.json", copy)
        probe = SimBoot(str(copy), self.dev.slots)
        before = probe.status()  # what the slot was when the firmware chose it (a last try reads bad after)
        try:
            came_up = probe.reboot()
        except BootError as exc:
            self.broken.append(f"{where}: a reboot now would not come up: {exc}")
            return
        s = before[came_up]
        good = s.state.value == "good" or (s.state.value == "trial" and self.slot_bytes_match(came_up, s.version))
        if not good:
            self.broken.append(f"{where}: a reboot now boots slot {came_up} ({s.state.value}, {s.version})")

    def final_reports(self, version: str) -> set[str]:
        return {e["requestid"] for e in self.server.events
                if (e["eventtype"], e["eventresult"]) == (3, 2) and e["version"] == version
                or (e["eventtype"], e["eventresult"]) == (3, 0) and e["nextversion"] == version
                and e["errorcode"] in (44, 45)}

    async def version(self, n: int, kind: str) -> None:
        version = f"{n}.0.0"
        img = image(self.tmp, version, head=PANIC_MAGIC if kind == "panic" else b"IMAGE", size=1 << 20)
        self.images[version] = open(img.path, "rb").read()
        self.server.images = [img]
        if kind == "unhealthy":
            self.unhealthy.touch()
        elif self.unhealthy.exists():
            self.unhealthy.unlink()
        for step in range(MAX_STEPS):
            op, delay, rc = await self.run()
            where = f"{version} ({kind}) step {step}, cut after {op}+{delay:.3f}s (exit {rc})"
            self.check(where)
            status, booted = self.dev.boot.status(), self.dev.boot.booted_slot()
            waiting = any(s.state.value == "trial" for slot, s in status.items() if slot != booted)
            if waiting or status[booted].state.value == "bad" or (rc == 137 and self.rng.random() < 0.3):
                self.dev.boot.reboot()  # the operator's reboot, or the power cut took the device down
                self.check(where + ", after the reboot")
            state = self.dev.state() if (self.tmp / "state" / "state.json").exists() else {}
            if self.final_reports(version) and not state.get("events") and not state.get("trial") \
                    and not any(s.state.value == "trial" for s in self.dev.boot.status().values()):
                return
        self.broken.append(f"{version} ({kind}) did not finish in {MAX_STEPS} runs")


async def test_power_cuts_at_randomized_points_of_the_whole_flow_keep_the_device_bootable(tmp_path, server):
    seed = int(os.environ.get("POWER_CUT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    server.faults.drip_delay = 0.03  # 16 pieces of 64 KiB: about half a second of download to cut into
    campaign = Campaign(tmp_path, server, rng)
    start, n = time.monotonic(), 2
    while campaign.kills < KILL_POINTS * 1.2 and time.monotonic() - start < DEADLINE and n < 60:
        kind = rng.choices(["good", "panic", "unhealthy"], [6, 1, 1])[0]
        await campaign.version(n, kind)
        n += 1
    for version in sorted(campaign.armed):
        reports = campaign.final_reports(version)
        if len(reports) != 1:
            campaign.broken.append(f"armed {version} has {len(reports)} final reports")
    summary = (f"{campaign.kills} kill points in {campaign.runs} runs over {n - 2} versions "
               f"({len(campaign.armed)} armed), {len(campaign.broken)} broke an invariant (seed {seed}); after "
               + ", ".join(f"{op} {k}" for op, k in sorted(campaign.where.items())))
    print(f"power cuts: {summary}")
    record_count("power cuts", summary)
    assert not campaign.broken, "\n".join(campaign.broken[:10])
    assert campaign.kills >= KILL_POINTS, summary
