"""The systemd integration as installed by ``make install``: units verified and scored by systemd-analyze,
tmpfiles.d and sysusers.d applied by systemd's own tools, and the D-Bus activation file tied to the unit."""
import configparser
import os
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import need_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = ("omaha-agent.service", "omaha-agent-confirm.service")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    dest = tmp_path_factory.mktemp("root")
    subprocess.run(["make", "-s", "install", f"DESTDIR={dest}"], cwd=ROOT, check=True, capture_output=True)
    return dest


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keys are case-sensitive in unit files
    unit.read(os.path.join(ROOT, "systemd", name))
    return unit


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_make_install_lays_out_a_working_agent(installed):
    for path in ("usr/bin/omaha-agent", "usr/lib/systemd/system/omaha-agent.service",
                 "usr/lib/systemd/system/omaha-agent-confirm.service",
                 "usr/share/dbus-1/system.d/org.omaha_agent.Agent1.conf",
                 "usr/share/dbus-1/system-services/org.omaha_agent.Agent1.service",
                 "usr/lib/tmpfiles.d/omaha-agent.conf", "usr/lib/sysusers.d/omaha-agent.conf",
                 "etc/omaha-agent/agent.yaml", "usr/share/omaha-agent/grub.cfg",
                 "usr/share/omaha-agent/uboot/boot.cmd", "usr/share/omaha-agent/uboot/fw_env.config"):
        assert (installed / path).is_file(), path
    env = dict(os.environ, PYTHONPATH=str(installed / "usr/lib/python3/dist-packages"))
    proc = subprocess.run([sys.executable, str(installed / "usr/bin/omaha-agent"), "config", "check", "--config",
                           str(installed / "etc/omaha-agent/agent.yaml")], capture_output=True, text=True, env=env,
                          cwd="/")
    assert proc.returncode == 0 and ": ok (server" in proc.stdout, proc.stderr


def test_units_verify_clean(installed, tmp_path):
    need_tool("systemd-analyze")
    # verify resolves every dependency and ExecStart inside --root: give it the host's own units beside ours
    units = installed / "usr/lib/systemd/system"
    for host_dir in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if os.path.isdir(host_dir):
            for name in os.listdir(host_dir):
                target = units / name
                if not target.exists() and not name.startswith("omaha-agent"):
                    src = os.path.join(host_dir, name)
                    if os.path.isfile(src) and not os.path.islink(src):
                        shutil.copy(src, target)
            break
    proc = run("systemd-analyze", "verify", f"--root={installed}", "--man=no", *(str(units / u) for u in UNITS))
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_below_3(unit):
    need_tool("systemd-analyze")
    proc = run("systemd-analyze", "security", "--offline=yes", "--no-pager", os.path.join(ROOT, "systemd", unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout[-500:] + proc.stderr
    print(f"\n{unit}: exposure {match.group(1)}")
    assert float(match.group(1)) < 3.0


def test_main_unit_is_notify_with_watchdog_and_the_hardening_asked_for():
    svc = read_unit("omaha-agent.service")["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "on-failure"
    assert svc["ProtectSystem"] == "strict" and "/var/lib/omaha-agent" in svc["ReadWritePaths"]
    assert svc["DevicePolicy"] == "closed" and svc["NoNewPrivileges"] == "yes"
    assert svc["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    confirm = read_unit("omaha-agent-confirm.service")
    assert "boot-complete.target" in confirm["Unit"]["After"] and "boot-complete.target" in confirm["Unit"]["Requires"]
    assert confirm["Service"]["ExecStart"].endswith("omaha-agent confirm-boot")


def test_dbus_activation_starts_the_unit_by_its_alias():
    entry = read_unit("org.omaha_agent.Agent1.service")["D-BUS Service"]
    assert entry["Name"] == "org.omaha_agent.Agent1" and entry["User"] == "root"
    unit = open(os.path.join(ROOT, "systemd", "omaha-agent.service")).read()
    assert f"Alias={entry['SystemdService']}" in unit and "BusName=org.omaha_agent.Agent1" in unit


def test_tmpfiles_and_sysusers_apply_with_systemds_tools(installed, tmp_path):
    need_tool("systemd-tmpfiles")
    need_tool("systemd-sysusers")
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    # sysusers first, as at boot (systemd-sysusers.service runs before systemd-tmpfiles-setup.service)
    proc = run("systemd-sysusers", f"--root={root}", str(installed / "usr/lib/sysusers.d/omaha-agent.conf"))
    assert proc.returncode == 0, proc.stderr
    group = [line for line in (root / "etc/group").read_text().splitlines() if line.startswith("omaha-agent:")]
    assert len(group) == 1
    proc = run("systemd-tmpfiles", "--create", f"--root={root}", str(installed / "usr/lib/tmpfiles.d/omaha-agent.conf"))
    assert proc.returncode == 0, proc.stderr
    state = root / "var/lib/omaha-agent"
    assert state.is_dir() and oct(state.stat().st_mode & 0o777) == "0o700"
    run_dir = root / "run/omaha-agent"  # the metrics socket's directory: its group may read the metrics
    assert run_dir.is_dir() and oct(run_dir.stat().st_mode & 0o777) == "0o750"
    assert run_dir.stat().st_gid == int(group[0].split(":")[2])


def test_main_unit_leaves_proc_cmdline_readable_for_the_booted_slot():
    # ProcSubset=pid hides /proc/cmdline: the agent would fall back to the root filesystem's device (the QEMU
    # test asserts which source the guest's agent used)
    svc = read_unit("omaha-agent.service")["Service"]
    assert svc.get("ProcSubset", "all") == "all" and "/proc/cmdline" not in svc.get("InaccessiblePaths", "")
