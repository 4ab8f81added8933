"""Adaptive updates through the daemon on the simulated device: the development server answers the check, a real
nginx serves the payload (the chunk data file), its signature and the chunk index beside it."""
from __future__ import annotations

import os
import random
import re

from agent.adaptive.index import parse
from agent.adaptive.plan import make
from agent.tools.devserver import DevServer, Image
from tests.adaptive import APP, Nginx, Release, cuts
from tests.simdevice import Device
from tests.test_adaptive_apply import need_nginx
from tests.test_trust import keys  # noqa: F401  (the keys fixture)

SLOT = 8 << 20


def pair(www, changed_share=0.05, seed=7, size=3 << 20):
    rng = random.Random(seed)
    old = bytearray(rng.randbytes(size))
    new = bytearray(old)
    lengths = cuts(size)
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    for i in sorted(rng.sample(range(len(lengths)), max(1, int(changed_share * len(lengths))))):
        new[offs[i]:offs[i + 1]] = rng.randbytes(offs[i + 1] - offs[i])
    return Release(www, "1.0.0", bytes(old), lengths), Release(www, "2.0.0", bytes(new), lengths)


class Setup:
    def __init__(self, tmp_path, keys, r2_tweak=None, provision_index=True, changed_share=0.05, extra=""):
        need_nginx()
        self.www = tmp_path / "www"
        self.www.mkdir()
        self.r1, self.r2 = pair(self.www, changed_share)
        private, self.public = keys["ed25519"]
        envelope = self.r2.signed(private)
        img = Image(self.r2.data_path, "2.0.0", APP)  # the offer names the signed payload ...
        img.signature = envelope
        if r2_tweak:  # ... whatever is then served
            r2_tweak(self)
        self.nginx = Nginx(str(self.www), str(tmp_path))
        self.server = DevServer([img], payload_base=self.nginx.base, log_path=str(tmp_path / "server.jsonl"))
        self.tmp = tmp_path
        self.provision_index = provision_index
        self.extra = extra

    async def __aenter__(self):
        await self.server.start()
        self.textfile = str(self.tmp / "omaha_agent.prom")
        self.dev = Device(self.tmp, self.server.url, slot_size=SLOT,
                          trust=f"trust: {{keys: [{self.public}], require_signature: true}}\n",
                          extra=f"metrics: {{textfile: {self.textfile}}}\n{self.extra}")
        with open(self.dev.slots["a"], "r+b") as f:  # the factory image on slot a
            f.write(self.r1.image)
        if self.provision_index:
            rc, out, err = await self.dev.cli("provision", "--slot", "a", "--version", "1.0.0", "--index",
                                              self.r1.index_path)
            assert rc == 0 and "chunk index of slot a kept" in out, err
        return self

    async def __aexit__(self, *exc):
        await self.server.stop()
        self.nginx.close()

    def slot_b(self) -> bytes:
        with open(self.dev.slots["b"], "rb") as f:
            return f.read(len(self.r2.image))

    @staticmethod
    def downloaded(err: str) -> int:
        """The bytes the daemon says it downloaded (what its 14/1 event reports as ``downloaded``)."""
        found = re.findall(r"verified 2\.0\.0: (\d+) bytes", err)
        assert len(found) == 1, err
        return int(found[0])

    def data_requests(self) -> list[str]:
        return [line for line in self.nginx.log() if line.startswith("/" + self.r2.data_name + " ")]


async def test_an_adaptive_release_installs_from_the_factory_slot_and_ranges_and_keeps_its_index(tmp_path, keys):
    async with Setup(tmp_path, keys) as s:
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert s.slot_b() == s.r2.image
        assert s.server.event_codes() == ["13/1", "14/1", "3/1"]
        downloaded = s.downloaded(err)
        assert downloaded < len(s.r2.data) // 5, (downloaded, len(s.r2.data))
        assert all(line.split()[1] == "206" for line in s.data_requests())
        with open(tmp_path / "state" / "chunks" / "slot-b.idx", "rb") as f:
            assert f.read() == s.r2.index  # the next update can be adaptive from slot b
        metrics = dict(line.rsplit(" ", 1) for line in open(s.textfile).read().splitlines() if line[0] != "#")
        reused = make(parse(s.r2.index), parse(s.r1.index)).reused_bytes
        assert int(metrics["omaha_agent_reused_bytes_total"]) == reused > 0
        assert int(metrics["omaha_agent_download_bytes_total"]) == downloaded
        assert re.search(r"adaptive install: \d+ chunks local, \d+ zero, \d+ fetched", err)
        print(f"\nadaptive through the daemon: {downloaded} bytes downloaded for a {len(s.r2.data)}-byte payload")


async def test_without_an_index_for_the_booted_slot_the_full_path_installs_and_keeps_the_index(tmp_path, keys):
    async with Setup(tmp_path, keys, provision_index=False) as s:
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert s.slot_b() == s.r2.image
        assert s.downloaded(err) == len(s.r2.data)
        assert [line.split()[1] for line in s.data_requests()] == ["200"]
        assert os.path.exists(tmp_path / "state" / "chunks" / "slot-b.idx")


async def test_a_server_without_the_chunk_index_gets_the_full_download(tmp_path, keys):
    async with Setup(tmp_path, keys, r2_tweak=lambda s: os.unlink(s.r2.index_path)) as s:
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert "full download: could not fetch the chunk index" in err
        assert s.slot_b() == s.r2.image
        assert [line.split()[1] for line in s.data_requests()] == ["200"]


async def test_with_install_adaptive_off_the_full_path_installs_and_keeps_the_index(tmp_path, keys):
    async with Setup(tmp_path, keys, extra="install: {adaptive: false}\n") as s:
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert "full download: adaptive updates are off (install.adaptive)" in err
        assert s.slot_b() == s.r2.image
        assert [line.split()[1] for line in s.data_requests()] == ["200"]
        assert os.path.exists(tmp_path / "state" / "chunks" / "slot-b.idx")


async def test_a_plan_fetching_most_of_the_data_takes_the_full_path(tmp_path, keys):
    async with Setup(tmp_path, keys, changed_share=0.9) as s:
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert s.slot_b() == s.r2.image
        assert [line.split()[1] for line in s.data_requests()] == ["200"]
        assert "the full download is taken" in err


def _tamper_index(s):
    raw = bytearray(s.r2.index)
    raw[-1] ^= 1
    with open(s.r2.index_path, "wb") as f:
        f.write(raw)


async def test_an_index_that_does_not_match_its_signed_digest_is_refused_and_nothing_is_armed(tmp_path, keys):
    async with Setup(tmp_path, keys, r2_tweak=_tamper_index) as s:
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc != 0
        state = s.dev.state()
        assert "chunk index os-2.0.0.cidx does not match its signed digest" in state["last_error"]
        assert s.server.event_codes()[-1] == "3/0" and "3/1" not in s.server.event_codes()
        assert state["trial"] is None
        assert s.data_requests() == []  # refused before anything of the image was fetched
        assert (await s.dev.slots_json())["slots"]["b"]["state"] != "trial"


KILLER = r"""
import asyncio, os, sys
from agent import install
from agent.config import load
from agent.daemon import Agent
# a test seam: checkpoints every 256 KiB instead of 64 MiB, so a 3 MiB image has some before the kill
install.Installer.__init__.__kwdefaults__["checkpoint_every"] = 256 << 10
agent = Agent(load(sys.argv[1]))
def listener(snap):
    if snap["operation"] == "downloading" and snap["bytes_downloaded"] >= int(sys.argv[2]):
        os.write(1, b"status %d %d\n" % (snap["planned_bytes"], snap["saved_bytes"]))
        os._exit(137)  # as a SIGKILL: nothing runs on the way out
agent.listeners.append(listener)
print(asyncio.run(agent.run_once()))
"""


async def test_killed_mid_apply_then_restarted_resumes_at_the_checkpointed_chunk(tmp_path, keys):
    import asyncio
    import sys
    from tests.simdevice import ROOT
    async with Setup(tmp_path, keys, changed_share=0.3) as s:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLER, s.dev.config,
                                                    str(len(s.r2.image) // 2), env=dict(os.environ, PYTHONPATH=ROOT),
                                                    cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 137
        planned, saved = (int(x) for x in out.decode().split("status ")[1].split())
        plan = make(parse(s.r2.index), parse(s.r1.index))
        assert planned == plan.remote_bytes + len(s.r2.index) and saved == len(s.r2.data) - planned > 0
        cp = s.dev.state()["download"]
        assert cp["sha256"] == s.r2.image_sha and len(s.r2.image) // 4 <= cp["received"] < len(s.r2.image)
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert "resumes at chunk" in err and f"(byte {cp['received']})" in err
        assert s.slot_b() == s.r2.image


def _tamper_data(s):
    """The last fetched chunk's frame swapped for another of the same length (after the signature was made)."""
    import zstandard
    from agent.adaptive.plan import REMOTE
    idx = parse(s.r2.index)
    kinds = make(idx, parse(s.r1.index)).kinds
    k = max(i for i in range(idx.count) if kinds[i] == REMOTE)
    stored = idx.stored_offsets()
    frame = zstandard.ZstdCompressor(level=3).compress(os.urandom(idx.record(k)[0]))
    assert len(frame) == stored[k + 1] - stored[k]
    data = bytearray(s.r2.data)
    data[stored[k]:stored[k + 1]] = frame
    with open(s.r2.data_path, "wb") as f:
        f.write(data)


async def test_a_data_file_that_does_not_match_its_signed_index_is_refused_and_nothing_is_armed(tmp_path, keys):
    async with Setup(tmp_path, keys, r2_tweak=_tamper_data, changed_share=0.3) as s:
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc != 0
        state = s.dev.state()
        assert "does not match its signed digest" in state["last_error"], state["last_error"]
        assert "the next attempt downloads the full payload" in state["last_error"]
        assert s.server.event_codes()[-1] == "3/0" and "3/1" not in s.server.event_codes()
        assert state["trial"] is None
        assert (await s.dev.slots_json())["slots"]["b"]["state"] == "bad"
        assert os.path.exists(tmp_path / "state" / "chunks" / "full")


def test_the_status_command_shows_what_an_adaptive_install_downloads_and_saves():
    from agent.console import render_status
    status = {"operation": "downloading", "current_version": "1.0.0", "booted_slot": "a", "new_version": "2.0.0",
              "new_size": 300 << 20, "bytes_downloaded": 10 << 20, "progress": 0.1, "rate": 1 << 20,
              "planned_bytes": 60 << 20, "saved_bytes": 240 << 20, "slots": {}}
    assert "adaptive:       downloads 60.0 MiB, saves 240.0 MiB" in render_status(status, 0)
    assert "adaptive:" not in render_status(dict(status, planned_bytes=300 << 20, saved_bytes=0), 0)


async def test_the_next_update_is_adaptive_from_the_index_the_last_one_saved(tmp_path, keys):
    """1.0 (factory, slot a) → 2.0 adaptive onto b → reboot, confirmed → 3.0 adaptive onto a, from b's saved index."""
    async with Setup(tmp_path, keys) as s:
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        await s.dev.cli("sim-reboot")
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")  # boots 2.0 on trial, health passes: good
        assert rc == 0, err
        with open(s.dev.config) as f:
            config = f.read()
        with open(s.dev.config, "w") as f:  # the running version, as a new image would say
            f.write(config.replace('version: "1.0.0"', 'version: "2.0.0"'))
        rng = random.Random(11)
        new = bytearray(s.r2.image)
        offs = parse(s.r2.index).offsets()
        changed = sorted(rng.sample(range(len(offs) - 1), 6))
        for i in changed:
            new[offs[i]:offs[i + 1]] = rng.randbytes(offs[i + 1] - offs[i])
        lengths = [offs[i + 1] - offs[i] for i in range(len(offs) - 1)]
        r3 = Release(s.www, "3.0.0", bytes(new), lengths)
        img = Image(r3.data_path, "3.0.0", APP)
        img.signature = r3.signed(keys["ed25519"][0])
        s.server.images[:] = [img]
        before = len(s.data_requests())
        rc, out, err = await s.dev.cli("daemon", "--once", "-v")
        assert rc == 0 and "installed 3.0.0 on slot a" in out, err
        with open(s.dev.slots["a"], "rb") as f:
            assert f.read(len(r3.image)) == r3.image
        fetched = int(re.findall(r"verified 3\.0\.0: (\d+) bytes", err)[0])
        frames = parse(r3.index).stored_offsets()
        assert fetched < len(r3.index) + sum(frames[i + 1] - frames[i] for i in changed) + 4096 * len(changed)
        ranged = [line for line in s.nginx.log() if line.startswith(f"/{r3.data_name} ")]
        assert len(ranged) == 1 and ranged[0].split()[1] == "206" and before > 0
        with open(tmp_path / "state" / "chunks" / "slot-a.idx", "rb") as f:
            assert f.read() == r3.index
