import random
import statistics

import pytest

from agent import schedule
from agent.config import ConfigError, parse

GOOD = """\
server:
  url: https://updates.example.com/v1/update/
app:
  id: "{X}"
slots:
  a: {partlabel: ROOT-A}
  b: {file: /tmp/b.img}
boot:
  backend: grubenv
  env: /boot/grubenv
"""


def test_defaults_fill_in():
    c = parse(GOOD)
    assert c.server.protocol == "3.0" and not c.server.insecure_http and c.boot.tries == 3
    assert c.slots["a"].kind == "partlabel" and c.slots["b"].value == "/tmp/b.img"
    assert c.schedule.interval == 18000 and c.reboot.policy == "manual" and c.health.commands == ()
    assert c.app.version_file == "/etc/os-release" and c.state_dir == "/var/lib/omaha-agent"
    assert c.install.arm == "immediately"
    assert parse(GOOD + "install: {arm: on-apply}\n").install.arm == "on-apply"
    assert parse(GOOD + "reboot: {policy: immediate}\ninstall: {arm: in-window}\n").install.arm == "in-window"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("  url: https://updates.example.com/v1/update/\n", ""), "agent.yaml:1: server.url: missing"),
    (lambda t: t.replace("https://", "http://"), "agent.yaml:2: server.url: plain http is refused"),
    (lambda t: t.replace("backend: grubenv", "backend: lilo"), "agent.yaml:9: boot.backend: must be grubenv, gpt"),
    (lambda t: t + "boot2: 1\n", "agent.yaml:11: boot2: unknown key"),
    (lambda t: t.replace("  b: {file: /tmp/b.img}\n", ""), "slots: slot b must be one of"),
    (lambda t: t + "schedule:\n  interval: soon\n", "agent.yaml:12: schedule.interval: must be a whole number"),
    (lambda t: t + "reboot: {policy: yolo}\n", "agent.yaml:11: reboot.policy: must be manual, immediate or windows"),
    (lambda t: t.replace("  env: /boot/grubenv\n", ""), "boot.env: missing"),
    (lambda t: t + "  tries: 12\n", "agent.yaml:11: boot.tries: must be between 1 and 9"),
    (lambda t: "server: [1, 2\n", "agent.yaml:2: not valid YAML"),
    (lambda t: t + "install: {arm: later}\n", "install.arm: must be immediately, on-apply or in-window"),
    (lambda t: t + "install: {arm: in-window}\n", "install.arm: in-window arms the update just before the reboot"),
])
def test_errors_name_the_key_and_the_line(edit, message):
    with pytest.raises(ConfigError) as info:
        parse(edit(GOOD), "/etc/omaha-agent/agent.yaml")
    assert message in str(info.value)


POLICY = schedule.Policy(interval=18000, initial_delay=600)


def test_first_check_is_spread_over_the_initial_delay():
    rng = random.Random(1)
    delays = [schedule.first_check(0, rng, POLICY).at for _ in range(2000)]
    assert min(delays) >= 0 and max(delays) <= 660
    assert 250 < statistics.mean(delays) < 410  # uniform over 0..600 plus 0..60


def test_regular_checks_postpone_one_in_five_by_up_to_a_fifth():
    rng = random.Random(2)
    delays = [schedule.next_check(0, rng, POLICY).at for _ in range(5000)]
    postponed = [d for d in delays if d > 18000 + 60]
    assert 0.17 < len(postponed) / len(delays) < 0.23
    assert max(delays) <= 18000 * 1.2 + 60 and min(delays) >= 18000
    seconds = {int(d) % 60 for d in delays}
    assert len(seconds) == 60  # no predictable second within the minute
    assert 18000 % 86400 and 86400 % 18000  # the period is not a divisor or multiple of a day


def test_backoff_grows_eightfold_with_equal_jitter_up_to_the_cap():
    rng = random.Random(3)
    policy = schedule.Policy(backoff_cap=18000)
    for failures, ceiling in ((1, 60), (2, 480), (3, 3840), (4, 18000), (20, 18000)):
        delays = [schedule.next_check(0, rng, policy, failures).at for _ in range(2000)]
        assert ceiling / 2 <= min(delays) < ceiling * 0.55 and ceiling * 0.95 < max(delays) <= ceiling + 1
        assert ceiling * 0.7 < statistics.mean(delays) < ceiling * 0.8


def test_retry_after_is_honoured_and_capped():
    rng = random.Random(4)
    assert schedule.next_check(0, rng, POLICY, 1, retry_after=3600).at >= 3600
    assert schedule.next_check(0, rng, POLICY, 0, retry_after=10 ** 9).at <= max(86401, 18000 * 1.2 + 60)
    assert not schedule.background_allowed(10, 20) and schedule.background_allowed(20, 20)


def test_missed_check_after_sleep_is_spread_not_immediate_for_all():
    rng = random.Random(5)
    late = [schedule.after_wakeup(100, 10_000, rng).at - 10_000 for _ in range(1000)]
    assert 0 <= min(late) and max(late) <= 300 and statistics.pstdev(late) > 50
    assert schedule.after_wakeup(20_000, 10_000, rng).at == 20_000


def test_restart_resumes_an_interrupted_download_within_half_a_minute():
    rng, policy = random.Random(6), schedule.Policy(initial_delay=600)
    resumed = [schedule.after_restart(100, 10_000, rng, policy, True) for _ in range(500)]
    assert all(0 <= n.at - 10_000 <= schedule.RESUME_SPREAD for n in resumed)
    assert "resuming the download" in resumed[0].reason
    assert schedule.after_restart(20_000, 10_000, rng, policy, False).at == 20_000  # the plan stands
    late = schedule.after_restart(100, 10_000, rng, policy, False)
    assert "missed" in late.reason and 10_000 <= late.at <= 10_000 + schedule.RECOVERY_SPREAD
    first = schedule.after_restart(None, 10_000, rng, policy, False)
    assert first.reason == "first check after start-up" and first.at <= 10_000 + 660


def test_a_plan_the_clock_can_no_longer_reach_soon_is_made_afresh():
    # a device without a battery-backed clock boots in 1970 and finds a check planned for 2026 in its state
    rng, policy = random.Random(7), schedule.Policy()
    limit = schedule.horizon(policy)
    assert limit == schedule.RETRY_AFTER_CAP + 1  # the longest legal wait: X-Retry-After's day
    now, planned_2026 = 1000.0, 1_790_000_000.0
    nxt = schedule.after_restart(planned_2026, now, rng, policy, False)
    assert now <= nxt.at <= now + policy.initial_delay + 60 and "clock move back" in nxt.reason
    # every legal plan is within the horizon, so a plan the daemon made itself is never replaced
    for failures in range(0, 40):
        assert schedule.next_check(now, rng, policy, failures, retry_after=10**9).at - now <= limit
    assert schedule.after_restart(now + limit - 1, now, rng, policy, False).at == now + limit - 1
    assert schedule.within(now + 10**9, now, 60) == now + 60 and schedule.within(None, now, 60) is None
