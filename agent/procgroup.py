"""Ending a command the agent started in its own process group (health commands, post-install commands)."""
from __future__ import annotations

import os
import signal


async def kill_group(proc) -> None:
    """Kills ``proc``'s process group (the shell and whatever it started) and reaps the shell."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()
