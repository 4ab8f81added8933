"""Rebooting: through logind on a real system, through the simulated bootloader on the sim backend."""
from __future__ import annotations

import logging

log = logging.getLogger("omaha-agent")


async def reboot(ctx, why: str, force: bool = False) -> None:
    """Reboots when the policy is ``immediate`` or ``force`` (an operator asked); otherwise logs that one is due."""
    if ctx.config.reboot.policy != "immediate" and not force:
        log.info("reboot needed (%s); policy is manual", why)
        return
    log.info("rebooting: %s", why)
    if ctx.config.boot.backend == "sim":
        log.info("simulated reboot: slot %s came up", await ctx.boot.reboot())
        return
    from .logind import reboot as logind_reboot
    await logind_reboot()
