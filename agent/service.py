"""The agent as a system service: the runner plus the D-Bus names, sd_notify (READY, STATUS, watchdog) and signals."""
from __future__ import annotations

import asyncio
import logging
import signal

from .config import Config
from .systemd import Notifier, status_line

log = logging.getLogger("omaha-agent")


async def serve(config: Config, stop: asyncio.Event | None = None, notifier: Notifier | None = None) -> None:
    """Runs until SIGTERM/SIGINT (or ``stop``); raises ``DbusUnavailable`` (exit 1: systemd restarts the service)
    when its connection to the system bus ended under it. READY=1 goes out once the state is loaded, the last update is
    settled and the D-Bus names are owned; a trial boot's health step runs as a job, so a slow health check never
    delays the service start."""
    from .daemon import Agent

    agent = Agent(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = notifier or Notifier()
    service = None
    lost: list[str] = []

    def on_lost(reason: str) -> None:  # off the bus no command can reach us: exit for systemd to restart us
        lost.append(reason)
        stop.set()

    async def on_ready() -> None:
        nonlocal service
        if config.dbus.enabled:
            from .dbus import publish
            service = await publish(agent, config.dbus.flatcar_compat, on_lost)
        notifier.ready(status_line(agent.snapshot()))
        log.info("ready%s", " on the system bus" if service else "")

    wait = False
    if config.health.after == "boot-complete":
        if config.dbus.enabled:
            wait = True  # omaha-agent-confirm.service sends ConfirmBoot over D-Bus
        else:
            log.warning("health.after is boot-complete but D-Bus is disabled: nothing can send ConfirmBoot, so "
                        "a trial boot is checked as soon as the daemon starts")
    agent.listeners.append(lambda snapshot: notifier.status(status_line(snapshot)))
    watchdog = asyncio.create_task(notifier.watchdog())
    try:
        await agent.run_forever(stop, on_ready, wait)
    finally:
        notifier.stopping()
        watchdog.cancel()
        if service is not None:
            service.close()
        notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if lost:
        from .dbus import DbusUnavailable
        raise DbusUnavailable(f"{lost[0]}; exiting so that systemd restarts the service")
