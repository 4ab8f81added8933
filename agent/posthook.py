"""The post-install hook (``install.post_install``): commands run after the new image is verified on its slot and
before the slot is armed, each in its own process group with a timeout, without network unless
``install.post_install_network`` allows it. Their output goes to the agent's log line by line, bounded and
cleaned. The first that fails (non-zero exit, timeout, cannot start) stops the update: ``run`` returns why, in a
line.

The network sandbox, in order: under systemd (PID 1) each command is a transient service (``systemd-run --wait
--pipe --collect -p PrivateNetwork=yes``; at the timeout its unit is killed with ``systemctl kill``, and its
``RuntimeMaxSec``, 10 s later, is PID 1's own backstop): the agent's own unit has no capabilities and may not
create namespaces, PID 1 can. Elsewhere ``unshare --net`` (needs CAP_SYS_ADMIN). When neither is possible the
command is not run: it fails, it never runs with the network by accident.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil

from .procgroup import kill_group
from .text import clean

log = logging.getLogger("omaha-agent")

MAX_LINE = 400  # characters of one output line in the log
MAX_LINES = 1000  # output lines logged per command; the rest are counted
_names = itertools.count(1)


def systemd_booted() -> bool:
    return os.path.isdir("/run/systemd/system")


async def run(commands, env: dict[str, str], timeout: int, network: bool) -> str | None:
    """Runs ``commands`` in order; None when all succeeded, else why the first that failed did, in a line."""
    for command in commands:
        why = await _one(command, env, timeout, network)
        if why is not None:
            return f"post-install command {clean(command, 120)!r} {why}"
    return None


async def _one(command: str, env: dict[str, str], timeout: int, network: bool) -> str | None:
    full_env = dict(os.environ, **env)
    unit = None
    if network:
        argv = ["/bin/sh", "-c", command]
    elif systemd_booted() and shutil.which("systemd-run"):
        unit = f"omaha-agent-post-install-{os.getpid()}-{next(_names)}"
        argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", f"--unit={unit}",
                "-p", "PrivateNetwork=yes", "-p", f"RuntimeMaxSec={timeout + 10}",
                *(f"--setenv={k}={v}" for k, v in env.items()), "--", "/bin/sh", "-c", command]
    elif await _unshare_works():
        argv = ["unshare", "--net", "--", "/bin/sh", "-c", command]
    else:
        return ("could not start: no network sandbox here (not under systemd, and unshare --net is not "
                "permitted); set install.post_install_network: true to run it with the network")
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=full_env, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                    start_new_session=True)
    except OSError as exc:
        return f"could not start: {clean(exc.strerror or exc, 200)}"
    last: list[str] = []
    try:
        await asyncio.wait_for(_relay(proc, last), timeout)
    except asyncio.TimeoutError:
        await _kill(proc, unit)
        return f"did not finish in {timeout} s (killed with everything it started)"
    except BaseException:
        await _kill(proc, unit)
        raise
    if proc.returncode != 0:
        return f"exited {proc.returncode}" + (f": {last[0][:200]}" if last else "")
    return None


async def _relay(proc, last: list[str]) -> None:
    """Logs the command's output line by line (each at most MAX_LINE characters, MAX_LINES of them); keeps the
    last non-empty line in ``last``; returns when the output ends and the command has exited."""
    logged = dropped = 0
    pending = b""
    while True:
        chunk = await proc.stdout.read(65536)
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop() if chunk else b""
        if len(pending) > MAX_LINE * 4:  # a line without an end: logged (cut) as far as it came
            lines.append(pending)
            pending = b""
        for raw in lines:
            line = clean(raw, MAX_LINE)
            if not line:
                continue
            last[:] = [line]
            if logged < MAX_LINES:
                log.info("post-install: %s", line)
                logged += 1
            else:
                dropped += 1
        if not chunk:
            break
    if dropped:
        log.info("post-install: %d more lines of output not logged", dropped)
    await proc.wait()


async def _kill(proc, unit: str | None) -> None:
    """Kills the command's process group (the shell and whatever it started), and its unit under systemd."""
    await kill_group(proc)
    if unit:
        stop = await asyncio.create_subprocess_exec("systemctl", "kill", "--signal=SIGKILL", unit,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        await stop.wait()


async def _unshare_works() -> bool:
    """Whether this process may start a command in a new network namespace (``unshare --net``)."""
    if not shutil.which("unshare"):
        return False
    try:
        proc = await asyncio.create_subprocess_exec("unshare", "--net", "--", "true", stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return False
    return await proc.wait() == 0


async def run_for(ctx, target: str, version: str, previous: str) -> None:
    """The update job's call: runs the configured commands for ``version`` verified on slot ``target``; raises
    ``InstallError`` (kind ``postinstall``) when one fails. With slot groups each group's member of ``target`` is
    in ``OMAHA_AGENT_TARGET_<GROUP>`` too."""
    from .install import InstallError
    from .slots import SlotError, resolve
    env = {"OMAHA_AGENT_SLOT": target, "OMAHA_AGENT_VERSION": version, "OMAHA_AGENT_PREVIOUS_VERSION": previous}
    try:
        env["OMAHA_AGENT_DEVICE"] = resolve(ctx.config.slots[target])
    except (SlotError, KeyError, OSError):
        pass
    from .groups import grouped
    if grouped(ctx.config.groups):  # slot groups: each group's member of the target letter too
        for group in ctx.config.groups:
            try:
                env["OMAHA_AGENT_TARGET_" + group.name.upper().replace("-", "_")] = resolve(group.specs[target])
            except (SlotError, KeyError, OSError):
                pass
    cfg = ctx.config.install
    log.info("running %d post-install command(s) for %s on slot %s", len(cfg.post_install), version, target)
    why = await run(cfg.post_install, env, cfg.post_install_timeout, cfg.post_install_network)
    if why is not None:
        raise InstallError(why, "postinstall")
