"""The Omaha client: the update check request, and the event reporter with its durable queue.

Events are queued in the state (``Store``) and leave it only once the server acknowledged them, oldest first;
a resend keeps its request id and says how old it is (``X-Request-Age``). One flush at a time. aiohttp is
imported only when the first request goes out.
"""
from __future__ import annotations

import asyncio
import logging
import platform

from . import __version__
from .omaha import pings, request as build
from .omaha.events import event_label
from .omaha.model import Event
from .state import EventRecord

log = logging.getLogger("omaha-agent")


class Reporter:
    def __init__(self, ctx):
        self.ctx = ctx
        self.session = None
        self._cup = None
        self._flush_lock = asyncio.Lock()
        self.on_queue = None  # told of every event queued (the metrics count them)

    # -------------------------------------------------------------- requests
    def client_info(self, version: str | None = None) -> build.ClientInfo:
        app = self.ctx.config.app
        machineid = None
        if app.send_machine_id:
            try:
                with open("/etc/machine-id") as f:
                    machineid = f.read(64).strip() or None
            except OSError:
                machineid = None
        return build.ClientInfo(
            appid=app.id, version=version or self.ctx.version, track=app.track, board=app.board,
            hardware_class=app.hardware_class, protocol=self.ctx.config.server.protocol, updaterversion=__version__,
            os_version=platform.release(), arch=platform.machine(), machineid=machineid,
            targetversionprefix=app.targetversionprefix, rollback_allowed=app.rollback_allowed)

    def installdate(self) -> int | None:
        return pings.PingState.from_json(self.ctx.state.ping).install_date

    def cohort(self) -> build.Cohort:
        c = self.ctx.state.cohort
        return build.Cohort(c.get("cohort", ""), c.get("cohorthint", ""), c.get("cohortname", ""))

    async def http(self):
        """The one HTTP session (its TLS settings and proxies apply to every request). Raises ``OmahaHttpError``
        when the proxy setting cannot be used (every request fails until it is fixed; none goes direct)."""
        if self.session is None:
            import os

            from .http import OmahaHttpError, make_session
            from .proxy import ProxyError, route
            server = self.ctx.config.server
            try:
                way = route(server.proxy, server.no_proxy, os.environ)
            except ProxyError as exc:
                raise OmahaHttpError(f"cannot use the proxy setting: {exc}") from None
            log.info("HTTP: %s", way.describe())
            self.session = make_session(server.ca_file, server.timeout, server.client_cert, server.client_key,
                                        route=way)
        return self.session

    def cup(self):
        """(the server's CUP public key, its version) when ``server.cup`` is set; loaded once. Raises
        ``OmahaHttpError`` when the key cannot be used (every check fails until it is fixed)."""
        setting = self.ctx.config.server.cup
        if setting is None:
            return None
        if self._cup is None:
            from .cup import CupError, load_key
            try:
                self._cup = (load_key(setting.public_key), setting.key_version)
            except CupError as exc:
                from .http import OmahaHttpError
                raise OmahaHttpError(str(exc)) from None
        return self._cup

    def _allow_http(self) -> bool:
        """Plain http is used only when configured, or under CUP (which vouches for the answers itself)."""
        return self.ctx.config.server.insecure_http or self.ctx.config.server.cup is not None

    async def check(self, interactive: bool):
        """Posts an update check; returns (the request, the answer). Raises ``OmahaHttpError``. The ping and
        cohort state the answer carries are kept in the state (the caller commits it)."""
        from .http import post
        state, now = self.ctx.state, self.ctx.now()
        ping_state = pings.PingState.from_json(state.ping)
        req = build.update_check(self.client_info(), requestid=self.ctx.guid(), sessionid=self.ctx.guid(),
                                 interactive=interactive, ping=pings.ping_for(ping_state, now),
                                 cohort=self.cohort(), installdate=ping_state.install_date)
        state.last_check = now
        answer = await post(await self.http(), self.ctx.config.server.url, req, interactive=interactive,
                            timeout=self.ctx.config.server.timeout, allow_http=self._allow_http(), cup=self.cup(),
                            client_cert=self.ctx.config.server.client_cert is not None)
        if answer.retry_after and answer.trusted:
            state.retry_after_until = self.ctx.now() + answer.retry_after
        elif answer.retry_after:
            log.info("X-Retry-After ignored: the answer came over plain http (a CUP proof covers the body, not headers)")
        state.ping = pings.after_reply(ping_state, now, answer.response.daystart, self.ctx.guid()).to_json()
        app = answer.response.app(self.ctx.config.app.id)
        if app is not None:
            for key in ("cohort", "cohorthint", "cohortname"):
                value = getattr(app, key)
                if value is None:
                    continue
                if build.cohort_value_ok(value):
                    state.cohort[key] = value
                else:
                    log.warning("the server's %s of %d characters is not kept (at most %d printable ASCII "
                                "characters)", key, len(value), build.MAX_COHORT)
        return req, answer

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -------------------------------------------------------------- events
    def queue(self, event: Event, version: str) -> None:
        """Adds ``event`` to the durable queue (the caller commits the state)."""
        self.ctx.state.enqueue(EventRecord(self.ctx.guid(), self.ctx.guid(), self.ctx.now(), version, event))
        if self.on_queue is not None:
            self.on_queue(event)
        log.info("event %s queued (%s -> %s)", event_label(event.eventtype, event.eventresult),
                 event.previousversion, event.nextversion)

    async def flush(self) -> bool:
        """Sends queued events oldest first; each leaves the queue once acknowledged. False if any is left."""
        async with self._flush_lock:
            return await self._flush()

    async def _flush(self) -> bool:
        from .http import OmahaHttpError, post
        state = self.ctx.state
        while state.events:
            record = state.events[0]
            event = record.event
            req = build.event_report(self.client_info(), (event,), requestid=record.requestid,
                                     sessionid=record.sessionid, version=record.version or None,
                                     installdate=self.installdate(), cohort=self.cohort())
            age = max(0, int(self.ctx.now() - record.created))
            label = event_label(event.eventtype, event.eventresult)
            try:  # a resend says how old it is, and keeps its request id so the server can deduplicate
                record.attempts += 1
                # sent only once the queue holding it is on disk: a report whose state could not be saved (a full
                # disk) is never sent beside the one the next start makes from what is on disk
                if not await self.ctx.save("the event queue"):  # (and a resend after a crash says its age)
                    log.warning("event %s not sent while the state cannot be saved; kept for later", label)
                    return False
                await post(await self.http(), self.ctx.config.server.url, req, interactive=None,
                           request_age=age if record.attempts > 1 else None, timeout=self.ctx.config.server.timeout,
                           allow_http=self._allow_http(), cup=self.cup())
            except OmahaHttpError as exc:
                log.warning("event %s not delivered (%s); kept for later", label, exc)
                return False
            if state.events and state.events[0] is record:
                state.events.pop(0)
            await self.ctx.save("the event queue")
            log.info("event %s delivered", label)
        return True
