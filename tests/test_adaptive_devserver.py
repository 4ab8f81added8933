"""The development server publishing an adaptive release: the chunk files beside the payload, byte ranges answered
as nginx answers them (checked against a real nginx on 127.0.0.1), and the faults the device tests need."""
import hashlib
import os
import re

import aiohttp
import pytest

from agent import trust
from agent.tools.devserver import DevServer, Faults, adaptive_image

from .test_adaptive_cut import image_bytes, write
from .test_trust import openssl_key

pytest.importorskip("pyfastcdc")
APP = "{e3b0c442-98fc-1c14-9afb-f4c8996fb924}"


@pytest.fixture
async def published(tmp_path):
    """(server, image bytes, index path, data path, public key): a signed adaptive release on the devserver."""
    data = image_bytes(2 << 20, seed=21)
    private, public = openssl_key(tmp_path, "ed25519", "rel")
    img = adaptive_image(write(tmp_path / "rootfs.ext4", data), "2.0.0", APP)
    srv = DevServer([img], sign_key=private)
    await srv.start()
    yield srv, data, img.chunk_index, img.path, public
    await srv.stop()


async def get(url: str, rng: str | None = None):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Range": rng} if rng else {}) as r:
            return r.status, r.headers, await r.read()


def parts(body: bytes, ctype: str) -> list[tuple[str, bytes]]:
    """(Content-Range, data) of each part of a multipart/byteranges body, read by the RFC's layout."""
    boundary = re.search(r"boundary=(\S+)", ctype).group(1).encode()
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    out = []
    for chunk in body.split(b"\r\n--" + boundary)[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().strip().splitlines())
        out.append((fields["Content-Range"], data))
    return out


async def test_the_release_is_signed_with_its_chunk_files_and_serves_them_beside_the_payload(published):
    srv, data, cidx, czst, public = published
    base = srv.base + "/packages/"
    status, _, envelope = await get(base + "rootfs.ext4.czst.sig")
    rel = trust.open_envelope(envelope, trust.load_public_keys([public]))
    assert rel.name == "rootfs.ext4.czst" and rel.image.size == len(data)
    assert (rel.chunks.index.name, rel.chunks.data.name) == ("rootfs.ext4.cidx", "rootfs.ext4.czst")
    for ref, path in ((rel.chunks.index, cidx), (rel.chunks.data, czst)):
        status, headers, body = await get(base + ref.name)
        assert status == 200 and body == open(path, "rb").read() and len(body) == ref.size
    assert (await get(base + "rootfs.ext4.nope"))[0] == 404


async def test_one_range_is_a_plain_206_and_several_are_multipart_byteranges_in_the_order_asked(published):
    srv, _, _, czst, _ = published
    blob = open(czst, "rb").read()
    url = srv.base + "/packages/rootfs.ext4.czst"
    status, headers, body = await get(url, "bytes=100-199")
    assert status == 206 and body == blob[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(blob)}"
    status, headers, body = await get(url, "bytes=5000-5099,10-19,-7")
    assert status == 206 and int(headers["Content-Length"]) == len(body)
    assert headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    assert parts(body, headers["Content-Type"]) == [
        (f"bytes 5000-5099/{len(blob)}", blob[5000:5100]), (f"bytes 10-19/{len(blob)}", blob[10:20]),
        (f"bytes {len(blob) - 7}-{len(blob) - 1}/{len(blob)}", blob[-7:])]
    assert [f["ranges"] for f in srv.fetches[-2:]] == [[[100, 199]], [[5000, 5099], [10, 19],
                                                                       [len(blob) - 7, len(blob) - 1]]]


async def test_out_of_file_malformed_and_oversized_range_sets_get_nginx_answers(published):
    srv, _, cidx, _, _ = published
    raw = open(cidx, "rb").read()
    url = srv.base + "/packages/rootfs.ext4.cidx"
    status, headers, _ = await get(url, f"bytes={len(raw)}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(raw)}"
    assert (await get(url, "bytes=x-1"))[0] == 416
    assert (await get(url, "bytes=0-10,3-"))[:3:2] == (200, raw)  # overlapping ranges adding up past the file
    assert (await get(url, "items=0-10"))[:3:2] == (200, raw)
    status, headers, body = await get(url, f"bytes=5-3,0-9,{len(raw) + 5}-")  # only one range in the file
    assert status == 206 and body == raw[:10] and "multipart" not in headers["Content-Type"]


async def test_the_fault_switches_ignore_ranges_refuse_multi_range_and_cut_a_body(published):
    srv, _, _, czst, _ = published
    blob = open(czst, "rb").read()
    url = srv.base + "/packages/rootfs.ext4.czst"
    srv.faults = Faults(ignore_range=True)
    assert (await get(url, "bytes=0-9"))[:3:2] == (200, blob)
    srv.faults = Faults(multi_range="whole")  # nginx with max_ranges 1
    assert (await get(url, "bytes=0-9,20-29"))[:3:2] == (200, blob)
    assert (await get(url, "bytes=0-9"))[:3:2] == (206, blob[:10])
    srv.faults = Faults(multi_range="first")
    status, headers, body = await get(url, "bytes=20-29,0-9")
    assert (status, body, headers["Content-Range"]) == (206, blob[20:30], f"bytes 20-29/{len(blob)}")
    srv.faults = Faults(reset_after=70000, resets=1)
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(url, "bytes=0-99999,200000-299999")
    assert srv.fetches[-1]["sent"] == 70000 and srv.faults.resets == 0
    status, headers, body = await get(url, "bytes=0-99999,200000-299999")  # the cut was once
    assert status == 206 and [d for _, d in parts(body, headers["Content-Type"])] == [blob[:100000],
                                                                                     blob[200000:300000]]


async def test_a_multi_range_answer_is_the_one_nginx_gives_byte_for_byte(tmp_path, published):
    from .bench import Nginx
    srv, _, _, czst, _ = published
    try:
        nginx = Nginx(os.path.dirname(czst), str(tmp_path))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        cases = [(name, rng) for name in ("rootfs.ext4.czst", "rootfs.ext4.cidx")
                 for rng in ("bytes=0-0,7-1000,-300", "bytes=1-2,1-2", "bytes=99999999-", "bytes=0-9,5-",
                             "bytes=a-b", "bytes=-100", "bytes=4000-", None)]
        for name, rng in cases:
            if name.endswith(".czst") and rng and re.fullmatch(r"bytes=\d+-", rng):
                continue  # the payload's resumable download path, not the range server
            ours = await get(srv.base + "/packages/" + name, rng)
            theirs = await get(nginx.base + name, rng)
            assert ours[0] == theirs[0], rng
            # (a 416's body is nginx's HTML page: only its status and Content-Range are compared)
            for h in ("Content-Range", "Content-Length", "Accept-Ranges") if ours[0] != 416 else ("Content-Range",):
                assert ours[1].get(h) == theirs[1].get(h), (rng, h)
            norm = lambda resp: re.sub(rb"\r\n--\d{20}", b"\r\n--B", resp[2]) if resp[0] == 206 else b""  # noqa
            assert norm(ours) == norm(theirs), rng
            if ours[0] != 416:
                assert re.sub(r"\d{20}", "B", ours[1]["Content-Type"]) == re.sub(r"\d{20}", "B",
                                                                                 theirs[1]["Content-Type"])
    finally:
        nginx.close()


def test_a_release_whose_chunk_files_are_missing_is_refused_at_start_naming_the_file(tmp_path):
    from agent.tools.devserver import Image
    payload = write(tmp_path / "rootfs.ext4.czst", b"\x28\xb5\x2f\xfd" + bytes(20))
    with pytest.raises(FileNotFoundError, match=r"chunk file .*rootfs.ext4.cidx not found"):
        Image(payload, "2.0.0", APP, chunk_index=str(tmp_path / "rootfs.ext4.cidx"))


async def test_the_devserver_command_publishes_an_adaptive_release(tmp_path):
    import asyncio
    import sys
    data = image_bytes(1 << 20, seed=22)
    img = adaptive_image(write(tmp_path / "rootfs.ext4", data), "2.0.0", APP)
    private, public = openssl_key(tmp_path, "p256", "rel")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "devserver", "--payload", img.path, "--chunks", img.chunk_index,
        "--version", "2.0.0", "--appid", APP, "--port", "0", "--sign-key", private,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(3)]
        base = re.search(r"update URL (http://127\.0\.0\.1:\d+)/", lines[1]).group(1) + "/packages/"
        assert "an adaptive release: rootfs.ext4.cidx" in lines[2]
        rel = trust.open_envelope((await get(base + "rootfs.ext4.czst.sig"))[2], trust.load_public_keys([public]))
        assert rel.chunks.index.sha256 == hashlib.sha256(open(img.chunk_index, "rb").read()).hexdigest()
        status, headers, body = await get(base + "rootfs.ext4.cidx", "bytes=0-7,76-116")
        assert status == 206 and [d for _, d in parts(body, headers["Content-Type"])] == [
            open(img.chunk_index, "rb").read()[a:b] for a, b in ((0, 8), (76, 117))]
    finally:
        proc.terminate()
        await proc.wait()
