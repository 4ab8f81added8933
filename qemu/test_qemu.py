"""The real A/B cycle: OVMF, GRUB with the project's grub.cfg, a GPT disk, systemd, the agent as a service,
and the development server on the host's loopback (the guest reaches it at 10.0.2.2).

Run through ``make qemu-test``: it builds the image and runs this inside a new network namespace that has
only ``lo``, so no traffic can leave the machine."""
import asyncio
import hashlib
import json
import os
import random
import socket
import subprocess
import time

import pytest

from agent.boot import BootError
from agent.boot.grubenv import GrubEnvBoot
from agent.tools.devserver import DevServer, Faults, Image

from . import adaptive
from .vm import BUILD, LOGS, Machine, accel, assert_agent_from_the_deb, esp, esp_clear

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(3600)]
BOOT_TIMEOUT = 600  # seconds from QEMU start to the guest's first report (TCG on a busy 2-core host)
INSTALL_TIMEOUT = 1800


def _read(name: str) -> str:
    with open(os.path.join(BUILD, name)) as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def image():
    return built_image("disk.img", "qemu-image")


def built_image(name: str, target: str) -> dict:
    """A twin's disk image in build/qemu (``make TARGET`` builds it), its app id and dev-server port; skipped
    outside make qemu-test's network namespace."""
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        pytest.skip("run through make qemu-test: it runs in a network namespace that has only lo")
    disk = os.path.join(BUILD, name)
    if not os.path.exists(disk):
        pytest.fail(f"build/qemu/{name} is missing: make {target} builds it (make qemu-test does too)")
    print(f"\naccelerator: {accel()}")
    return {"disk": disk, "appid": _read("appid"), "port": int(_read("port"))}


async def start_server(image, scenario: str, version: str, payload: str | Image, faults: Faults | None = None):
    """The dev server offering ``payload`` (a file in build/qemu, or an ``Image``: e.g. an adaptive release)."""
    os.makedirs(LOGS, exist_ok=True)
    log = os.path.join(LOGS, f"{scenario}-server.jsonl")
    if os.path.exists(log):
        os.unlink(log)
    offered = payload if isinstance(payload, Image) else Image(os.path.join(BUILD, payload), version, image["appid"])
    srv = DevServer([offered], host="127.0.0.1",
                    port=image["port"], log_path=log, faults=faults or Faults(),
                    sign_key=os.path.join(BUILD, "release-key.pem"))  # the image trusts only this key
    await srv.start()
    return srv


def downloads(srv) -> list[dict]:
    with open(srv.log_path) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "download"]


async def boot_and_report(machine: Machine, expect_version: str, expect_slot: str):
    boot = await machine.boot()
    await boot.wait_for(boot.booted_version, BOOT_TIMEOUT, f"the guest to boot {expect_version}")
    up = time.monotonic() - boot.started
    print(f"{machine.name} boot {machine.boots}: {boot.booted_version()} on slot {expect_slot} reported after "
          f"{up:.0f} s ({accel()})")
    line = next(line for line in boot.lines() if line.startswith("BOOTED "))
    assert boot.booted_version() == expect_version and f"omaha_agent.slot={expect_slot}" in line.split(), line
    return boot


async def assert_slot_read_from_the_cmdline(boot, slot: str) -> None:
    """The agent, under its unit's sandbox, read the booted slot from /proc/cmdline's omaha_agent.slot= (not
    from root=, nor the root device)."""
    line = await boot.wait_for(boot.slot_source, BOOT_TIMEOUT, "the agent's booted-slot log line")
    print(f"agent: {line}")
    assert line == f"booted slot {slot}, read from the kernel command line (omaha_agent.slot={slot.upper()})", line


def check_grubenv(machine: Machine, tmp_path, expect: dict[str, str]) -> None:
    """After the last plug pull: the ESP's FAT is clean, and our reader and grub-editenv see ``expect``."""
    print("fsck.vfat -n on the ESP:", machine.fsck_esp(str(tmp_path / "esp.img")).splitlines()[-1])
    path = machine.read_grubenv(str(tmp_path / "grubenv"))
    states = {slot: st.state.value for slot, st in GrubEnvBoot(path).status().items()}
    assert states == expect, states
    listed = subprocess.run(["grub-editenv", path, "list"], capture_output=True, text=True, check=True).stdout
    for slot, state in expect.items():
        assert f"{slot.upper()}_OK={'1' if state == 'good' else '0'}" in listed, listed


def explain(srv, boot) -> str:
    """For a failed event assertion: each event with its errorcode, and the agent's install log lines."""
    events = " ".join(f"{e['eventtype']}/{e['eventresult']}" + (f"(errorcode {e['errorcode']})" if e.get("errorcode")
                                                                else "") for e in srv.events)
    words = ("adaptive", "install", "error", "failed", "chunk", "timed out", "cut")
    lines = [line for line in boot.lines() if line.startswith("AGENTLOG ") and any(w in line for w in words)]
    return f"events: {events}\nthe agent's install lines:\n" + "\n".join(lines[-40:])


async def test_success_update_reboot_confirm_and_report(image, tmp_path):
    """1.0.0 → 2.0.0 (an adaptive release, installed in full: no index is known for the factory slot; its index is
    saved) → 2.1.0 installed adaptively from the chunks 2.0.0's slot holds. (The adaptive version is 2.1.0, not
    3.0.0: this image's 3.0.0 is the release with a broken init, the rollback scenario's.) The bytes the server
    sends for 2.1.0 stay under a bound derived from the two releases' indexes (qemu/adaptive.py)."""
    srv = await start_server(image, "success", "2.0.0", adaptive.release(image["appid"], "2.0.0"))
    machine = Machine("success", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await assert_agent_from_the_deb(first)
        await assert_slot_read_from_the_cmdline(first, "a")
        took = await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 2.0.0 and reboot")
        print(f"boot 1: checked, streamed {srv.images[0].size >> 20} MiB onto ROOT-B and rebooted after {took:.0f} s")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        assert [d["name"] for d in downloads(srv)] == ["payload-2.0.0.ext4.czst"]  # the full path
        assert {f["name"] for f in srv.fetches} == {"payload-2.0.0.ext4.cidx"}, srv.fetches  # its index, to save

        esp(machine, {"setup.sh": adaptive.CHECK_UNTIL_FOUND}, tmp_path)  # for the boot on 2.0.0 only
        second = await boot_and_report(machine, "2.0.0", "B")
        await assert_slot_read_from_the_cmdline(second, "b")
        await second.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        status = await second.wait_for(
            lambda: (s := second.status()) and s["slots"]["b"]["state"]["data"] == "good" and s, 120,
            "busctl to show slot b good")
        print("busctl GetStatus inside the guest:", json.dumps({k: status[k] for k in (
            "operation", "current_version", "booted_slot", "last_error", "pending_events")}))
        assert status["current_version"] == "2.0.0" and status["booted_slot"] == "b"

        marks = len(srv.fetches), len(srv.streams)
        srv.images = [adaptive.release(image["appid"], "2.1.0")]
        took = await second.wait_exit(INSTALL_TIMEOUT, "the agent to install 2.1.0 adaptively and reboot")
        assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2", "13/1", "14/1", "3/1"], explain(srv, second)
        sent = adaptive.sent_for(srv, "2.1.0", *marks)
        start_b, _ = machine.partition("ROOT-B")
        limit = adaptive.bound("2.0.0", "2.1.0", machine.disk, start_b)
        print(f"boot 2: confirmed 2.0.0, then installed 2.1.0 adaptively and rebooted after {took:.0f} s: the server "
              f"sent {sent['bytes']} bytes in {sent['answers']} answers (index included); bound {limit['bound']} = "
              f"index {limit['index']} + {limit['new_chunks']} chunks 2.0.0 lacks ({limit['new_stored']} stored) "
              f"+ {limit['drift_chunks']} chunks the running 2.0.0 changed ({limit['drift_stored']} stored) + "
              f"gaps and part headers; the full payload is {limit['full']} bytes")
        # an answer may be cut and gone on from (a loaded host under TCG: the agent's writer, copying local chunks,
        # left it unread past read_timeout); what was in flight is then sent again, and only that is forgiven
        cuts = [line for line in second.lines() if "going on from chunk" in line]
        print(f"answers cut and gone on from: {len(cuts)}; bytes of the files sent more than once: {sent['resent']}")
        assert len(cuts) <= 2, cuts
        assert sent["full_path_bytes"] == 0 and sent["index_answers"] == 1, sent
        assert 0 < sent["bytes"] - sent["resent"] <= limit["bound"], (sent, limit)
        assert sent["bytes"] * 20 < limit["full"], (sent, limit)
        # what the agent wrote, read straight from the disk image before the slot first mounts: 2.1.0's image
        assert machine.partition_sha256("ROOT-A", limit["image_size"]) == limit["image_sha256"]

        esp_clear(machine)
        third = await boot_and_report(machine, "2.1.0", "A")
        await third.wait_for(lambda: srv.event_codes().count("3/2") == 2, BOOT_TIMEOUT, "the 3/2 report of 2.1.0")
        status = await third.wait_for(
            lambda: (s := third.status()) and s["slots"]["a"]["state"]["data"] == "good" and s, 120,
            "busctl to show slot a good")
        assert status["current_version"] == "2.1.0" and status["booted_slot"] == "a", status
        await third.power_off()
    finally:
        await machine.close()
        await srv.stop()
    assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2", "13/1", "14/1", "3/1", "3/2"]
    done = srv.events[-1]
    assert done["version"] == "2.1.0" and done["previousversion"] == "2.0.0"
    # the plug was pulled within seconds of the agent marking A good in the grubenv on the FAT ESP
    check_grubenv(machine, tmp_path, {"a": "good", "b": "good"})


async def test_rollback_when_the_new_version_never_boots(image, tmp_path):
    srv = await start_server(image, "rollback", "3.0.0", "payload-3.0.0.ext4.zst")
    machine = Machine("rollback", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_exit(INSTALL_TIMEOUT, "the agent to install 3.0.0 and reboot")
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        failed = 0
        while True:  # GRUB tries B (tries: 2) until its tries run out; each try panics (panic=5) and reboots
            boot = await machine.boot()
            try:
                await boot.wait_for(boot.booted_version, BOOT_TIMEOUT, "a boot to report")
                break
            except AssertionError:
                if boot.proc.returncode is None:
                    raise
                failed += 1
                assert failed <= 3, "GRUB kept trying the broken slot"
        print(f"rollback: {failed} failed boot(s) of 3.0.0, then slot A again")
        assert failed == 2 and boot.booted_version() == "1.0.0"
        await boot.wait_for(lambda: "3/0" in srv.event_codes(), BOOT_TIMEOUT, "the 3/0 report")
        report = srv.events[-1]
        assert report["errorcode"] == 44 and report["nextversion"] in ("3.0.0", None, "")
        checks = len(srv.requests)
        await boot.wait_for(lambda: len(srv.requests) > checks or boot.status() and boot.status()["last_error"], 300,
                            "the agent to settle")
        await asyncio.sleep(10)
        status = boot.status()
        assert status and "3.0.0" in status["last_error"] and status["operation"] == "idle", status
        assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/0"]  # 3.0.0 is not installed again
        await boot.power_off()
    finally:
        await srv.stop()
    check_grubenv(machine, tmp_path, {"a": "good", "b": "bad"})


async def test_power_cut_during_download_then_resume_and_finish(image, tmp_path):
    # a slow link, so the plug can be pulled in the middle of the download
    srv = await start_server(image, "powercut", "2.0.0", "payload-2.0.0.ext4.zst", Faults(drip_delay=0.05))
    machine = Machine("powercut", image["disk"])
    try:
        first = await boot_and_report(machine, "1.0.0", "A")
        await first.wait_for(lambda: (s := first.status()) and s["bytes_downloaded"] > 4 << 20, INSTALL_TIMEOUT,
                             "4 MiB of the download")
        await first.power_off()
        print(f"power cut at {first.status()['bytes_downloaded'] >> 20} MiB")
        assert srv.event_codes() == ["13/1"]
        srv.faults.drip_delay = 0.0
        second = await boot_and_report(machine, "1.0.0", "A")  # slot B is bad: A still boots
        took = await second.wait_exit(INSTALL_TIMEOUT, "the agent to finish the download and reboot")
        print(f"after the power cut: downloaded and rebooted after {took:.0f} s; GETs: "
              f"{[d['start'] for d in downloads(srv)]}")
        third = await boot_and_report(machine, "2.0.0", "B")
        await third.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
        await third.power_off()
    finally:
        await srv.stop()
    assert srv.event_codes()[-3:] == ["14/1", "3/1", "3/2"] and srv.event_codes().count("3/2") == 1
    check_grubenv(machine, tmp_path, {"a": "good", "b": "good"})


# ---------------------------------------------------------------- the plug-pull campaign
PULLS = int(os.environ.get("QEMU_PULLS") or 5)
PHASES = ("download", "finalisation", "reboot", "finalisation")  # in turn: 5 pulls are 2, 2 and 1
# The finalisation pulls are aimed at what a watcher in the image (qemu/guest/omaha-test-watch) reports on the
# marker port the moment it happens: the agent's operation changes (OPERATION, from its StatusChanged signal),
# its state file saves and the grubenv's writes (STATE and GRUBENV, inotify). The agent's journal lines come too
# (AGENTLOG), a few hundred milliseconds late. Each line carries the guest's monotonic time, so the stages are
# measured by the guest's clock.
MARKS = {"verifying": ("OPERATION", "verifying"),  # the slot's fsync, the digests compared
         "recorded": ("STATE", ":recorded"),  # the trial recorded: the grubenv is written next, then the arm saved
         "grubenv": ("GRUBENV", "written"),  # (only after "recorded": the mark-bad before the download writes it too)
         "armed": ("STATE", ":armed"),  # then the 3/1 report
         "saved": ("AGENTLOG", "verified 2.0.0")}
STAGES = {"verifying": ("verifying", "recorded"), "bootloader": ("recorded", "armed")}
GUESSES = {"verifying": 0.9, "bootloader": 0.06}  # seconds by the guest's clock, until a device measures them


def plan_pulls(n: int, rng: random.Random) -> list[dict]:
    """``n`` moments, the phases in turn: a byte of the download (a fraction of the payload); a delay into a
    stage of finalisation (alternately the bootloader's stage, from the state file's save that records the
    trial to the one that says it is armed, with the grubenv's write between them, and the verifying stage
    before it), a fraction of that stage's length by the guest's clock as measured so far in the run, up to
    a quarter past its end; a delay after the 3/1 report (the reboot request, the shutdown). Ordered as devices meet
    them: the downloads, then a reboot pull (its device measures the stages on the way), then finalisation."""
    moments = [{"phase": PHASES[i % len(PHASES)], "u": rng.random()} for i in range(n)]
    finals = 0
    for m in moments:
        if m["phase"] == "download":
            m["at"] = 0.03 + 0.92 * m["u"]
        elif m["phase"] == "finalisation":
            m["stage"], finals = ("bootloader", "verifying")[finals % 2], finals + 1
    order = ("download", "reboot", "finalisation")
    return sorted(moments, key=lambda m: (order.index(m["phase"]), m["u"]))


def payload_digest(name: str) -> tuple[str, int]:
    """SHA-256 and length of the decompressed payload: the bytes a verified slot holds."""
    proc = subprocess.Popen(["zstd", "-dcq", os.path.join(BUILD, name)], stdout=subprocess.PIPE)
    digest, length = hashlib.sha256(), 0
    while piece := proc.stdout.read(8 << 20):
        digest.update(piece)
        length += len(piece)
    assert proc.wait() == 0
    return digest.hexdigest(), length


def inspect_after_pull(machine: Machine, tmp_path, digest: tuple[str, int]) -> tuple[dict, dict, list[str]]:
    """The disk after the plug was pulled: the ESP's FAT, the grubenv by our reader and grub-editenv, the bytes
    of any trial slot, and the agent's state file (its journal replayed on a copy). Returns the slot states, the
    state file and what misbehaved."""
    problems = []
    try:
        machine.fsck_esp(str(tmp_path / "esp.img"))
        path = machine.read_grubenv(str(tmp_path / "grubenv"))
        states = {slot: st.state.value for slot, st in GrubEnvBoot(path).status().items()}
        subprocess.run(["grub-editenv", path, "list"], capture_output=True, text=True, check=True)
    except (AssertionError, BootError, subprocess.CalledProcessError) as exc:
        return {}, {}, [f"the ESP or its grubenv: {str(exc).splitlines()[0]}"]
    try:
        state = machine.read_state(str(tmp_path / "state.img")) or {}
    except (AssertionError, ValueError) as exc:
        state, problems = {}, [f"the state file: {str(exc).splitlines()[0]}"]
    if states.get("a") != "good":
        problems.append(f"slot a is {states.get('a')}, not good")
    for slot, st in states.items():
        if st == "trial" and machine.partition_sha256(f"ROOT-{slot.upper()}", digest[1]) != digest[0]:
            problems.append(f"slot {slot} is trial with bytes other than the payload's")
    if (state.get("trial") or {}).get("armed") and states.get(state["trial"]["slot"]) not in ("trial", "good"):
        problems.append(f"the state says {state['trial']} armed, the grubenv says {states}")
    return states, state, problems


def stage(states: dict, state: dict, events: list[str], marks: dict) -> str:
    """How far the update had got when the plug was pulled, from the disk, the server and the guest's marks."""
    trial, armed = state.get("trial"), (state.get("trial") or {}).get("armed")
    if "3/1" in events:
        return "after the 3/1 report (the reboot requested)"
    if armed:
        return "armed and saved, before the 3/1 report"
    if trial:
        return ("verified and the trial recorded, " + ("the grubenv written, before the arm was saved"
                                                       if states.get(trial["slot"]) == "trial" else
                                                       "before the grubenv write"))
    if state.get("download"):
        where = "verifying (the download done)" if "verifying" in marks else "in the download"
        return f"{where}, the checkpoint at {state['download'].get('received', 0) >> 20} MiB"
    return "before the download was recorded"


class Watch:
    """Host-side times of one boot's update: the guest's lines in ``MARKS`` as they came in (host time, and the
    guest's monotonic time they carry), the 3/1 report received, QEMU gone."""

    def __init__(self, boot, srv, first_stream: int, first_event: int):
        """``first_stream``, ``first_event``: the server's counts when this boot started."""
        self.boot, self.srv, self.first_stream, self.first_event = boot, srv, first_stream, first_event
        self.applied = self.exited = None
        self.seen: dict[str, tuple[float, float]] = {}  # mark: (host monotonic time, guest monotonic time)
        self.watcher_errors: list[str] = []  # what the guest's watcher said went wrong (it carries on)
        self._offset, self._partial = 0, b""

    def streams(self) -> list[dict]:
        return self.srv.streams[self.first_stream:]

    def events(self) -> list[str]:
        return self.srv.event_codes()[self.first_event:]

    def _read_marks(self, now: float) -> None:
        try:
            with open(self.boot.marker, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            kind, _, rest = raw.decode(errors="replace").partition(" ")
            if kind == "WATCHERR":
                self.watcher_errors.append(rest)
            for mark, (want, text) in MARKS.items():
                if mark in self.seen or kind != want or text not in rest or (mark == "grubenv" and
                                                                             "recorded" not in self.seen):
                    continue
                # AGENTLOG [   44.890244] host unit[pid]: ...; OPERATION 44.890244 verifying; STATE ...; GRUBENV ...
                stamp = rest.strip("[ ").split("]")[0].split()[0] if rest else ""
                try:
                    self.seen[mark] = (now, float(stamp))
                except ValueError:
                    self.seen[mark] = (now, float("nan"))

    def sample(self) -> None:
        now = time.monotonic()
        self._read_marks(now)
        if self.applied is None and "3/1" in self.events():
            self.applied = now
        if self.exited is None and self.boot.proc.returncode is not None:
            self.exited = now

    def guest_span(self, start: str, end: str) -> float | None:
        if start in self.seen and end in self.seen:
            return self.seen[end][1] - self.seen[start][1]
        return None

    def guest_marks(self) -> str:
        """The marks seen, by the guest's clock from the first of them."""
        if not self.seen:
            return "no finalisation mark"
        t0 = min(g for _, g in self.seen.values())
        return ", ".join(f"{mark} +{g - t0:.3f}" for mark, (_, g) in sorted(self.seen.items(), key=lambda x: x[1][1]))

    async def until(self, predicate, what: str, timeout: float = INSTALL_TIMEOUT, poll: float = 0.01):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sample()
            if value := predicate():
                return value
            if self.exited is not None:
                return None
            await asyncio.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.boot.tail()}")


class Windows:
    """The stages of finalisation by the guest's clock and the reboot by the host's (seconds), as measured in
    this run; ``GUESSES`` until measured."""

    def __init__(self):
        self.guest = {stage: [] for stage in STAGES}
        self.reboot = [2.0]  # a first guess: the guest has been gone 2.1-2.4 s after the 3/1 report here

    def learn(self, watch: Watch, pulled: bool = False) -> None:
        """``pulled``: the plug was pulled, so QEMU's end is no shutdown to measure."""
        for stage, (start, end) in STAGES.items():
            span = watch.guest_span(start, end)
            if span is not None and span == span and span >= 0:
                self.guest[stage].append(round(span, 3))
        if watch.applied and watch.exited and not pulled:
            self.reboot.append(watch.exited - watch.applied)

    def stage_s(self, stage: str) -> float:
        """The latest measurement (the stage's length varies with the host's load)."""
        return (self.guest[stage] or [GUESSES[stage]])[-1]

    def reboot_s(self) -> float:
        return min(self.reboot[1:] or self.reboot)


async def pull_plug(watch: Watch, moment: dict, windows: Windows) -> dict:
    """Waits for ``moment`` in this boot's update and pulls the plug; returns where it landed."""
    boot, size = watch.boot, watch.srv.images[0].size
    phase = moment["phase"]
    if phase == "download":
        target = int(moment["at"] * size)
        # a resumed download may start past the chosen byte: then its first bytes are the moment
        stream = await watch.until(lambda: next((s for s in watch.streams() if not s["done"] and s["sent_to"] >= max(
            target, s["start"] + (1 << 16))), None), f"byte {target} of the download")
        if stream is None:
            return {"landed": "missed: the download ended first", "pulled": False, "watch": watch}
        await boot.power_off()
        return {"landed": f"download at {stream['sent_to'] >> 20} MiB of {size >> 20} (from {stream['start'] >> 20})",
                "sent_to": stream["sent_to"], "pulled": True, "watch": watch}
    poll = 0.01
    if phase == "finalisation":
        part = moment["stage"]
        start, end = STAGES[part]
        # every 10 ms through the download, every 2 ms from the verifying mark on
        await watch.until(lambda: watch.seen.get("verifying") or watch.seen.get(end), "the guest's verifying mark")
        seen = await watch.until(lambda: watch.seen.get(start) or watch.seen.get(end), f"the guest's {start} mark",
                                 poll=0.002)
        if seen is None:
            return {"landed": f"missed: the guest stopped before its {start} mark", "pulled": False, "watch": watch}
        if start not in watch.seen:  # (the watcher read two saves at once: the stage is over)
            return {"landed": f"missed: the guest's {end} mark came without its {start} mark", "pulled": False,
                    "watch": watch}
        span = windows.stage_s(part)
        delay = 1.25 * span * moment["u"]
        origin, what, poll = seen[0], f"into the {part} stage (measured {span:.3f} s by the guest's clock)", 0.002
    else:
        await watch.until(lambda: watch.applied, "the 3/1 report")
        if watch.applied is None:
            return {"landed": "missed: the guest stopped before the 3/1 report", "pulled": False, "watch": watch}
        delay = moment["u"] * 0.9 * windows.reboot_s()
        origin, what = watch.applied, "after the 3/1 report"
    await watch.until(lambda: time.monotonic() >= origin + delay, "the moment", timeout=delay + 5, poll=poll)
    if watch.exited is not None:
        windows.learn(watch)
        return {"landed": f"missed: the guest had shut down {watch.exited - origin:.1f} s {what}", "pulled": False,
                "watch": watch}
    late = time.monotonic() - origin - delay
    await boot.power_off()
    watch.sample()  # what the guest had said before it stopped
    windows.learn(watch, pulled=True)
    landed = f"{phase} {delay:.3f} s {what} (+{late * 1000:.0f} ms late)"
    if phase == "finalisation":
        landed += f"; the guest's marks: {watch.guest_marks()}"
    if watch.watcher_errors:
        landed += f"; the guest's watcher said: {watch.watcher_errors[-3:]}"
    return {"landed": landed, "pulled": True, "watch": watch}


@pytest.mark.timeout(900 * (PULLS + 3))
async def test_plug_pulls_in_download_and_finalisation_always_boot_a_good_slot_and_never_a_wrong_trial(image,
                                                                                                     tmp_path):
    seed = int(os.environ.get("QEMU_PULL_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    queue = plan_pulls(PULLS, rng)
    print(f"\nplug-pull campaign: {PULLS} pulls (QEMU_PULLS), seed {seed} (QEMU_PULL_SEED={seed} repeats the draw)")
    digest = payload_digest("payload-2.0.0.ext4.zst")
    windows, results, misbehaved, chains = Windows(), [], [], 0
    machine = srv = resume_limit = None
    began, sources = time.monotonic(), []

    def check_source(boot) -> None:
        if (source := boot.slot_source()) is not None:
            sources.append(source)
            if "read from the kernel command line (omaha_agent.slot=" not in source:
                misbehaved.append(f"boot {boot.marker}: {source}")

    def summary() -> None:
        print(f"plug pulls: {sum(r['pulled'] for r in results)} done, "
              f"{sum(not r['pulled'] for r in results)} missed, in {chains} device(s), "
              f"{time.monotonic() - began:.0f} s; the agent read its slot from omaha_agent.slot= on "
              f"{sum('(omaha_agent.slot=' in x for x in sources)} of {len(sources)} boots that logged it; "
              f"misbehaved: {len(misbehaved)}")
        print(f"stages measured by the guest's clock (s): verifying {windows.guest['verifying']}, the "
              f"bootloader's {windows.guest['bootloader']}; by the host's: 3/1 report to QEMU gone "
              f"{[round(r, 1) for r in windows.reboot[1:]]}")
        landed = [r for r in results if r["pulled"] and r["landed"].startswith("finalisation")]
        print(f"finalisation pulls: {len(landed)}, " + "; ".join(r["landed"] for r in landed))
        for m in misbehaved:
            print(f"  MISBEHAVED: {m}")

    try:
        for _ in range(4 * PULLS + 12):  # boots: a bound, far above what the pulls need
            if not queue and machine is None:
                break
            if machine is None:
                chains += 1
                srv = await start_server(image, f"pulls{chains}", "2.0.0", "payload-2.0.0.ext4.zst")
                machine, expect = Machine(f"pulls{chains}", image["disk"]), ("1.0.0", "A")
            counts = len(srv.streams), len(srv.events)
            boot = await machine.boot()
            await boot.wait_for(boot.booted_version, BOOT_TIMEOUT, "the guest to boot")
            line = next(line for line in boot.lines() if line.startswith("BOOTED "))
            booted = (boot.booted_version(), next((w[len("omaha_agent.slot="):] for w in line.split()
                                                   if w.startswith("omaha_agent.slot=")), "?"))
            print(f"{machine.name} boot {machine.boots}: {booted[0]} on slot {booted[1]} after "
                  f"{time.monotonic() - boot.started:.0f} s")
            if booted != expect:  # the bootloader or the disk disagrees with what the last pull left
                misbehaved.append(f"{machine.name} boot {machine.boots}: booted {booted}, expected {expect}")
                raise AssertionError(misbehaved[-1])
            watch = Watch(boot, srv, *counts)
            if booted[1] == "B":  # a verified trial: it confirms itself and the device is done
                await boot.wait_for(lambda: "3/2" in srv.event_codes(), BOOT_TIMEOUT, "the 3/2 report")
                await boot.wait_for(lambda: (s := boot.status()) and s["slots"]["b"]["state"]["data"] == "good", 120,
                                    "busctl to show slot b good")
                check_source(boot)
                await boot.power_off()
                await srv.stop()
                codes = srv.event_codes()
                print(f"{machine.name}: done; events {codes}; GETs from {[s['start'] for s in srv.streams]}")
                if codes.count("3/2") != 1 or "3/0" in codes:
                    misbehaved.append(f"{machine.name}: events {codes}, not exactly one 3/2 and no 3/0")
                states, _, problems = inspect_after_pull(machine, tmp_path, digest)
                if states != {"a": "good", "b": "good"}:
                    problems.append(f"slots {states} at the end, not both good")
                misbehaved.extend(f"{machine.name} at the end: {p}" for p in problems)
                machine = srv = None
                continue
            if not queue:  # no pull left: the update runs to its reboot
                await watch.until(lambda: watch.exited, "the agent to install 2.0.0 and reboot")
                windows.learn(watch)
                landed = {"landed": "none: ran to the reboot", "pulled": False}
            else:
                moment = queue.pop(0)
                landed = await pull_plug(watch, moment, windows)
                retried = moment.get("retried", 0)
                if not landed["pulled"] and retried < 2:  # the next chance gets it (a window measured since)
                    queue.insert(0, dict(moment, retried=retried + 1))
                results.append(landed)
            await boot.wait_exit(60, "QEMU to end")
            check_source(boot)
            states, state, problems = inspect_after_pull(machine, tmp_path, digest)
            streams = watch.streams()
            if resume_limit is not None and streams and streams[0]["start"] > resume_limit:
                problems.append(f"the download resumed at byte {streams[0]['start']}, past the {resume_limit} sent")
            resume_limit = landed.get("sent_to")
            if resume_limit is not None and states.get("b") != "bad":
                problems.append(f"slot b is {states.get('b')} after a pull in the download")
            landed["landed"] += f": {stage(states, state, watch.events(), watch.seen)}"
            print(f"  {'pull ' + str(len(results)) if landed['pulled'] else 'no pull'}: {landed['landed']}; "
                  f"slots after: {states}; GETs from {[s['start'] for s in streams]}; events {watch.events()}")
            misbehaved.extend(f"{machine.name} boot {machine.boots} ({landed['landed']}): {p}" for p in problems)
            expect = ("2.0.0", "B") if states.get("b") == "trial" else ("1.0.0", "A")
        else:
            raise AssertionError(f"the campaign did not end within its bound of boots; left: {queue}")
    finally:
        if srv is not None:
            await srv.stop()
        summary()
    assert not misbehaved, misbehaved
    assert sum(r["pulled"] for r in results) == PULLS, [r["landed"] for r in results]
