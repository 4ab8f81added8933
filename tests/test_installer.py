"""The streaming installer against the real development server on 127.0.0.1, with faults injected."""
import asyncio
import dataclasses
import gzip
import hashlib
import json
import lzma
import os
import signal
import subprocess
import sys
import random

import aiohttp
import pytest
import zstandard

from agent.boot import SlotState
from agent.tools.devserver import DevServer, Faults, Image
from agent.boot.worker import BootWorker
from agent.install import Installer, InstallError
from agent.state import Checkpoint, checkpoint_from
from agent.omaha import decode_response, encode_request, interpret
from agent.omaha import request as build
from agent.slots import SlotError, SlotSpec, check_target

APP = "{a1b2c3d4-0000-4000-8000-000000000001}"


@pytest.fixture
def payload(tmp_path):
    data = os.urandom(3 << 20) + bytes(2 << 20) + os.urandom(123)
    path = tmp_path / "v2.img"
    path.write_bytes(data)
    return str(path), data


async def offer_from(server):
    info = build.ClientInfo(appid=APP, version="1.0.0")
    req = build.update_check(info, requestid="r", sessionid="s", interactive=False, ping=None)
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url, data=encode_request(req)) as r:
            return interpret(decode_response(await r.read()), APP)


async def run_install(server, boot, slots, session_kwargs=None, resume=None, **kw):
    offer = await offer_from(server)
    async with aiohttp.ClientSession() as session:
        inst = Installer(session, sessionid="s", chunk=256 << 10, checkpoint_every=1 << 20, **kw)
        return await inst.install(BootWorker(boot), "b", slots["b"], 8 << 20, offer.packages[0], offer.version, 3, resume)


async def with_server(images, faults=None, dialect="chromeos"):
    server = DevServer(images, dialect=dialect, faults=faults or Faults())
    await server.start()
    return server


def slot_holds(path, data):
    with open(path, "rb") as f:
        return f.read(len(data)) == data


@pytest.mark.parametrize("dialect", ["chromeos", "flatcar"])
async def test_install_streams_verifies_and_sets_trial(device, payload, dialect):
    boot, slots = device
    path, data = payload
    before_a = open(slots["a"], "rb").read()
    server = await with_server([Image(path, "2.0.0", APP)], dialect=dialect)
    seen = []
    try:
        result = await run_install(server, boot, slots, readback=True, on_progress=seen.append)
    finally:
        await server.stop()
    assert result.received == len(data) and result.compression is None
    assert slot_holds(slots["b"], data)
    assert open(slots["a"], "rb").read() == before_a
    status = boot.status()
    assert status["b"].state is SlotState.TRIAL and status["b"].tries_left == 3 and status["b"].version == "2.0.0"
    assert status["a"].state is SlotState.GOOD
    assert seen[-1].done == len(data) and seen[-1].fraction == 1.0
    assert all(a.done <= b.done for a, b in zip(seen, seen[1:]))


async def test_dead_mirror_and_http_500_fall_back_to_the_next_url(device, payload):
    boot, slots = device
    path, data = payload
    faults = Faults(extra_urls=("http://127.0.0.1:9/dead/",), payload_status=500, payload_failures=1)
    server = await with_server([Image(path, "2.0.0", APP)], faults)
    try:
        result = await run_install(server, boot, slots)
    finally:
        await server.stop()
    assert slot_holds(slots["b"], data) and result.url.startswith(server.base)


async def test_payload_base_points_the_offer_at_another_file_server(device, payload, tmp_path):
    boot, slots = device
    path, data = payload
    files = await with_server([Image(path, "2.0.0", APP)])  # stands in for nginx: serves the file by name
    server = await with_server([Image(path, "2.0.0", APP)])
    server.payload_base = f"{files.base}/packages"  # no trailing slash: the server adds it
    files.log_path = str(tmp_path / "files.jsonl")
    try:
        offer = await offer_from(server)
        result = await run_install(server, boot, slots)
    finally:
        await server.stop()
        await files.stop()
    assert offer.packages[0].urls == (f"{files.base}/packages/v2.img",)
    assert result.url == f"{files.base}/packages/v2.img" and slot_holds(slots["b"], data)
    assert '"download"' in open(files.log_path).read()


async def test_connection_reset_mid_stream_resumes_with_range(device, payload, tmp_path):
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)], Faults(reset_after=1_500_000, resets=2))
    server.log_path = str(tmp_path / "log.jsonl")
    try:
        await run_install(server, boot, slots)
    finally:
        await server.stop()
    starts = [json.loads(l)["start"] for l in open(server.log_path) if '"download"' in l]
    assert starts[0] == 0 and all(s > 0 for s in starts[1:]) and len(starts) == 3
    assert slot_holds(slots["b"], data) and boot.status()["b"].state is SlotState.TRIAL


async def test_range_ignored_restarts_from_zero(device, payload):
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)], Faults(reset_after=1_000_000, resets=1,
                                                                   ignore_range=True))
    try:
        result = await run_install(server, boot, slots)
    finally:
        await server.stop()
    assert result.received == len(data) and slot_holds(slots["b"], data)


async def test_short_body_is_completed(device, payload):
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)], Faults(short_body=True))
    try:
        await run_install(server, boot, slots)
    finally:
        await server.stop()
    assert slot_holds(slots["b"], data)


async def test_stalled_server_times_out_and_resumes(device, payload):
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)], Faults(stall_after=700_000))
    try:
        await run_install(server, boot, slots, read_timeout=0.5)
    finally:
        await server.stop()
    assert slot_holds(slots["b"], data)


async def test_slow_drip_still_completes(device, tmp_path):
    boot, slots = device
    data = os.urandom(300_000)
    (tmp_path / "small.img").write_bytes(data)
    server = await with_server([Image(str(tmp_path / "small.img"), "2.0.0", APP)], Faults(drip_delay=0.02))
    try:
        await run_install(server, boot, slots)
    finally:
        await server.stop()
    assert slot_holds(slots["b"], data)


@pytest.mark.parametrize("fault,kind", [(Faults(wrong_hash=True), "hash"), (Faults(size_lie=10), "size")])
async def test_wrong_hash_or_size_leaves_target_bad_and_booted_untouched(device, payload, fault, kind):
    boot, slots = device
    path, _ = payload
    before_a = open(slots["a"], "rb").read()
    server = await with_server([Image(path, "2.0.0", APP)], fault)
    try:
        with pytest.raises(InstallError) as info:
            await run_install(server, boot, slots)
    finally:
        await server.stop()
    assert info.value.kind == kind
    assert boot.status()["b"].state is SlotState.BAD and boot.status()["a"].state is SlotState.GOOD
    assert open(slots["a"], "rb").read() == before_a


@pytest.mark.parametrize("compress,name", [(gzip.compress, "gzip"), (lzma.compress, "xz"),
                                           (lambda d: zstandard.ZstdCompressor().compress(d), "zstd")])
async def test_compressed_payloads_are_unpacked_onto_the_slot(device, payload, tmp_path, compress, name):
    boot, slots = device
    _, data = payload
    packed = tmp_path / f"v2.img.{name}"
    packed.write_bytes(compress(data))
    server = await with_server([Image(str(packed), "2.0.0", APP)], Faults(reset_after=200_000, resets=1))
    try:
        result = await run_install(server, boot, slots, readback=True)
    finally:
        await server.stop()
    assert result.compression == name and result.written == len(data) and slot_holds(slots["b"], data)


async def test_decompression_bomb_cannot_outgrow_the_slot(device, tmp_path):
    boot, slots = device
    bomb = tmp_path / "bomb.img.gz"
    bomb.write_bytes(gzip.compress(bytes(64 << 20)))  # 64 MiB of zeros for an 8 MiB slot
    server = await with_server([Image(str(bomb), "2.0.0", APP)])
    try:
        with pytest.raises(InstallError) as info:
            await run_install(server, boot, slots)
    finally:
        await server.stop()
    assert info.value.kind == "size" and boot.status()["b"].state is SlotState.BAD


async def test_cancel_then_resume_after_restart_rebuilds_hash_state(device, payload, tmp_path):
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)], Faults(drip_delay=0.01))
    server.log_path = str(tmp_path / "log.jsonl")
    checkpoints = []
    try:
        task = asyncio.create_task(run_install(server, boot, slots, on_checkpoint=checkpoints.append))
        for _ in range(400):
            await asyncio.sleep(0.02)
            if checkpoints and checkpoints[-1].received >= 2 << 20:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        saved = checkpoint_from(json.loads(json.dumps(dataclasses.asdict(checkpoints[-1]))))
        assert saved.received >= 2 << 20 and boot.status()["b"].state is SlotState.BAD
        server.faults.drip_delay = 0
        result = await run_install(server, boot, slots, resume=saved)
    finally:
        await server.stop()
    assert result.resumed_from == saved.received
    starts = [json.loads(l)["start"] for l in open(server.log_path) if '"download"' in l]
    assert starts == [0, saved.received]
    assert slot_holds(slots["b"], data) and boot.status()["b"].state is SlotState.TRIAL


async def test_cancel_while_a_chunk_is_being_written_keeps_a_true_checkpoint(device, payload, monkeypatch):
    """Each cancel lands while chunks are inside the writing thread (each write has started and takes 50 ms,
    while hashing runs ahead in its own thread). The checkpoint saved on cancel must describe exactly what is
    on the slot, and the resumed install must verify."""
    import time as _time
    from agent.payload import SlotWriter
    real_write = SlotWriter.write_plain
    feeds = []

    def slow_write(self, data, offset, aligned=False):
        feeds.append(len(data))
        _time.sleep(0.05)
        return real_write(self, data, offset, aligned)

    monkeypatch.setattr(SlotWriter, "write_plain", slow_write)
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)])
    saved = None
    try:
        for _ in range(3):
            checkpoints, feeds[:] = [], []
            task = asyncio.create_task(run_install(server, boot, slots, resume=saved,
                                                   on_checkpoint=checkpoints.append))
            for _ in range(500):
                if len(feeds) >= 3:
                    break
                await asyncio.sleep(0.002)
            task.cancel()  # the third chunk is in the thread now
            with pytest.raises(asyncio.CancelledError):
                await task
            assert checkpoints, "a cancel saves a checkpoint"
            saved = checkpoints[-1]
            assert slot_holds(slots["b"], data[:saved.received]), f"checkpoint at {saved.received} is false"
        assert 0 < saved.received < len(data)
        monkeypatch.setattr(SlotWriter, "write_plain", real_write)
        result = await run_install(server, boot, slots, resume=saved)
    finally:
        await server.stop()
    assert result.resumed_from == saved.received
    assert slot_holds(slots["b"], data) and boot.status()["b"].state is SlotState.TRIAL


async def test_checkpoint_after_the_last_byte_verifies_without_fetching(device, payload, tmp_path):
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)])
    server.log_path = str(tmp_path / "log.jsonl")
    try:
        pkg = (await offer_from(server)).packages[0]
        with open(slots["b"], "r+b") as f:
            f.write(data)  # a cancel came after the last chunk was written, before the verify
        cp = Checkpoint("2.0.0", "b", pkg.sha256_hex, pkg.size, pkg.size, False)
        result = await run_install(server, boot, slots, resume=cp)
    finally:
        await server.stop()
    assert result.resumed_from == pkg.size and boot.status()["b"].state is SlotState.TRIAL
    assert not os.path.exists(server.log_path) or '"download"' not in open(server.log_path).read()


async def test_resume_with_a_corrupted_prefix_fails_verification(device, payload):
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)])
    try:
        offer = await offer_from(server)
        pkg = offer.packages[0]
        with open(slots["b"], "r+b") as f:
            f.write(data[:1 << 20])
            f.seek(1000)
            f.write(b"X")  # the prefix on the slot no longer matches the payload
        cp = Checkpoint("2.0.0", "b", pkg.sha256_hex, pkg.size, 1 << 20, False)
        result = await run_install(server, boot, slots, resume=cp)
    finally:
        await server.stop()
    # the bad prefix makes the first pass fail its hash; the installer starts over from 0 and succeeds
    assert result.resumed_from == 1 << 20 and slot_holds(slots["b"], data)


def test_safety_rules(device, tmp_path):
    boot, slots = device
    specs = {s: SlotSpec("file", p) for s, p in slots.items()}
    with pytest.raises(SlotError, match="booted slot"):
        check_target("a", specs, "a", 10)
    with pytest.raises(SlotError, match="larger than slot b"):
        check_target("b", specs, "a", (8 << 20) + 1)
    alias = dict(specs, b=SlotSpec("file", slots["a"]))
    with pytest.raises(SlotError, match="same device as the booted slot"):
        check_target("b", alias, "a", 10)
    with pytest.raises(SlotError, match="not found"):
        check_target("b", dict(specs, b=SlotSpec("file", str(tmp_path / "missing"))), "a", 10)
    assert check_target("b", specs, "a", 8 << 20) == os.path.realpath(slots["b"])


def test_mounted_block_device_is_refused(tmp_path):
    # a real loop device and a real mount need root and a loop driver; skip with the reason otherwise
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop device")
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    if subprocess.run(["mkfs.ext4", "-q", str(img)], capture_output=True).returncode != 0:
        pytest.skip("mkfs.ext4 not available")
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop devices here: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        if subprocess.run(["mount", dev, str(mnt)], capture_output=True).returncode != 0:
            pytest.skip("mount is not permitted here")
        try:
            with pytest.raises(SlotError, match="is mounted"):
                check_target("b", {"a": SlotSpec("file", str(img)), "b": SlotSpec("device", dev)}, "a", 10)
        finally:
            subprocess.run(["umount", str(mnt)])
    finally:
        subprocess.run(["losetup", "-d", dev])


POWER_CUT_CHILD = r"""
import asyncio, json, sys, aiohttp
from agent.boot.sim import SimBoot
from agent.install import Installer
from agent.boot.worker import BootWorker
from agent.omaha.outcome import PackageOffer
env, slot_b, url, size, sha = sys.argv[1:6]
pkg = PackageOffer("v2.img", (url,), int(size), bytes.fromhex(sha), None)
async def main():
    async with aiohttp.ClientSession() as s:
        await Installer(s, chunk=1 << 18, checkpoint_every=1 << 20).install(
            BootWorker(SimBoot(env)), "b", slot_b, 8 << 20, pkg, "2.0.0", 3)
    print("DONE", flush=True)
asyncio.run(main())
"""


async def test_power_cut_at_random_offsets_never_leaves_a_partial_trial(device, payload, tmp_path):
    boot, slots = device
    path, data = payload
    server = await with_server([Image(path, "2.0.0", APP)], Faults(drip_delay=0.002))
    sha = hashlib.sha256(data).hexdigest()
    rng = random.Random(7)
    outcomes = []
    try:
        url = f"{server.base}/packages/v2.img"
        for _ in range(6):
            boot.mark_bad("b")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", POWER_CUT_CHILD, boot.path, slots["b"], url, str(len(data)), sha,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
            await asyncio.sleep(rng.uniform(0.05, 1.5))
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            state = boot.status()["b"]
            complete = slot_holds(slots["b"], data)
            outcomes.append((state.state, complete))
            # never a trial slot with partial content
            assert state.state is SlotState.BAD or (state.state is SlotState.TRIAL and complete), (out, err)
    finally:
        await server.stop()
    assert any(s is SlotState.BAD for s, _ in outcomes)


# ------------------------------------------------------------------ the direct body reader (http.DirectBody)
class RawServer:
    """A file server on 127.0.0.1 that writes exact bytes: each GET is answered by ``behave(writer, start, n)``
    after a status line and headers this class writes (206 for a Range, Content-Length as the server chooses)."""

    def __init__(self, data: bytes, behave, declared=None):
        self.data, self.behave, self.declared = data, behave, declared
        self.starts: list[int] = []

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v2.img"
        return self

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            start = 0
            for line in head.decode().split("\r\n"):
                if line.lower().startswith("range: bytes="):
                    start = int(line.split("=", 1)[1].split("-")[0])
            self.starts.append(start)
            rest = len(self.data) - start
            length = self.declared(start, rest) if self.declared else rest
            status = "206 Partial Content" if start else "200 OK"
            extra = f"Content-Range: bytes {start}-{len(self.data) - 1}/{len(self.data)}\r\n" if start else ""
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {length}\r\n{extra}"
                         "Content-Type: application/octet-stream\r\n\r\n".encode())
            await self.behave(writer, start, len(self.starts))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def direct_install(device, server, data, read_timeout=5.0, taken=None, monkeypatch=None):
    from agent import http as agent_http
    from agent.omaha.outcome import PackageOffer
    boot, slots = device
    if monkeypatch is not None:  # count the bodies the direct reader took over
        real = agent_http.DirectBody.take

        def take(resp, timeout):
            head, body = real(resp, timeout)
            taken.append(body is not None)
            return head, body
        monkeypatch.setattr(agent_http.DirectBody, "take", staticmethod(take))
    pkg = PackageOffer("v2.img", (server.url,), len(data), hashlib.sha256(data).digest(), None)
    async with aiohttp.ClientSession() as session:
        inst = Installer(session, chunk=256 << 10, checkpoint_every=1 << 20, read_timeout=read_timeout)
        return await inst.install(BootWorker(boot), "b", slots["b"], 8 << 20, pkg, "2.0.0", 3)


async def test_direct_reads_of_any_size_fill_the_ring_exactly(device, monkeypatch):
    # pieces of 1 byte to 300 KiB with pauses: every read lands where the last one stopped, across chunk borders
    data = os.urandom((5 << 20) + 12345)

    async def pieces(writer, start, _):
        rng, at = random.Random(7), start
        while at < len(data):
            n = rng.choice([1, 7, 4096, 65537, 300_000])
            writer.write(data[at:at + n])
            await writer.drain()
            at += n
            if rng.random() < 0.05:
                await asyncio.sleep(0.01)
    server = await RawServer(data, pieces).start()
    taken = []
    try:
        result = await direct_install(device, server, data, taken=taken, monkeypatch=monkeypatch)
    finally:
        await server.stop()
    assert taken == [True] and result.received == len(data) and slot_holds(device[1]["b"], data)


async def test_direct_read_cut_mid_body_resumes_from_what_arrived(device, monkeypatch):
    data = os.urandom(3 << 20)

    async def cut_once(writer, start, request):
        end = len(data) if request > 1 else 1_000_003  # the first answer ends mid-chunk
        writer.write(data[start:end])
        await writer.drain()
    server = await RawServer(data, cut_once).start()
    taken = []
    try:
        await direct_install(device, server, data, taken=taken, monkeypatch=monkeypatch)
    finally:
        await server.stop()
    assert taken == [True, True] and server.starts[0] == 0 and 0 < server.starts[1] <= 1_000_003
    assert slot_holds(device[1]["b"], data) and device[0].status()["b"].state is SlotState.TRIAL


async def test_direct_read_stops_at_the_declared_length(device, monkeypatch):
    # bytes after the declared body are not the payload's: never read onto the slot, and the install verifies
    data = os.urandom((2 << 20) + 5)

    async def too_much(writer, start, _):
        writer.write(data[start:] + os.urandom(1 << 20))
        await writer.drain()
    server = await RawServer(data, too_much).start()
    taken = []
    try:
        result = await direct_install(device, server, data, taken=taken, monkeypatch=monkeypatch)
    finally:
        await server.stop()
    assert taken == [True] and result.received == len(data) and slot_holds(device[1]["b"], data)
    with open(device[1]["b"], "rb") as f:
        f.seek(len(data))
        assert f.read(1 << 20) == bytes(1 << 20)  # nothing written past the payload


async def test_a_body_declared_longer_than_the_payload_is_refused(device, monkeypatch):
    # not the expected body: read the ordinary way, and its extra bytes refused as before
    data = os.urandom(1 << 20)

    async def longer(writer, start, _):
        writer.write(data[start:] + os.urandom(4096))
        await writer.drain()
    server = await RawServer(data, longer, declared=lambda start, rest: rest + 4096).start()
    taken = []
    try:
        with pytest.raises(InstallError) as err:
            await direct_install(device, server, data, taken=taken, monkeypatch=monkeypatch)
    finally:
        await server.stop()
    assert taken == [] and err.value.kind == "size" and "more than the promised" in str(err.value)
    assert device[0].status()["b"].state is SlotState.BAD


async def test_direct_read_stall_times_out_and_resumes(device, monkeypatch):
    data = os.urandom(2 << 20)

    async def stall_once(writer, start, request):
        if request == 1:
            writer.write(data[:700_000])
            await writer.drain()
            await asyncio.sleep(30)  # holds the connection open, sends nothing
        writer.write(data[start:])
        await writer.drain()
    server = await RawServer(data, stall_once).start()
    taken = []
    try:
        started = asyncio.get_running_loop().time()
        await direct_install(device, server, data, read_timeout=0.5, taken=taken, monkeypatch=monkeypatch)
        took = asyncio.get_running_loop().time() - started
    finally:
        await server.stop()
    assert taken == [True, True] and server.starts[1] > 0 and took < 10
    assert slot_holds(device[1]["b"], data)


async def test_direct_read_that_is_cancelled_keeps_a_true_checkpoint(device):
    # a cancel in the middle of a read: the checkpoint covers only bytes that are on the slot
    from agent.omaha.outcome import PackageOffer
    boot, slots = device
    data = os.urandom(4 << 20)
    gate = asyncio.Event()

    async def slow(writer, start, _):
        writer.write(data[:(1 << 20) + 100])
        await writer.drain()
        gate.set()
        await asyncio.sleep(30)
    server = await RawServer(data, slow).start()
    saved = []
    pkg = PackageOffer("v2.img", (server.url,), len(data), hashlib.sha256(data).digest(), None)
    try:
        async with aiohttp.ClientSession() as session:
            inst = Installer(session, chunk=256 << 10, checkpoint_every=1 << 20, on_checkpoint=saved.append)
            task = asyncio.create_task(inst.install(BootWorker(boot), "b", slots["b"], 8 << 20, pkg, "2.0.0", 3))
            await gate.wait()
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await server.stop()
    assert saved and 0 < saved[-1].received <= (1 << 20) + 100
    with open(slots["b"], "rb") as f:
        assert f.read(saved[-1].received) == data[:saved[-1].received]


async def test_direct_read_while_the_ring_is_full_keeps_every_byte_in_order(device, monkeypatch):
    # a slow slot: the reader waits for a free buffer again and again; what the transport delivers in between
    # (spilled, then handed over first) and the pauses must keep the bytes in order
    from agent.payload import SlotWriter
    data = os.urandom((4 << 20) + 777)
    real = SlotWriter.write_plain

    def slow(self, view, offset, aligned=False):
        import time
        time.sleep(0.03)
        return real(self, view, offset, aligned)
    monkeypatch.setattr(SlotWriter, "write_plain", slow)

    async def fast(writer, start, _):
        for at in range(start, len(data), 100_000):
            writer.write(data[at:at + 100_000])
        await writer.drain()
    server = await RawServer(data, fast).start()
    taken = []
    try:
        result = await direct_install(device, server, data, taken=taken, monkeypatch=monkeypatch)
    finally:
        await server.stop()
    assert taken == [True] and result.received == len(data) and slot_holds(device[1]["b"], data)


def test_booted_slot_is_read_from_the_kernel_command_line_and_the_source_is_named(tmp_path, caplog):
    from agent.slots import detect_booted, detect_booted_from
    specs = {"a": SlotSpec("partlabel", "ROOT-A"), "b": SlotSpec("partlabel", "ROOT-B")}
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz root=PARTLABEL=ROOT-A ro omaha_agent.slot=B\n")
    assert detect_booted_from(specs, str(cmdline)) == ("b", "the kernel command line (omaha_agent.slot=B)")
    cmdline.write_text("root=PARTLABEL=ROOT-A ro\n")
    assert detect_booted_from(specs, str(cmdline)) == ("a", "the kernel command line (root=PARTLABEL=ROOT-A)")
    with caplog.at_level("INFO", logger="omaha-agent"):
        assert detect_booted(specs, str(cmdline)) == "a"
    assert "booted slot a, read from the kernel command line (root=PARTLABEL=ROOT-A)" in caplog.text


def test_booted_slot_unknown_when_the_cmdline_is_hidden_and_no_slot_holds_the_root_says_both(tmp_path, caplog):
    from agent.slots import detect_booted, detect_booted_from
    specs = {"a": SlotSpec("file", str(tmp_path / "a.img")), "b": SlotSpec("file", str(tmp_path / "b.img"))}
    hidden = str(tmp_path / "no-cmdline")  # as under ProcSubset=pid
    assert detect_booted_from(specs, hidden) == (
        None, f"neither {hidden} (it is unreadable) nor the root filesystem's device")
    with caplog.at_level("WARNING", logger="omaha-agent"):
        assert detect_booted(specs, hidden) is None
    assert "cannot tell the booted slot" in caplog.text


async def test_devserver_records_each_payload_stream_and_holds_the_last_piece_when_asked(tmp_path):
    import time

    import aiohttp

    from agent.tools.devserver import DevServer, Faults, Image
    path = tmp_path / "p.img"
    path.write_bytes(os.urandom(320 << 10))  # five 64 KiB pieces
    srv = DevServer([Image(str(path), "2.0.0", "{0a0b0c0d-1111-4222-8333-444455556666}")], faults=Faults(hold_last=0.6))
    await srv.start()
    try:
        url = f"{srv.url.rsplit('/', 3)[0]}/packages/p.img"
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.get(url) as resp:
                first = await resp.content.readexactly(256 << 10)
                assert srv.streams == [{"start": 0, "sent_to": 256 << 10, "done": False}]
                body = first + await resp.read()
            took = time.monotonic() - started
            async with session.get(url, headers={"Range": f"bytes={100 << 10}-"}) as resp:
                await resp.read()
    finally:
        await srv.stop()
    assert body == path.read_bytes() and took >= 0.6
    assert srv.streams == [{"start": 0, "sent_to": 320 << 10, "done": True},
                           {"start": 100 << 10, "sent_to": 320 << 10, "done": True}]


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "zstd"])
async def test_a_failed_slot_write_fails_the_install_in_one_line_and_leaves_no_unretrieved_future(
        device, payload, caplog, tmp_path, packed):
    """A write that fails (EIO from the slot's device; a failing block device is not made here, so the write is
    replaced) ends the install at once with a one-line device error naming the slot, for a plain payload and for
    one the agent decompresses onto the slot (no other URL is tried: it was said as a download failure from every
    URL, or as a corrupt zstd payload, before). The ring's chunks run as the thread pools' own futures, wrapped
    for the loop only while it waits: no loop-side copy of the failure is left for the garbage collector to log
    as "Future exception was never retrieved" with a traceback."""
    import errno
    import gc
    import time as _time
    from agent.payload import SlotWriter
    name = "write_plain" if not packed else "_write_out"
    real_write = getattr(SlotWriter, name)
    writes = []

    def failing_write(self, data, *args, **kwargs):
        writes.append(args[0] if args else self.written)
        if len(writes) >= 3:  # from the third write on, every write fails, whatever the installer tries next
            _time.sleep(0.05)  # the loop is waiting for this chunk when it fails
            raise OSError(errno.EIO, "Input/output error")
        return real_write(self, data, *args, **kwargs)

    boot, slots = device
    path, data = payload
    if packed:
        path = str(tmp_path / "v2.img.zst")
        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(data))
    server = await with_server([Image(path, "2.0.0", APP)])
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(SlotWriter, name, failing_write)
            with pytest.raises(InstallError) as failed:
                await run_install(server, boot, slots)
    finally:
        await server.stop()
    assert failed.value.kind == "device", failed.value  # the slot failed, not the network: not retried elsewhere
    assert str(failed.value) == f"writing slot {slots['b']}: Input/output error"
    assert 0 not in writes[1:], writes  # no second try from byte 0
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.01)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text
    assert boot.status()["b"].state is not SlotState.TRIAL


async def test_a_chunk_that_finishes_between_two_looks_is_waited_for_without_an_internal_error(tmp_path):
    """The ring's chunks are the thread pools' own futures, whose state changes in their threads: one seen running
    can be done a moment later. (CI met it in QEMU: 'internal error: ValueError: Set of Tasks/Futures is empty'.)
    The pools here run each job at once but report it done only after it was first seen running, which forces
    that interleaving on every chunk; real threads hit it by chance only."""
    import concurrent.futures
    import mmap
    from agent.install import _Pipeline
    from agent.payload import SlotWriter

    class SeenRunningThenDone(concurrent.futures.Future):
        def __init__(self, result):
            super().__init__()
            self.outcome = result

        def done(self):
            if super().done():
                return True
            self.set_result(self.outcome)  # it finished just after this look
            return False

    class Pool:
        def submit(self, fn, *args):
            return SeenRunningThenDone(fn(*args))

    image = os.urandom(5 * (64 << 10) + 1000)
    for packed in (False, True):  # a plain chunk has two jobs (hash, write), a compressed one a single one
        data = zstandard.ZstdCompressor().compress(image) if packed else image
        slot = tmp_path / f"slot-{packed}"
        slot.write_bytes(bytes(len(image)))
        writer = SlotWriter(str(slot), len(image), hashlib.sha256(data).digest(), None, decompress=packed)
        writer.open()
        pipe = _Pipeline(writer, [mmap.mmap(-1, 64 << 10) for _ in range(3)], (Pool(), Pool(), Pool()), 0)
        for at in range(0, len(data), 40_000):
            await pipe.put(data[at:at + 40_000])
        await pipe.finish()
        writer.verify(len(data))
        assert slot.read_bytes() == image
