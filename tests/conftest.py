import os
import shutil

import pytest

os.environ.setdefault("PATH", "")
if "/usr/sbin" not in os.environ["PATH"].split(":"):
    os.environ["PATH"] += ":/usr/sbin:/sbin"


COUNTS: dict[str, str] = {}


def record_count(name: str, text: str) -> None:
    """A figure printed at the end of the run (the matrix and fuzz counts: ``make test`` shows them)."""
    COUNTS[name] = text


def pytest_terminal_summary(terminalreporter):
    for name, text in COUNTS.items():
        terminalreporter.write_line(f"{name}: {text}")


def need_tool(name: str):
    """Skip (saying why) when a system tool the test cross-checks against is missing."""
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (make test installs it as root)")
    return shutil.which(name)


@pytest.fixture
async def server(tmp_path):
    """The development server offering a 3 MiB version 2.0.0 to the simulated devices of tests/simdevice.py."""
    from agent.tools.devserver import DevServer
    from .simdevice import image
    srv = DevServer([image(tmp_path, "2.0.0")], log_path=str(tmp_path / "server.jsonl"))
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def device(tmp_path):
    """A simulated device: two 8 MiB slot files and a sim bootloader with slot a good at 1.0.0."""
    from agent.boot.sim import SimBoot
    slots = {s: str(tmp_path / f"slot-{s}.img") for s in "ab"}
    for path in slots.values():
        with open(path, "wb") as f:
            f.truncate(8 << 20)
    boot = SimBoot(str(tmp_path / "bootenv.json"), slots)
    boot.initialize("a", "1.0.0")
    return boot, slots


POLICY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "dbus",
                      "org.omaha_agent.Agent1.conf")

# the default policy of Debian's /usr/share/dbus-1/system.conf: deny owning names and method calls unless a
# service's own policy file (ours, included below) allows them
_SYSTEM_BUS = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


class PrivateBus:
    """A dbus-daemon configured like the system bus, with the project's policy file, on a socket in a
    world-readable directory (so an unprivileged caller can connect and be refused by the policy)."""

    def __init__(self, group: str | None = None, extra: str = ""):
        import pwd
        import subprocess
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="omaha-bus-")
        os.chmod(self.dir, 0o755)
        policy = open(POLICY).read()
        if os.geteuid() != 0:  # a developer's run: let this user stand in for root
            policy = policy.replace('user="root"', f'user="{pwd.getpwuid(os.geteuid()).pw_name}"')
        if group:  # stand-in for group omaha-agent, so the test does not add a group to the host
            policy = policy.replace('group="omaha-agent"', f'group="{group}"')
        if extra:  # more <policy> elements (a test's stand-in service)
            policy = policy.replace("</busconfig>", extra + "</busconfig>")
        self.policy = os.path.join(self.dir, "policy.conf")
        with open(self.policy, "w") as f:
            f.write(policy)
        self.socket = os.path.join(self.dir, "bus")
        conf = os.path.join(self.dir, "system.conf")
        with open(conf, "w") as f:
            f.write(_SYSTEM_BUS.format(socket=self.socket, policy=self.policy))
        # its complaints go to a file: a pipe nobody reads fills up under a flood and blocks the daemon for good
        self.log = os.path.join(self.dir, "dbus-daemon.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address"],
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        if not ready:
            self.close()
            raise RuntimeError("dbus-daemon did not start within 10 s")
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            self.proc.wait(10)
            err = open(self.log).read()[-2000:]
            self.close()
            raise RuntimeError(f"dbus-daemon failed: {err}")
        self._saved = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.address

    def close(self):
        if getattr(self, "_saved", None) is None:
            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self._saved
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def system_bus():
    """A private system-like bus; DBUS_SYSTEM_BUS_ADDRESS points at it while the test runs."""
    need_tool("dbus-daemon")
    bus = PrivateBus()
    yield bus
    bus.close()
