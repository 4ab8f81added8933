import json

from agent.omaha import pings
from agent.omaha.headers import parse_retry_after, request_headers
from agent.omaha.model import DayStart
from agent.omaha import request as build

DAY = 86400


def test_first_ping_says_never():
    p = pings.ping_for(pings.PingState(), now=1000.0)
    assert (p.active, p.a, p.r, p.ad, p.rd) == (1, -1, -1, -1, -1)


def test_counters_follow_the_server_day_and_rotate_freshness():
    now = 10 * DAY + 3600
    state = pings.after_reply(pings.PingState(freshness="old"), now, DayStart(elapsed_seconds=3600,
                                                                              elapsed_days=5430), "new")
    assert state.freshness == "new" and state.install_date == 5425
    assert state.rollcall_daystart == 10 * DAY and state.active_days == 5430
    same_day = pings.ping_for(state, now + 60)
    assert (same_day.a, same_day.r, same_day.ad, same_day.rd) == (0, 0, 5430, 5430)
    three_days = pings.ping_for(state, now + 3 * DAY)
    assert (three_days.a, three_days.r, three_days.ping_freshness) == (3, 3, "new")
    later = pings.after_reply(state, now + 3 * DAY, DayStart(elapsed_seconds=7200, elapsed_days=5428), "newer")
    assert later.install_date == 5425 and later.rollcall_days == 5428 and later.freshness == "newer"


def test_inactive_ping_keeps_active_counters():
    state = pings.PingState(active_daystart=0.0, active_days=1, freshness="f")
    after = pings.after_reply(state, 5 * DAY, DayStart(elapsed_seconds=0, elapsed_days=6), "g", active=False)
    assert after.active_days == 1 and after.rollcall_days == 6
    p = pings.ping_for(after, 5 * DAY, active=False)
    assert p.active == 0 and p.a is None and p.ad == -2


def test_state_survives_json_and_ignores_junk():
    state = pings.PingState(1.5, 2.5, 3, 4, "f", 7)
    assert pings.PingState.from_json(json.loads(json.dumps(state.to_json()))) == state
    assert pings.PingState.from_json({"freshness": ["x"], "bogus": 1, "install_date": True}) == pings.PingState()


def test_retry_after():
    assert parse_retry_after("120") == 120
    assert parse_retry_after(" 999999 ") == 86400
    for junk in (None, "", "0", "-5", "1.5", "soon", "١٢", "9" * 40):
        assert parse_retry_after(junk) is None


def test_request_headers():
    info = build.ClientInfo(appid="{A}", version="1", updaterversion="0.1.0")
    req = build.update_check(info, requestid="r", sessionid="s", interactive=False, ping=None)
    headers = request_headers(req, interactive=False)
    assert headers["X-Goog-Update-Interactivity"] == "bg" and headers["X-Goog-Update-AppId"] == "{A}"
    assert headers["X-Goog-Update-Updater"] == "omaha-agent-0.1.0"
    assert headers["Content-Type"].startswith("text/xml")
    resent = request_headers(req, interactive=None, request_age=42)
    assert resent["X-Request-Age"] == "42" and "X-Goog-Update-Interactivity" not in resent
