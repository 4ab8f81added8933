"""The agent's HTTP session under the aiohttp the device images run: Debian 12's python3-aiohttp (3.8.4), with the
system's python3, in a child process (the test runner's own aiohttp is a newer one from PyPI).

aiohttp before 3.11.11 pools a connection with its reading paused when its answer ended while the reader was
behind (the whole rest of the body buffered, above the high-water mark); the next request handed that connection
waits for an answer nobody reads until its timeout. An adaptive install meets exactly that: the fetch of a drifted
chunk is made while the range answer before it waits, complete, in its buffer. ``agent.http.make_session``
resumes such a connection when it hands it out."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"

CHILD = r'''
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
import aiohttp
from aiohttp import web
from agent.http import make_session

BODY = b"x" * (300 << 10)  # more than the high-water mark (128 KiB), less than one socket read (256 KiB) beyond it


async def handler(request):
    return web.Response(body=BODY)


async def attempt(session, url):
    """The first answer is left behind while its body arrives; then a second request on the same session."""
    resp = await session.get(url)
    proto = resp.connection.protocol
    await resp.content.readany()
    for _ in range(50):  # until the body has arrived and the connection went back to the pool (at most 5 s)
        if resp.connection is None and resp.content.is_eof():
            break
        await asyncio.sleep(0.1)
    pooled_paused = resp.connection is None and proto._reading_paused
    started = time.monotonic()
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as second:
            answered = len(await second.read()) == len(BODY)
    except asyncio.TimeoutError:
        answered = False
    took = time.monotonic() - started
    while await resp.content.readany():
        pass
    return {"pooled_paused": pooled_paused, "answered": answered, "seconds": round(took, 2)}


async def main():
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"
    out = {"version": aiohttp.__version__}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as plain:
            out["plain"] = await attempt(plain, url)
        async with make_session(timeout=5) as agents:
            out["agent"] = await attempt(agents, url)
    finally:
        await runner.cleanup()
    print(json.dumps(out))

asyncio.run(main())
'''


def debian_aiohttp() -> str:
    """The version of Debian's python3-aiohttp the system's python3 imports (the test skips without it)."""
    if not os.path.exists(SYSTEM_PYTHON) or shutil.which("dpkg") is None:
        pytest.skip("no Debian system python3 (the device's aiohttp is Debian's)")
    for package in ("python3-aiohttp", "python3-defusedxml"):
        if subprocess.run(["dpkg", "-s", package], capture_output=True).returncode != 0:
            pytest.skip(f"{package} is not installed (make test installs it as root)")
    done = subprocess.run([SYSTEM_PYTHON, "-c", "import aiohttp; print(aiohttp.__version__)"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_agents_session_answers_on_a_connection_debians_aiohttp_pooled_paused(tmp_path):
    version = debian_aiohttp()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run([SYSTEM_PYTHON, "-I", str(script), ROOT], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    import json
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"Debian's aiohttp {version}: a plain session {out['plain']}, the agent's {out['agent']}")
    if not out["plain"]["pooled_paused"]:
        pytest.skip(f"aiohttp {version} does not pool a paused connection (fixed upstream in 3.11.11)")
    assert not out["plain"]["answered"], out  # the fault is there: a plain session's next request hangs ...
    assert out["agent"]["pooled_paused"], out  # ... the agent's session meets the same paused connection ...
    assert out["agent"]["answered"], out  # ... and gets its answer
