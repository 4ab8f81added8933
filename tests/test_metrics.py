"""Metrics: the Prometheus exposition of a real update (sim backend, the development server on 127.0.0.1),
parsed with prometheus_client's text parser; the textfile's atomic replacement; the Unix socket under clients
that never read; the configuration keys."""
import asyncio
import os
import shutil
import stat
import tempfile
import threading

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.atomic import write_atomic
from agent.config import ConfigError, load, parse
from agent.daemon import Agent
from agent.exporter import SocketServer
from agent.machine import Check, Operation
from agent.metrics import Tally, render
from agent.omaha.events import ErrorCategory, ErrorCode
from agent import policy
from agent.text import clean

from .simdevice import Device

PAYLOAD = 3 << 20  # the conftest server's image of 2.0.0


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} of an exposition, as prometheus_client parses it."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict, name: str, **labels) -> float:
    return parsed[(name, frozenset(labels.items()))]


@pytest.fixture
def short_dir():
    """A directory with a short path: a Unix socket's path has at most 107 bytes (pytest's tmp_path can be longer)."""
    path = tempfile.mkdtemp(prefix="om-metrics-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def job_ended(agent, outcome_of, operation: str):
    """Awaits the job of a command's reply, then (bounded) until the owner has set the operation it ended in."""
    outcome = await outcome_of
    for _ in range(600):
        if agent.status.operation.value == operation:
            break
        await asyncio.sleep(0.05)
    assert agent.status.operation.value == operation
    return outcome


async def read_socket(path: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


async def test_an_installed_update_is_exported_on_the_socket_and_in_the_textfile(tmp_path, server, short_dir):
    sock, textfile = os.path.join(short_dir, "metrics"), str(tmp_path / "omaha_agent.prom")
    dev = Device(tmp_path, server.url, extra=f"metrics: {{textfile: {textfile}, socket: {sock}}}\n")
    agent = Agent(load(dev.config))
    try:
        await agent.start(once=True)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660  # readable (connectable) by the group, not by others
        before = samples((await read_socket(sock)).decode())
        assert value(before, "omaha_agent_operation", operation="idle") == 1
        assert value(before, "omaha_agent_download_bytes_total") == 0
        reply = await agent.submit(Check(interactive=True))
        outcome = await job_ended(agent, reply.job, "updated-need-reboot")
        assert outcome.ok, outcome.message
        after = samples((await read_socket(sock)).decode())
    finally:
        await agent.close()
    assert not os.path.exists(sock)  # the socket goes with the daemon
    for parsed in (after, samples(open(textfile).read())):  # the textfile written at stop says the same
        assert value(parsed, "omaha_agent_download_bytes_total") == PAYLOAD
        assert value(parsed, "omaha_agent_updates_total", result="installed") == 1
        assert value(parsed, "omaha_agent_updates_total", result="failed") == 0
        assert value(parsed, "omaha_agent_operation", operation="updated-need-reboot") == 1
        assert sum(value(parsed, "omaha_agent_operation", operation=op.value) for op in Operation) == 1
        assert value(parsed, "omaha_agent_info", version="1.0.0", slot="a", backend="sim") == 1
        assert value(parsed, "omaha_agent_reused_bytes_total") == 0
        assert value(parsed, "omaha_agent_download_seconds_total") > 0
        assert value(parsed, "omaha_agent_last_check_timestamp_seconds") == dev.state()["last_check"]
        assert value(parsed, "omaha_agent_pending_events") == len(dev.state()["events"]) == 0
        assert all(value(parsed, "omaha_agent_failures_total", stage=s) == 0 for s in ("check", "download", "verify"))
    assert stat.S_IMODE(os.stat(textfile).st_mode) == 0o644  # node exporter runs as its own user
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []  # no temporary file left behind


async def test_a_failed_check_counts_a_check_failure(tmp_path):
    textfile = str(tmp_path / "omaha_agent.prom")
    dev = Device(tmp_path, "http://127.0.0.1:9/v1/update/", extra=f"metrics: {{textfile: {textfile}}}\n")
    agent = Agent(load(dev.config))
    try:
        await agent.start(once=True)
        outcome = await job_ended(agent, (await agent.submit(Check(interactive=True))).job, "idle")
        assert not outcome.ok
    finally:
        await agent.close()
    parsed = samples(open(textfile).read())
    assert value(parsed, "omaha_agent_failures_total", stage="check") == 1
    assert value(parsed, "omaha_agent_updates_total", result="failed") == 0  # no update was offered
    assert value(parsed, "omaha_agent_operation", operation="idle") == 1


async def test_a_burst_of_status_changes_writes_the_textfile_once(tmp_path):
    textfile = str(tmp_path / "omaha_agent.prom")
    dev = Device(tmp_path, "http://127.0.0.1:9/v1/update/", extra=f"metrics: {{textfile: {textfile}}}\n")
    agent = Agent(load(dev.config))
    try:
        await agent.start(once=True)
        exporter = agent.exporter
        for _ in range(200):  # the start-up write (and the one its status changes asked for)
            if exporter._writer is None or exporter._writer.done():
                break
            await asyncio.sleep(0.05)
        before = exporter.writes
        agent.ctx.state.last_check = 1234
        for _ in range(1000):  # as a download's progress does, once per chunk
            agent.status.notify()
        for _ in range(200):
            if exporter._writer.done():
                break
            await asyncio.sleep(0.05)
        assert exporter.writes == before + 1
        assert value(samples(open(textfile).read()), "omaha_agent_last_check_timestamp_seconds") == 1234
    finally:
        await agent.close()


async def test_a_textfile_that_cannot_be_written_is_said_once_and_the_agent_goes_on(tmp_path, caplog):
    textfile = str(tmp_path / "missing-dir" / "omaha_agent.prom")
    dev = Device(tmp_path, "http://127.0.0.1:9/v1/update/", extra=f"metrics: {{textfile: {textfile}}}\n")
    agent = Agent(load(dev.config))
    try:
        await agent.start(once=True)
        # several status changes, each a write
        outcome = await job_ended(agent, (await agent.submit(Check(interactive=True))).job, "idle")
        assert not outcome.ok and "127.0.0.1:9" in outcome.message
    finally:
        await agent.close()
    said = [r.getMessage() for r in caplog.records if "cannot write the metrics" in r.getMessage()]
    assert len(said) == 1 and "No such file or directory" in said[0], said
    assert agent.exporter.writes == 0


def test_textfile_is_replaced_atomically_never_seen_half_written(tmp_path):
    path = str(tmp_path / "omaha_agent.prom")
    tally = Tally()
    short = render({"operation": "idle", "current_version": "1.0.0"}, tally, "sim", 0).encode()
    long = render({"operation": "downloading", "current_version": "1.0.0-" + "x" * 190, "pending_events": 3},
                  tally, "sim", 0).encode()
    write_atomic(path, short)
    seen, done, bad = [0], threading.Event(), []

    def reader():
        while not done.is_set() and seen[0] < 20000:
            with open(path, "rb") as f:
                data = f.read()
            seen[0] += 1
            if data not in (short, long):
                bad.append(data)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            write_atomic(path, long if i % 2 == 0 else short)
    finally:
        done.set()
        thread.join(60)
    print(f"textfile: {seen[0]} reads during 300 rewrites, {len(bad)} partial")
    assert seen[0] > 0 and bad == []
    assert [f for f in os.listdir(tmp_path) if f != "omaha_agent.prom"] == []  # no temporary file left
    assert len(list(text_string_to_metric_families(long.decode()))) == 9


async def test_clients_that_never_read_cost_only_their_connections(short_dir):
    path = os.path.join(short_dir, "metrics")
    big = b"# a large answer\n" * (1 << 19)  # 8.5 MiB: more than the socket buffers hold
    server = SocketServer(path, lambda: big, max_clients=4, timeout=1.0)
    await server.start()
    try:
        stalled = [await asyncio.open_unix_connection(path) for _ in range(4)]  # connect, never read
        for _ in range(200):
            if server.clients == 4:
                break
            await asyncio.sleep(0.01)
        assert server.clients == 4
        reader, writer = await asyncio.open_unix_connection(path)  # over the cap: closed at once, nothing sent
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        ticks = 0  # the loop runs while the stalled answers wait for their timeout
        while server.clients and ticks < 3000:
            await asyncio.sleep(0.01)
            ticks += 1
        assert server.clients == 0  # every stalled client was cut off
        for _, w in stalled:
            w.close()
        assert await read_socket(path) == big  # a client that reads gets everything
    finally:
        await server.close()
    assert not os.path.exists(path)


async def test_socket_replaces_a_stale_socket_but_never_a_file(short_dir):
    path = os.path.join(short_dir, "metrics")
    first = SocketServer(path, lambda: b"one\n")
    await first.start()
    first.server.close()  # a daemon that died: its socket file stays
    second = SocketServer(path, lambda: b"two\n")
    await second.start()
    try:
        assert await read_socket(path) == b"two\n"
    finally:
        await second.close()
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(OSError):
        await SocketServer(path, lambda: b"").start()
    assert open(path).read() == "not a socket"


def test_update_outcomes_and_failure_stages_follow_the_events():
    tally = Tally()
    tally.event(policy.applied("1.0.0", "2.0.0"))
    tally.event(policy.updated_and_rebooted("1.0.0", "2.0.0"))
    tally.event(policy.failed(ErrorCode.HEALTH_CHECK_FAILED, ErrorCategory.INSTALL, "1.0.0", "2.0.0"))
    tally.event(policy.failed(ErrorCode.BOOTLOADER_FALLBACK, ErrorCategory.INSTALL, "1.0.0", "2.0.0"))
    tally.event(policy.failed(ErrorCode.PAYLOAD_HASH_MISMATCH, ErrorCategory.DOWNLOAD, "1.0.0", "2.0.0"))
    tally.event(policy.download_started("1.0.0", "2.0.0", 10))  # not an outcome
    parsed = samples(render({"operation": "idle"}, tally, "sim", 0))
    assert {r: value(parsed, "omaha_agent_updates_total", result=r) for r in tally.updates} == {
        "installed": 1, "failed": 1, "rolled_back": 2, "confirmed": 1}
    assert value(parsed, "omaha_agent_failures_total", stage="health") == 1
    assert value(parsed, "omaha_agent_failures_total", stage="trial_boot") == 1
    assert value(parsed, "omaha_agent_failures_total", stage="verify") == 1


def test_download_seconds_count_the_time_spent_downloading():
    tally = Tally()
    for op, now in (("idle", 0), ("checking", 1), ("update-available", 2), ("downloading", 3), ("verifying", 10),
                    ("downloading", 11), ("verifying", 12)):
        tally.observe(op, None, now)
    assert tally.download_seconds(100) == 8.0
    tally.observe("downloading", None, 200)
    assert tally.download_seconds(205) == 13.0  # the running download counts too


@pytest.mark.parametrize("version", ['2.0"\\', "1.0\n# TYPE x counter\nx 1", "\x1b[31mred\u202e", "é" * 500])
def test_hostile_label_values_stay_one_parsable_sample(version):
    text = render({"operation": "idle", "current_version": version, "booted_slot": "a"}, Tally(), "sim", 0)
    parsed = samples(text)
    info = [labels for (name, labels) in parsed if name == "omaha_agent_info"]
    assert len(info) == 1 and dict(info[0])["version"] == clean(version, 200)
    assert [name for (name, _) in parsed if name == "x"] == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.text(max_size=20))
def test_any_version_and_slot_text_renders_as_one_info_sample(version, slot):
    parsed = samples(render({"operation": "idle", "current_version": version, "booted_slot": slot}, Tally(), "sim", 0))
    info = [dict(labels) for (name, labels) in parsed if name == "omaha_agent_info"]
    assert info == [{"version": clean(version, 200), "slot": clean(slot, 200), "backend": "sim"}]


def test_metrics_are_off_by_default_and_their_paths_are_checked(tmp_path):
    base = """server: {url: "https://u.example/v1/update/"}
app: {id: app}
slots: {a: {partlabel: A}, b: {partlabel: B}}
boot: {backend: gpt, disk: /dev/sda}
"""
    config = parse(base)
    assert config.metrics.textfile is None and config.metrics.socket is None
    config = parse(base + "metrics:\n  textfile: /var/lib/node/omaha_agent.prom\n  socket: /run/omaha-agent/metrics\n")
    assert config.metrics.textfile == "/var/lib/node/omaha_agent.prom"
    assert config.metrics.socket == "/run/omaha-agent/metrics"
    for extra, message in (("metrics:\n  textfile: agent.prom\n", "agent.yaml:6: metrics.textfile: must be an absolute"),
                           (f"metrics:\n  socket: {tmp_path}\n", "agent.yaml:6: metrics.socket: "),
                           ("metrics:\n  socket: /run/" + "s" * 120 + "\n", "agent.yaml:6: metrics.socket: is longer"),
                           ("metrics:\n  port: 9100\n", "agent.yaml:6: metrics.port: unknown key")):
        with pytest.raises(ConfigError) as info:
            parse(base + extra)
        assert str(info.value).startswith(message), str(info.value)
