"""A simulated device for the flow tests: two slot files, the sim bootloader, a config, and the CLI to drive it."""
import asyncio
import json
import os
import sys

from agent.boot.sim import SimBoot
from agent.tools.devserver import Image

APP = "{0a0b0c0d-1111-4222-8333-444455556666}"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Device:
    def __init__(self, tmp_path, url, policy="manual", health="true", protocol="3.0", after="start", extra="", slot_size=8 << 20,
                 trust="trust: {require_signature: false}\n", reboot=None):
        self.dir = tmp_path
        self.slots = {s: str(tmp_path / f"slot-{s}.img") for s in "ab"}
        for p in self.slots.values():
            with open(p, "wb") as f:
                f.truncate(slot_size)
        self.boot = SimBoot(str(tmp_path / "bootenv.json"), self.slots)
        self.boot.initialize("a", "1.0.0")
        self.config = str(tmp_path / "agent.yaml")
        with open(self.config, "w") as f:
            f.write(f"""server: {{url: "{url}", insecure_http: true, protocol: "{protocol}", timeout: 5}}
app: {{id: "{APP}", version: "1.0.0"}}
slots:
  a: {{file: {self.slots['a']}}}
  b: {{file: {self.slots['b']}}}
boot: {{backend: sim, env: {tmp_path}/bootenv.json, tries: 2}}
state_dir: {tmp_path}/state
reboot: {reboot or '{policy: %s}' % policy}
health: {{commands: ["{health}"], timeout: 10, after: {after}}}
{trust}{extra}""")

    async def cli(self, *args, timeout=60, config=True):
        extra = ("--config", self.config) if config else ()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", *args, *extra, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode, out.decode(), err.decode()

    async def once(self):
        return await self.cli("daemon", "--once")

    async def slots_json(self):
        rc, out, err = await self.cli("slots", "--json")
        assert rc == 0, err
        return json.loads(out)

    def state(self):
        with open(self.dir / "state" / "state.json") as f:
            return json.load(f)


def image(tmp_path, version, head=b"IMAGE", size=3 << 20):
    path = tmp_path / f"v{version}.img"
    path.write_bytes(head + os.urandom(size - len(head)))
    return Image(str(path), version, APP)
