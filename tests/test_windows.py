"""Maintenance-window arithmetic as pure code (agent/windows.py): across midnight and the end of the week, several
windows, DST changes in a local zone, a device that boots inside a window. (A suspend across a window runs the
reboot job on a virtual clock: tests/test_reboots.py.)"""
import datetime as dt
from datetime import timezone
from zoneinfo import ZoneInfo

import pytest

from agent.config import ConfigError, parse
from agent.windows import Window, after_current, allowed_at, local_zone, next_opening, open_until, parse_start, zone

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def t(text: str, tz=UTC) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def w(days, start, length, tz=UTC) -> Window:
    return Window(frozenset(days), parse_start(start), length, tz)


SAT_LATE = w([5], "23:00", 180)  # Saturday 23:00 for 3 hours: ends Sunday 02:00


def test_a_window_across_midnight_is_open_after_midnight_and_closes_at_its_length():
    # 2026-11-28 is a Saturday
    assert open_until([SAT_LATE], t("2026-11-29 01:30")) == t("2026-11-29 02:00")
    assert open_until([SAT_LATE], t("2026-11-29 02:00")) is None
    assert open_until([SAT_LATE], t("2026-11-28 22:59")) is None
    assert allowed_at([SAT_LATE], t("2026-11-28 12:00")) == t("2026-11-28 23:00")


def test_a_window_across_the_end_of_the_week_opens_again_a_week_later():
    sunday = w([6], "23:00", 120)  # Sunday 23:00 to Monday 01:00
    assert open_until([sunday], t("2026-11-30 00:30")) == t("2026-11-30 01:00")  # Monday 00:30
    assert allowed_at([sunday], t("2026-11-30 01:00")) == t("2026-12-06 23:00")
    assert after_current([sunday], t("2026-11-30 00:30")) == t("2026-12-06 23:00")


def test_of_several_windows_the_earliest_opening_wins_and_overlaps_extend_the_open_time():
    nightly = w(range(7), "03:00", 60)
    weekend = w([5, 6], "02:00", 240)
    assert next_opening([nightly, weekend], t("2026-11-25 12:00")) == t("2026-11-26 03:00")  # Thursday
    assert next_opening([nightly, weekend], t("2026-11-27 12:00")) == t("2026-11-28 02:00")  # Saturday's first
    assert open_until([nightly, weekend], t("2026-11-28 03:30")) == t("2026-11-28 06:00")


def test_a_device_that_boots_inside_a_window_may_reboot_at_once():
    now = t("2026-11-28 23:45")
    assert allowed_at([SAT_LATE], now) == now


def test_windows_in_a_local_zone_follow_the_wall_clock_across_both_dst_changes():
    daily = w(range(7), "01:00", 60, BERLIN)
    # winter: 01:00 CET is 00:00 UTC; summer: 01:00 CEST is 23:00 UTC the day before
    assert next_opening([daily], t("2026-03-28 12:00")) == t("2026-03-29 00:00")
    assert next_opening([daily], t("2026-03-29 12:00")) == t("2026-03-29 23:00")
    assert next_opening([daily], t("2026-10-24 12:00")) == t("2026-10-24 23:00")
    assert next_opening([daily], t("2026-10-25 12:00")) == t("2026-10-26 00:00")
    # 02:30 does not exist on 2026-03-29 in Berlin: the window opens at 03:30 CEST (01:30 UTC), for its full length
    gap = w([6], "02:30", 60, BERLIN)
    assert next_opening([gap], t("2026-03-28 12:00")) == t("2026-03-29 01:30")
    assert open_until([gap], t("2026-03-29 02:00")) == t("2026-03-29 02:30")
    # 02:30 happens twice on 2026-10-25: the window opens at the first (02:30 CEST = 00:30 UTC)
    twice = w([6], "02:30", 60, BERLIN)
    assert next_opening([twice], t("2026-10-24 12:00")) == t("2026-10-25 00:30")


def test_local_means_the_zone_tz_names(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    assert str(local_zone()) == "Europe/Berlin" and str(zone("local")) == "Europe/Berlin"
    monkeypatch.setenv("TZ", "America/New_York")
    daily = w(range(7), "02:00", 60, zone("local"))
    assert next_opening([daily], t("2026-11-25 12:00")) == t("2026-11-26 07:00")  # EST is UTC-5


@pytest.mark.parametrize("text", ["24:00", "7", "07:5", "ab:cd", "", "-1:00", "12:60"])
def test_a_start_that_is_not_a_time_of_day_is_refused(text):
    with pytest.raises(ValueError, match="not a time of day"):
        parse_start(text)


BASE = """server: {url: "https://updates.example/service"}
app: {id: x}
slots: {a: {file: /dev/null}, b: {file: /tmp/b}}
boot: {backend: sim, env: /tmp/env}
"""


@pytest.mark.parametrize("reboot,says", [
    ("{policy: windows}", "the windows policy needs at least one window"),
    ("{policy: immediate, windows: [{days: [sat], start: '02:00', length: 60}]}", "windows apply to the windows"),
    ("{policy: windows, windows: [{days: [someday], start: '02:00', length: 60}]}",
     "window 1: days: 'someday' is not a weekday"),
    ("{policy: windows, windows: [{days: [sat], start: '2am', length: 60}]}", "window 1: '2am' is not a time"),
    ("{policy: windows, windows: [{days: [sat], start: '02:00', length: 0}]}", "window 1: length must be"),
    ("{policy: windows, windows: [{days: [sat], start: '02:00', length: 60, timezone: Mars/Base}]}",
     "is not a time zone"),
    ("{policy: windows, windows: [{days: [sat], start: '02:00', length: 60, every: week}]}", "unknown key 'every'"),
    ("{policy: immediate, fleetlock: {url: 'ftp://locks'}}", "reboot.fleetlock.url: 'ftp://locks' is not an http(s)"),
    ("{policy: immediate, fleetlock: {url: 'http://locks', group: 'a b'}}", "is not a group name"),
    ("{policy: immediate, notice: -5}", "reboot.notice: must be between 0"),
    ("{policy: immediate, max_postpone: 1e400}", "reboot.max_postpone: must be"),
])
def test_a_bad_reboot_configuration_is_one_line_naming_the_key(reboot, says):
    with pytest.raises(ConfigError) as info:
        parse(BASE + f"reboot: {reboot}\n")
    message = str(info.value)
    assert says in message and "\n" not in message and message.startswith("agent.yaml:5: reboot."), message


@pytest.mark.parametrize("days,start,says", [
    ('"sat,sun"', "'02:00'", "days: 'sat,sun' is not a weekday"),
    ("[sat sun]", "'02:00'", "days: 'sat sun' is not a weekday"),
    ("[sunshine]", "'02:00'", "days: 'sunshine' is not a weekday"),
    ("[sat, monkey]", "'02:00'", "days: 'monkey' is not a weekday"),
    ("[wedding]", "'02:00'", "days: 'wedding' is not a weekday"),
    ("[mon-funday]", "'02:00'", "days: 'mon-funday' is not a weekday"),
    ("[]", "'02:00'", "days must be a list of weekdays"),
    ("[3]", "'02:00'", "days: '3' is not a weekday"),
    ("[sat]", "'²:30'", "'²:30' is not a time of day"),
    ("[sat]", "'٢:30'", "is not a time of day"),
])
def test_window_days_are_exact_names_or_ranges_and_starts_are_ascii_times(days, start, says):
    """issue 25 row 9: "sat,sun" and [sat sun] meant Saturday only, words were matched by their first three
    letters, and a start of "²:30" ended in a raw int() error; each is now a one-line error naming the key and
    its line."""
    with pytest.raises(ConfigError) as info:
        parse(BASE + f"reboot: {{policy: windows, windows: [{{days: {days}, start: {start}, length: 60}}]}}\n")
    message = str(info.value)
    assert message.startswith("agent.yaml:5: reboot.windows: window 1: ") and says in message, message
    assert "\n" not in message and "int()" not in message and "base 10" not in message, message


@pytest.mark.parametrize("days,weekdays", [
    ("[sat, sun]", {5, 6}), ("sat", {5}), ("[mon-fri]", {0, 1, 2, 3, 4}), ("[fri-mon]", {4, 5, 6, 0}),
    ("[Saturday, SUN]", {5, 6}), ("[mon-wed, fri]", {0, 1, 2, 4}),
])
def test_window_days_take_names_full_names_and_ranges(days, weekdays):
    config = parse(BASE + f"reboot: {{policy: windows, windows: [{{days: {days}, start: '02:00', length: 60}}]}}\n")
    assert config.reboot.windows[0].days == frozenset(weekdays)


def test_a_windows_and_fleetlock_configuration_parses_into_its_parts():
    config = parse(BASE + """reboot:
  policy: windows
  windows:
    - {days: [sat, sun], start: "02:00", length: 120, timezone: UTC}
    - {days: wed, start: "23:30", length: 90, timezone: local}
  fleetlock: {url: "https://locks.example/", group: workers}
  notice: 300
""")
    r = config.reboot
    assert r.policy == "windows" and r.notice == 300 and r.max_postpone == 4 * 3600
    assert r.windows[0] == Window(frozenset({5, 6}), 120, 120, UTC) and r.windows[1].days == frozenset({2})
    assert r.fleetlock.url == "https://locks.example" and r.fleetlock.group == "workers"
