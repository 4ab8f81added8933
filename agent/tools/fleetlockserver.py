"""A small FleetLock server for tests and development: a counting semaphore of ``slots`` reboot slots per group,
with recursive locking and lock ownership, as the protocol describes (``POST /v1/pre-reboot`` takes or keeps a
slot, ``POST /v1/steady-state`` gives it back if held; both need ``fleet-lock-protocol: true`` and a body
``{"client_params": {"id": ..., "group": ...}}``; only 200 is success, every refusal is JSON
``{"kind": ..., "value": ...}``). Every request is logged (``log``); ``down`` answers 503 to everything.

Not for production: the semaphore lives in memory and is lost when the server stops."""
from __future__ import annotations

import json
import re
import time

from aiohttp import web

GROUP = re.compile(r"[a-zA-Z0-9.-]+")


class FleetLockServer:
    def __init__(self, slots: int = 1, host: str = "127.0.0.1", port: int = 0, clock=time.time):
        self.slots = slots
        self.host, self.port = host, port
        self.clock = clock
        self.holders: dict[str, list[str]] = {}  # group -> ids holding a slot, in the order they took it
        self.log: list[dict] = []
        self.down = False  # answer 503 (a server in maintenance) instead of acting
        self.observe = None  # called with each log entry as it is made (a test's probe)
        self.refusal: bytes | None = None  # when set, every answer but a 200 has this body (a hostile server)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 10)
        app.router.add_post("/v1/pre-reboot", self._pre_reboot)
        app.router.add_post("/v1/steady-state", self._steady_state)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def requests(self, endpoint: str | None = None, status: int | None = None) -> list[dict]:
        return [r for r in self.log if (endpoint is None or r["endpoint"] == endpoint)
                and (status is None or r["status"] == status)]

    @staticmethod
    def _error(status: int, kind: str, value: str) -> web.Response:
        return web.json_response({"kind": kind, "value": value}, status=status)

    async def _params(self, request: web.Request) -> tuple[str, str] | web.Response:
        if request.headers.get("fleet-lock-protocol") != "true":
            return self._error(400, "missing_header", "the fleet-lock-protocol: true header is required")
        try:
            params = json.loads(await request.read())["client_params"]
            client, group = params["id"], params["group"]
        except (ValueError, KeyError, TypeError):
            return self._error(400, "bad_body", "the body must be {\"client_params\": {\"id\": ..., \"group\": ...}}")
        if not isinstance(client, str) or not client:
            return self._error(400, "bad_id", "client_params.id must be a non-empty string")
        if not isinstance(group, str) or not GROUP.fullmatch(group):
            return self._error(400, "bad_group", "client_params.group must match ^[a-zA-Z0-9.-]+$")
        return client, group

    def _answer(self, endpoint: str, params, response: web.Response) -> web.Response:
        client, group = params if isinstance(params, tuple) else ("", "")
        entry = {"time": self.clock(), "endpoint": endpoint, "id": client, "group": group,
                 "status": response.status, "holders": list(self.holders.get(group, []))}
        self.log.append(entry)
        if self.observe is not None:
            self.observe(entry)
        if self.refusal is not None and response.status != 200:
            return web.Response(status=response.status, body=self.refusal, content_type="application/json")
        return response

    async def _pre_reboot(self, request: web.Request) -> web.Response:
        return await self._handle("pre-reboot", request, self._lock)

    async def _steady_state(self, request: web.Request) -> web.Response:
        return await self._handle("steady-state", request, self._unlock)

    async def _handle(self, endpoint: str, request: web.Request, act) -> web.Response:
        params = await self._params(request)
        if self.down:
            response = self._error(503, "maintenance", "the lock server is down for maintenance")
        elif isinstance(params, web.Response):
            response = params
        else:
            response = act(*params)
        return self._answer(endpoint, params, response)

    def _lock(self, client: str, group: str) -> web.Response:
        """RecursiveLock: a holder keeps its slot; anyone else takes a free one or is refused."""
        holders = self.holders.setdefault(group, [])
        if client not in holders:
            if len(holders) >= self.slots:
                return self._error(409, "failed_lock_semaphore_full",
                                   f"all {self.slots} reboot slot(s) of group {group} are taken")
            holders.append(client)
        return web.json_response({})

    def _unlock(self, client: str, group: str) -> web.Response:
        """UnlockIfHeld: 200 whether or not the client held a slot."""
        if client in self.holders.get(group, []):
            self.holders[group].remove(client)
        return web.json_response({})


async def serve(host: str, port: int, slots: int) -> None:
    import asyncio
    srv = FleetLockServer(slots, host, port)
    await srv.start()
    print(f"FleetLock server on {srv.url} ({slots} reboot slot(s) per group)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await srv.stop()
