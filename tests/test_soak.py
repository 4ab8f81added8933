"""A soak through the time seam: one simulated device lives a month on a virtual clock against a development server
that randomly fails, stalls, resets and lies, rebooting into each update it installs. Run in a child process so its
memory and open files are its own: at the end RSS and the open file descriptors are where they were after the
first day, the event queue is empty, and every update that was armed got exactly one final report."""
import asyncio
import json
import os
import sys

from .simdevice import ROOT

CHILD = r"""
import asyncio, gc, json, os, random, sys, time
from agent.config import load
from agent.daemon import Agent
from agent.machine import Operation
from agent.tools.devserver import DevServer, Faults
from tests.seams import FakeClock
from tests.simdevice import Device, image
import pathlib

DAY = 86400


def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def fds():
    return len(os.listdir("/proc/self/fd"))


async def main(work, seed, days, budget):
    rng = random.Random(seed)
    clock = FakeClock()
    start = clock.now()
    work = pathlib.Path(work)
    server = DevServer([image(work, "2.0.0", size=256 << 10)], clock=clock.now)
    await server.start()
    dev = Device(work, server.url, slot_size=1 << 20, extra=(
        "schedule: {initial_delay: 0, interval: 18000, backoff_base: 60, backoff_cap: 18000}\n"
        "dbus: {enabled: false}\ninstall: {read_timeout: 1}\n"))
    with open(dev.config) as f:
        text = f.read().replace("timeout: 5", "timeout: 2")
    with open(dev.config, "w") as f:
        f.write(text)
    version, next_release = 2, start + 4 * DAY
    lives, faults_seen, warm, real0 = 0, 0, None, time.monotonic()
    last = [None]

    def misbehave(snapshot):  # a new misbehaviour (or none) for each check, as it starts
        nonlocal faults_seen
        op, before = snapshot["operation"], last[0]
        last[0] = op
        if op != "checking" or before == "checking":
            return
        f = Faults()
        pick = rng.random()
        if pick < 0.15:
            f.check_status, f.check_failures = 503, 1
        elif pick < 0.25:
            f.reset_after, f.resets = 64 << 10, 1
        elif pick < 0.30:
            f.wrong_hash = True
        elif pick < 0.40:
            f.event_status, f.event_failures = 503, 1
        elif pick < 0.45:
            f.short_body = True
        elif pick < 0.50:
            f.malformed = b"<response><app"
        faults_seen += pick < 0.5
        server.faults = f

    while clock.now() - start < days * DAY and time.monotonic() - real0 < budget:
        agent = Agent(load(dev.config), clock=clock, rng=random.Random(rng.random()))
        last[0] = None
        agent.listeners.append(misbehave)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run_forever(stop))
        lives += 1
        while clock.now() - start < days * DAY and time.monotonic() - real0 < budget and not task.done():
            if clock.now() >= next_release:
                version += 1
                server.images = [image(work, f"{version}.0.0", size=256 << 10)]
                next_release += 4 * DAY
            if agent.status.operation is Operation.NEED_REBOOT and agent.owner.job is None:
                break
            if warm is None and clock.now() - start > DAY:
                gc.collect()
                warm = (rss_kib(), fds())
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(task, 60)
        if dev.boot.status()["b" if dev.boot.booted_slot() == "a" else "a"].state.value == "trial":
            dev.boot.reboot()
    # the last life's queue, once the server behaves: nothing may be left undelivered
    server.faults = Faults()
    agent = Agent(load(dev.config), clock=clock, rng=random.Random(1))
    print(await agent.run_once(), file=sys.stderr)
    gc.collect()
    end = (rss_kib(), fds())
    armed = sorted({e["nextversion"] for e in server.events if (e["eventtype"], e["eventresult"]) == (3, 1)})
    finals = {}
    for e in server.events:
        final = (e["eventtype"], e["eventresult"]) == (3, 2) or ((e["eventtype"], e["eventresult"]) == (3, 0)
                                                                and e["errorcode"] in (44, 45))
        if final:
            finals.setdefault(e["nextversion"], set()).add(e["requestid"])
    await server.stop()
    print(json.dumps({"days": round((clock.now() - start) / DAY, 1), "lives": lives, "checks": len(server.requests),
                      "faults": faults_seen, "warm": warm, "end": end, "armed": armed,
                      "finals": {v: len(ids) for v, ids in finals.items()},
                      "queue": len(agent.ctx.state.events), "versions_offered": version - 1}))


asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
"""


async def test_a_month_against_a_misbehaving_server_leaks_nothing_and_reports_every_update_once(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path), "11", "30", "150", cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 280)
    assert proc.returncode == 0, err.decode()[-3000:]
    r = json.loads(out.decode().strip().splitlines()[-1])
    print(f"\nsoak: {r['days']} virtual days, {r['checks']} checks, {r['faults']} misbehaving answers, "
          f"{r['lives']} daemon lives, {len(r['armed'])} updates armed; RSS {r['warm'][0]} -> {r['end'][0]} KiB, "
          f"open fds {r['warm'][1]} -> {r['end'][1]}")
    assert r["days"] >= 30 and r["faults"] >= 20 and len(r["armed"]) >= 3, r
    assert r["queue"] == 0  # every event delivered
    for version in r["armed"]:
        assert r["finals"].get(version) == 1 or version == r["armed"][-1] and version not in r["finals"], r
    assert r["end"][1] <= r["warm"][1]  # no file descriptor leaked
    assert r["end"][0] <= r["warm"][0] + 4096, r  # no growth beyond 4 MiB over the month
