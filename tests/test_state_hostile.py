"""A damaged state file (by hand, by a bug, by a failing disk) never stops the daemon: what is malformed is
dropped with a warning that names it, the rest is kept, and the update still runs. Also: the daemon keeps
running when the bootloader state cannot be read during a check."""
import asyncio
import json
import math
import os
import signal
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from agent.omaha import encode_request
from agent.omaha.request import ClientInfo, event_report
from agent.state import MAX_POSTPONED, State, from_json

from .simdevice import ROOT, Device

DAMAGED = [
    ({"trial": {"version": "2.0.0"}}, "trial"),  # no slot: it would wait for a reboot forever
    ({"trial": {"slot": 5, "version": 3}}, "trial"),
    ({"trial": {"slot": "zz", "armed": True}}, "trial"),
    ({"blocked": {"version": 5, "until": "soon", "count": "x"}}, "blocked"),
    ({"blocked": {"version": "2.0.0", "until": 1e18, "count": 0}}, "blocked"),
    ({"events": [{"event": {"eventtype": "x"}}]}, "1 malformed event(s)"),
    ({"events": [{"event": {"eventtype": 3, "eventresult": 2}, "created": "yesterday", "requestid": "{r}"}]},
     "1 malformed event(s)"),
    ({"events": [{"event": {"eventtype": 3, "eventresult": 2, "bogus": 1}, "created": 1, "requestid": "{r}"}]},
     "1 malformed event(s)"),
    ({"events": [{"event": {"eventtype": 3, "eventresult": 2, "errorcode": "a"}, "created": 1, "requestid": "{r}"}]},
     "1 malformed event(s)"),
    ({"postponed": {"version": "2.0.0", "at": "later", "first": 1}}, "postponed"),
    ({"postponed": {"version": "2.0.0", "at": 1, "first": 2e9}}, "postponed"),  # postponed to before it was due
    ({"postponed": {"version": "x" * 300, "at": 2, "first": 1}}, "postponed"),
    ({"postponed": {"version": "2.0.0", "at": 1e12, "first": 1}}, "postponed"),  # past any configurable bound
    ({"staged": {"slot": "b", "version": "2.0.0"}}, "staged"),  # no digest: it could never be checked again
    ({"staged": {"slot": "b", "version": "2.0.0", "previous_version": "1.0.0", "sha256": "zz" * 32, "size": 5,
                 "boot_id": ""}}, "staged"),
    ({"staged": {"slot": "c", "version": "2.0.0", "previous_version": "1.0.0", "sha256": "ab" * 32, "size": 5,
                 "boot_id": ""}}, "staged"),
    ({"staged": {"slot": "b", "version": "2.0.0", "previous_version": "1.0.0", "sha256": "ab" * 32, "size": 0,
                 "boot_id": "x\u0007"}}, "staged"),
    ({"failures": -5, "last_check": "noon"}, "failures, last_check"),
    ({"ping": ["not", "a", "dict"], "cohort": 7}, "ping, cohort"),
]


@pytest.mark.parametrize("damaged,named", DAMAGED, ids=[n for n in range(len(DAMAGED))])
async def test_damaged_parts_are_dropped_named_and_the_update_still_runs(tmp_path, server, damaged, named):
    dev = Device(tmp_path, server.url)
    os.makedirs(dev.dir / "state")
    (dev.dir / "state" / "state.json").write_text(json.dumps(damaged))
    rc, out, err = await dev.once()
    assert rc == 0 and "Traceback" not in err, err
    assert f"dropped what was malformed ({named})" in err
    assert out.strip() == "installed 2.0.0 on slot b; it boots on trial after a reboot"
    assert server.event_codes() == ["13/1", "14/1", "3/1"]


async def test_junk_the_agent_would_have_sent_is_not_sent(tmp_path, server):
    # values that parse but have the wrong type: before, the ping's install date went out as "x" and the
    # server refused the whole request (HTTP 400)
    dev = Device(tmp_path, server.url)
    os.makedirs(dev.dir / "state")
    (dev.dir / "state" / "state.json").write_text(json.dumps(
        {"ping": {"install_date": "x", "active_days": 1.5, "freshness": 3}, "cohort": {"cohort": 5, "cohortname": "ok"},
         "download": {"junk": 1}}))
    rc, out, err = await dev.once()
    assert rc == 0 and "Traceback" not in err, err
    assert "dropped what was malformed (download)" in err
    assert server.event_codes() == ["13/1", "14/1", "3/1"]
    assert dev.state()["cohort"] == {"cohortname": "ok"}


async def test_an_unparseable_state_file_is_kept_aside_and_the_daemon_starts_afresh(tmp_path, server):
    dev = Device(tmp_path, server.url)
    os.makedirs(dev.dir / "state")
    (dev.dir / "state" / "state.json").write_bytes(b'{"events": [{"event": \x00\xff')
    rc, out, err = await dev.once()
    assert rc == 0 and "Traceback" not in err, err
    assert "unreadable" in err and "the damaged file is kept as" in err
    assert (dev.dir / "state" / "state.json.damaged").read_bytes().startswith(b'{"events"')
    assert server.event_codes() == ["13/1", "14/1", "3/1"]


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)
_event = st.fixed_dictionaries({"eventtype": st.integers(0, 54) | _json, "eventresult": st.integers(0, 10) | _json},
                               optional={"errorcode": st.integers() | _json, "url": st.text(max_size=8) | _json,
                                         "source_url_index": st.none() | st.integers(), "bogus": _json})
_record = st.fixed_dictionaries({"event": _event | _json}, optional={
    "requestid": st.text(min_size=1, max_size=8) | _json, "created": st.floats() | st.integers() | _json,
    "version": st.text(max_size=8) | _json, "attempts": st.integers() | _json})
_state = st.fixed_dictionaries({}, optional={
    "events": st.lists(_record, max_size=5) | _json, "trial": st.fixed_dictionaries(
        {"slot": st.sampled_from(["a", "b", "c"]) | _json, "version": st.text(max_size=8) | _json},
        optional={"armed": st.booleans() | _json}) | _json,
    "blocked": st.fixed_dictionaries({"version": st.text(max_size=8) | _json, "until": st.floats() | _json}) | _json,
    "postponed": st.fixed_dictionaries({"version": st.text(max_size=8) | _json, "at": st.floats() | _json,
                                        "first": st.floats() | st.integers() | _json}) | _json,
    "failures": st.integers() | _json, "next_check": st.floats() | _json, "ping": _json, "cohort": _json,
    "download": _json, "last_error": _json})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_state)
def test_whatever_the_file_holds_what_is_kept_is_usable(data):
    state, dropped = from_json(data)
    assert isinstance(state, State) and all(isinstance(d, str) for d in dropped)
    for key in ("last_check", "next_check", "retry_after_until"):
        value = getattr(state, key)
        assert value is None or (isinstance(value, (int, float)) and math.isfinite(value))
    assert isinstance(state.failures, int) and state.failures >= 0
    if state.trial is not None:
        assert state.trial.slot in ("a", "b") and isinstance(state.trial.version, str)
    if state.blocked is not None:
        assert isinstance(state.blocked.version, str) and math.isfinite(state.blocked.until)
    if state.postponed is not None:
        p = state.postponed
        assert p.version and math.isfinite(p.at) and math.isfinite(p.first)
        assert p.first <= p.at <= p.first + MAX_POSTPONED
    info = ClientInfo(appid="{a}", version="1.0.0")
    for record in state.events:  # every kept event can be sent as it is, as the daemon does it
        req = event_report(info, (record.event,), requestid=record.requestid, sessionid=record.sessionid,
                           version=record.version or None)
        assert encode_request(req).startswith(b"<?xml")
        assert math.isfinite(float(record.created))


_any_char = st.integers(0, 0x10FFFF).map(chr)  # lone surrogates included
_outside = (st.lists(_any_char | st.sampled_from(["\x1b[31m", "\x9b", "\udc9b", "\u202e", "\n", "x" * 3000]),
                     max_size=10).map("".join)
            | st.sampled_from(["2.0.0", "ok", "", "a" * 5000]))
_text_state = st.fixed_dictionaries({}, optional={
    "last_error": _outside, "fleet_lock": _outside,
    "trial": st.fixed_dictionaries({"slot": st.just("b"), "version": _outside, "previous_version": _outside}),
    "blocked": st.fixed_dictionaries({"version": _outside, "until": st.just(1.0)}),
    "postponed": st.fixed_dictionaries({"version": _outside, "at": st.just(2.0), "first": st.just(1.0)}),
    "download": st.fixed_dictionaries({"version": _outside, "slot": _outside, "sha256": _outside, "size": st.just(9),
                                       "received": st.just(1), "compressed": st.just(False)}),
    "ping": st.dictionaries(_outside, _outside | st.integers(), max_size=3),
    "cohort": st.dictionaries(st.sampled_from(["cohort", "cohortname"]), _outside, max_size=2),
    "events": st.lists(st.fixed_dictionaries(
        {"requestid": _outside, "created": st.just(1), "version": _outside,
         "event": st.fixed_dictionaries({"eventtype": st.just(3), "eventresult": st.just(2)},
                                        optional={"url": _outside, "nextversion": _outside,
                                                  "previousversion": _outside, "downloader": _outside})}),
        max_size=3)})
TEXT_COUNTS = [0, 0]  # examples, misbehaved


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_text_state, st.booleans())
@example({"trial": {"slot": "b", "version": "2.0.0", "previous_version": " "}}, False)  # a found one: a blank version
def test_outside_text_in_the_state_file_is_repaired_or_dropped_never_kept_raw(data, through_file):
    """issue 25 row 2: a lone surrogate (or a control character) in state.json reached D-Bus and stopped the
    daemon before READY; whatever text the file holds, what the loader keeps is clean and can be sent anywhere."""
    from agent.omaha import versions
    from agent.text import is_clean

    from .conftest import record_count
    if through_file:  # the bytes on disk, as the store writes them (\u escapes) or worse (raw bytes, not UTF-8)
        raw = json.dumps(data).encode().replace(b"\\udc9b", b"\x9b")
        state, dropped = _load_bytes(raw)
    else:
        state, dropped = from_json(data)
    problems = []
    kept = json.dumps(state.to_json(), ensure_ascii=False)
    try:
        kept.encode("utf-8")
    except UnicodeEncodeError as exc:
        problems.append(f"not UTF-8: {exc}")
    if not is_clean(state.last_error, 2000):
        problems.append(f"last_error {state.last_error[:80]!r}")
    for record in (state.trial, state.blocked, state.postponed, state.download):
        if record is not None and record.version and versions.problem(record.version):
            problems.append(f"version {record.version[:80]!r}")
    if any(not is_clean(s, 4096) for s in _strings(state.to_json())):
        problems.append("a kept text is not clean")
    TEXT_COUNTS[0] += 1
    TEXT_COUNTS[1] += bool(problems)
    record_count("state file outside text", f"{TEXT_COUNTS[0]} examples, {TEXT_COUNTS[1]} misbehaved")
    assert not problems, problems


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _load_bytes(raw: bytes):
    import tempfile

    from agent.state import Store
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "state.json"), "wb") as f:
            f.write(raw)
        store = Store(directory)
        warning = store.load()
        assert warning is None or ("\n" not in warning and len(warning) < 1000)
        return store.state, warning


def test_a_staged_update_is_kept_across_a_save_and_a_load():
    from agent.state import Staged
    state = State()
    state.staged = Staged("b", "2.0.0", "1.0.0", "ab" * 32, 3 << 20, "sim-4")
    back, dropped = from_json(json.loads(json.dumps(state.to_json())))
    assert back.staged == state.staged and not dropped


def test_a_byte_that_is_not_utf8_in_last_error_costs_only_that_text_not_the_trial(tmp_path):
    """issue 25 row 2: the loader repairs the text and keeps the trial record and the event queue beside it."""
    state, warning = _load_bytes(b'{"last_error": "HTTP 503 \x9b\xff Service", "trial": {"slot": "b", "version": '
                                 b'"2.0.0", "armed": true}, "events": [{"requestid": "{r}", "created": 1, '
                                 b'"event": {"eventtype": 3, "eventresult": 1}}]}')
    assert state.last_error == "HTTP 503 \\x9b\\xff Service" and "last_error's unprintable text (repaired)" in warning
    assert state.trial is not None and state.trial.armed and len(state.events) == 1


async def test_the_daemon_keeps_running_while_the_bootloader_state_cannot_be_read(tmp_path, server):
    dev = Device(tmp_path, server.url)
    with open(dev.config, "a") as f:
        f.write("schedule: {initial_delay: 3, interval: 3600, backoff_base: 1}\ndbus: {enabled: false}\n")
    env = dev.dir / "bootenv.json"
    good = env.read_bytes()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent.cli", "daemon", "--config", dev.config,
                                                env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        lines = []

        async def wait_for(text, limit=30):
            async def scan():
                while True:
                    line = (await proc.stderr.readline()).decode()
                    assert line, "the daemon exited:\n" + "".join(lines)
                    lines.append(line)
                    if text in line:
                        return line
            return await asyncio.wait_for(scan(), limit)

        await wait_for("next check in")  # the first check comes 0-6 s after start (initial_delay 3)
        env.write_bytes(b"\x00garbage")  # the bootloader env goes bad while the daemon runs
        failed = await wait_for("check failed:")
        assert "simulated bootloader env" in failed
        await wait_for("backoff after 1 failed check(s)")
        env.write_bytes(good)
        await wait_for("installed 2.0.0 on slot b", 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert server.event_codes() == ["13/1", "14/1", "3/1"]
    assert not any("Traceback" in line for line in lines)
