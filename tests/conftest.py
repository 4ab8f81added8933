import os
import shutil

import pytest

os.environ.setdefault("PATH", "")
if "/usr/sbin" not in os.environ["PATH"].split(":"):
    os.environ["PATH"] += ":/usr/sbin:/sbin"


def need_tool(name: str):
    """Skip (saying why) when a system tool the test cross-checks against is missing."""
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (make test installs it as root)")
    return shutil.which(name)


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
