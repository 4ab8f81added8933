"""``omaha-agent demo``: the whole A/B cycle on a simulated device, on any Linux machine, without root.

Scenario 1: check → stream → verify → trial → simulated reboot → health → good → 3/2.
Scenario 2: an image whose kernel never comes up → tries run out → fallback → 3/0.
Scenario 3: a release nobody signed → refused before the slot is touched.
Scenario 4: 2.0.0 came as an adaptive release (its chunk index saved with the slot); 2.1.0 changes a sixteenth of
the image and installs from the chunks the booted slot holds, fetching only the rest.
Exit status 0 only if all four behaved as described.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile

from ..adaptive.cut import CutError
from ..boot.sim import PANIC_MAGIC, SimBoot
from ..config import load
from ..daemon import Agent, AgentError, read_slots
from .devserver import DevServer, Image, adaptive_image

APPID = "{5e1f0a3c-7a1d-4c2b-9d57-0a6d2f1e9b10}"
SLOT_SIZE = 24 << 20
MARK = b"DEMO-IMAGE"

CONFIG = """\
server:
  url: {url}
  insecure_http: true          # the demo server is plain http on 127.0.0.1
app:
  id: "{appid}"
  version: "1.0.0"
  track: stable
  board: amd64-generic
slots:
  a: {{file: {dir}/slot-a.img}}
  b: {{file: {dir}/slot-b.img}}
boot:
  backend: sim
  env: {dir}/bootenv.json
  tries: 3
state_dir: {dir}/state
reboot:
  policy: manual
health:
  commands:
    - head -c {marklen} "$OMAHA_AGENT_DEVICE" | grep -q {mark}
  timeout: 30
install:
  verify: readback
trust:
  require_signature: true      # releases are signed by the demo's release key; the device trusts its public half
  keys: [{dir}/keys/*.pem]
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def make_image(path: str, size: int, head: bytes) -> None:
    with open(path, "wb") as f:
        f.write(head)
        remaining = size - len(head)
        while remaining > 0:
            block = os.urandom(min(1 << 20, remaining))
            f.write(block)
            remaining -= len(block)


class ProgressBar:
    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.last_step = -1

    def __call__(self, snap: dict) -> None:
        if snap["operation"] != "downloading" or not snap["new_size"]:
            return
        fraction = snap["progress"]
        rate = snap["rate"] / (1 << 20)
        if self.tty:
            filled = int(fraction * 30)
            sys.stdout.write(f"\r    [{'#' * filled}{' ' * (30 - filled)}] {fraction * 100:5.1f}%  {rate:6.1f} MiB/s")
            if fraction >= 1.0:
                sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            step = int(fraction * 4)
            if step != self.last_step:
                self.last_step = step
                say(f"    downloaded {fraction * 100:5.1f}%  ({snap['bytes_downloaded']} bytes, {rate:.1f} MiB/s)")


async def run_agent(config_path: str, bar: ProgressBar | None = None) -> str:
    agent = Agent(load(config_path))
    if bar:
        agent.listeners.append(bar)
    try:
        return await agent.run_once()
    except AgentError as exc:
        return f"error: {exc}"


async def slots_table(config_path: str) -> None:
    view = await read_slots(load(config_path))
    for name, s in view["slots"].items():
        mark = "*" if name == view["booted"] else " "
        say(f"    {mark} slot {name}: {s['state']:<6} tries left {s.get('tries_left', 0)}  version {s.get('version') or '-'}")


def make_release_key(work: str) -> str:
    """The demo's release key (Ed25519): the private half for the server, the public half in the device's keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    private = os.path.join(work, "release-key.pem")
    with open(private, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.makedirs(os.path.join(work, "keys"), exist_ok=True)
    with open(os.path.join(work, "keys", "release.pem"), "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return private


def file_digest(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def scenario(work: str) -> bool:
    quiet = logging.getLogger("omaha-agent")
    quiet.handlers[:] = [logging.NullHandler()]
    quiet.propagate = False
    slots = {s: os.path.join(work, f"slot-{s}.img") for s in "ab"}
    make_image(slots["a"], SLOT_SIZE, MARK + b" 1.0.0\n")
    with open(slots["b"], "wb") as f:
        f.truncate(SLOT_SIZE)
    boot = SimBoot(os.path.join(work, "bootenv.json"), slots)
    boot.initialize("a", "1.0.0")
    v2 = os.path.join(work, "image-2.0.0.img")
    make_image(v2, 16 << 20, MARK + b" 2.0.0\n")
    try:  # an adaptive release: its payload is its chunk data (one zstd stream), its index saved with the slot
        release2, no_chunks = adaptive_image(v2, "2.0.0", APPID, level=1), ""
    except CutError as exc:  # a device-only install (no pyfastcdc): 2.0.0 as a plain image, scenario 4 skipped
        release2, no_chunks = Image(v2, "2.0.0", APPID), str(exc)
    v3 = os.path.join(work, "image-3.0.0.img")
    make_image(v3, 16 << 20, PANIC_MAGIC + b" kernel panic: cannot mount root\n")

    signing_key = make_release_key(work)
    log_path = os.path.join(work, "server-log.jsonl")
    server = DevServer([release2], log_path=log_path, sign_key=signing_key)
    url = await server.start()
    config_path = os.path.join(work, "agent.yaml")
    with open(config_path, "w") as f:
        f.write(CONFIG.format(url=url, appid=APPID, dir=work, mark=MARK.decode(), marklen=len(MARK)))
    ok = True
    try:
        say(f"A simulated device in {work}: slot a runs 1.0.0, slot b is empty.")
        say(f"The development server on {url} offers 2.0.0 ({release2.size} bytes), signed with the release "
            "key; the device trusts only that key's public half.")
        await slots_table(config_path)
        say()
        say("== Scenario 1: a good update ==")
        say("1. The agent checks, streams 2.0.0 onto slot b while hashing it, verifies it, sets b for a trial boot:")
        say("    " + await run_agent(config_path, ProgressBar()))
        await slots_table(config_path)
        say("2. Simulated reboot: the bootloader tries slot b (one try used):")
        say(f"    booted slot {boot.reboot()}")
        say("3. The agent starts on b, runs its health command, marks b good and reports 3/2:")
        say("    " + await run_agent(config_path))
        await slots_table(config_path)
        codes = server.event_codes()
        say(f"4. The server received events: {' '.join(codes)}")
        ok &= codes == ["13/1", "14/1", "3/1", "3/2"]
        ok &= boot.status()["b"].state.value == "good" and boot.booted_slot() == "b"
        last = server.events[-1]
        say(f"    3/2 says version {last['version']}, previousversion {last['previousversion']}")
        ok &= last["version"] == "2.0.0" and last["previousversion"] == "1.0.0"
        say()
        say("== Scenario 2: an update whose kernel never comes up ==")
        server.images = [Image(v3, "3.0.0", APPID)]
        server.events.clear()
        say("1. The server now offers 3.0.0; the agent installs it onto slot a (b keeps running):")
        say("    " + await run_agent(config_path, ProgressBar()))
        say("2. Simulated reboot: slot a panics on every try; after 3 tries the bootloader falls back to b:")
        say(f"    booted slot {boot.reboot()}")
        say("3. The agent starts on b, sees the failed trial, marks a bad and reports 3/0:")
        say("    " + await run_agent(config_path))
        await slots_table(config_path)
        codes = server.event_codes()
        say(f"4. The server received events: {' '.join(codes)} (3/0 errorcode {server.events[-1]['errorcode']}: "
            "the bootloader fell back)")
        ok &= codes == ["13/1", "14/1", "3/1", "3/0"] and server.events[-1]["errorcode"] == 44
        ok &= boot.booted_slot() == "b" and boot.status()["a"].state.value == "bad"
        say("5. Checking again right away: 3.0.0 is not installed a second time:")
        say("    " + await run_agent(config_path))
        ok &= server.event_codes() == ["13/1", "14/1", "3/1", "3/0"]
        say()
        say("== Scenario 3: a release nobody signed ==")
        v4 = os.path.join(work, "image-4.0.0.img")
        make_image(v4, 16 << 20, MARK + b" 4.0.0\n")
        server.images = [Image(v4, "4.0.0", APPID, signature=b"")]  # served without a valid envelope
        server.events.clear()
        before = file_digest(slots["a"])
        say("1. The server offers 4.0.0 without a valid signature; the agent refuses it before touching slot a:")
        say("    " + await run_agent(config_path))
        codes = server.event_codes()
        say(f"2. The server received: {' '.join(codes)} (errorcode {server.events[-1]['errorcode']}: signature); "
            f"slot a is {'unchanged' if file_digest(slots['a']) == before else 'CHANGED'}")
        ok &= codes == ["3/0"] and server.events[-1]["errorcode"] == 18 and file_digest(slots["a"]) == before
        say()
        if no_chunks:
            say(f"== Scenario 4 (an adaptive update) skipped: {no_chunks} ==")
        else:
            ok &= await adaptive_scenario(work, server, config_path, boot, v2)
    finally:
        await server.stop()
    say()
    say(f"Server log (every request and event as JSON lines): {log_path}")
    done = "the first three scenarios" if no_chunks else "all four scenarios"
    say(f"demo: {done} behaved as described" if ok else "demo: FAILED - see above")
    return ok


async def adaptive_scenario(work: str, server: DevServer, config_path: str, boot: SimBoot, v2: str) -> bool:
    """Scenario 4: slot b runs 2.0.0, installed from an adaptive release (so its chunk index was saved); 2.1.0 is
    2.0.0 with one MiB in sixteen rewritten, and the agent fetches little more than that MiB."""
    say("== Scenario 4: an adaptive update ==")
    v21 = os.path.join(work, "image-2.1.0.img")
    with open(v2, "rb") as f:
        image = bytearray(f.read())
    head = MARK + b" 2.1.0\n"
    image[:len(head)] = head
    image[8 << 20:9 << 20] = os.urandom(1 << 20)  # the update: one MiB of the 16 rewritten
    with open(v21, "wb") as f:
        f.write(image)
    release = adaptive_image(v21, "2.1.0", APPID, level=1)
    server.images = [release]
    server.events.clear()
    server.fetches.clear()
    say(f"1. Slot b runs 2.0.0, installed from an adaptive release: the device kept its chunk index. The server "
        f"now offers 2.1.0 (one MiB of 16 changed; its chunk data file, the full download, is {release.size} "
        "bytes). The agent fetches the 2.1.0 index, reads the chunks slot b already holds and asks for the rest "
        "in range requests:")
    say("    " + await run_agent(config_path, ProgressBar()))
    fetched = sum(f.get("sent", 0) for f in server.fetches)
    say(f"2. Fetched {fetched} bytes in {len(server.fetches)} requests (the index and the ranges) instead of "
        f"{release.size}: {fetched / release.size * 100:.1f} % of the payload")
    say(f"3. Simulated reboot: booted slot {boot.reboot()}; the agent runs the health command on it:")
    say("    " + await run_agent(config_path))
    await slots_table(config_path)
    codes = server.event_codes()
    say(f"4. The server received events: {' '.join(codes)}")
    with open(os.path.join(work, "slot-a.img"), "rb") as f:
        same = f.read(len(image)) == image
    say(f"5. Slot a holds 2.1.0 byte for byte: {'yes' if same else 'NO'}")
    return codes == ["13/1", "14/1", "3/1", "3/2"] and 0 < fetched < release.size // 4 and same


def main(args) -> int:
    work = args.dir or tempfile.mkdtemp(prefix="omaha-agent-demo.")
    os.makedirs(work, exist_ok=True)
    try:
        ok = asyncio.run(scenario(os.path.abspath(work)))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1
