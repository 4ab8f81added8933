"""The metrics exporter: the exposition (``metrics.render``) written to a textfile for node exporter's textfile
collector, and/or served on a Unix socket. No TCP or HTTP port is opened.

The textfile is replaced atomically (``atomic.write_atomic``: a reader sees the old file or the new one, never
half of one), in a thread, at most once per ``MIN_INTERVAL`` while the status changes (never per downloaded
chunk), and once more at stop. The socket answers every connection with the current exposition and closes it:
nothing is read from the client, at most ``MAX_CLIENTS`` connections are served at once (more are closed at
once), and a client that does not take its answer within ``SEND_TIMEOUT`` is cut off; none of it blocks the loop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time

from .atomic import write_atomic
from .metrics import Tally, render

log = logging.getLogger("omaha-agent")

MIN_INTERVAL = 1.0  # seconds between two textfile writes
MAX_CLIENTS = 16
SEND_TIMEOUT = 5.0  # seconds a socket client has to take its answer


class _Answer(asyncio.Protocol):
    """One connection: the exposition is written, the connection closed; what the client sends is ignored."""

    def __init__(self, server: "SocketServer"):
        self.server = server
        self.timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.server.clients >= self.server.max_clients:
            transport.abort()  # over the cap: this connection costs nothing more
            return
        self.server.clients += 1
        transport.pause_reading()  # no request is read at all
        self.timer = asyncio.get_running_loop().call_later(self.server.timeout, transport.abort)
        transport.write(self.server.text())
        transport.close()  # once the answer is flushed

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.server.clients -= 1

    def data_received(self, data) -> None:  # (reading is paused; anything that still arrives is dropped)
        pass


class SocketServer:
    def __init__(self, path: str, text, max_clients: int = MAX_CLIENTS, timeout: float = SEND_TIMEOUT):
        self.path, self.text = path, text  # text(): the exposition as bytes
        self.max_clients, self.timeout = max_clients, timeout
        self.clients = 0
        self.server = None

    async def start(self) -> None:
        """Binds ``path`` (a stale socket there is replaced; anything else is an error), mode 0660 with the
        group of its directory, before it listens."""
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
        except BaseException:
            sock.close()
            raise
        try:
            os.chmod(self.path, 0o660)
            gid = os.stat(os.path.dirname(os.path.abspath(self.path))).st_gid
            if gid != os.getegid():
                try:
                    os.chown(self.path, -1, gid)
                except OSError as exc:
                    log.warning("the metrics socket %s keeps the agent's group: %s", self.path, exc.strerror or exc)
            self.server = await asyncio.get_running_loop().create_unix_server(lambda: _Answer(self), sock=sock)
        except BaseException:
            sock.close()
            os.unlink(self.path)
            raise

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


class Exporter:
    """Keeps the ``Tally`` up to date from the status board and the reporter, and exports what ``render`` says."""

    def __init__(self, ctx, reporter):
        self.ctx = ctx
        self.config = ctx.config.metrics
        self.tally = Tally()
        self.socket: SocketServer | None = None
        self._dirty = False
        self._writer: asyncio.Task | None = None
        self._inflight: asyncio.Future | None = None  # the write in its thread (a cancel does not stop a thread)
        self._last = float("-inf")
        self._error = ""
        self.writes = 0  # textfile writes so far
        self._closed = False
        reporter.on_queue = self._event
        ctx.status.listeners.append(self._changed)

    def text(self) -> str:
        return render(self.ctx.status.snapshot(), self.tally, self.ctx.config.boot.backend, time.monotonic())

    async def start(self) -> None:
        """Serves the socket (an error is logged: the agent runs on without it) and writes the textfile."""
        if self.config.socket:
            server = SocketServer(self.config.socket, lambda: self.text().encode())
            try:
                await server.start()
                self.socket = server
                log.info("metrics served on %s", self.config.socket)
            except OSError as exc:
                log.error("cannot serve the metrics on %s: %s (does its directory exist, and may the service write "
                          "there? see README, Metrics)", self.config.socket, exc.strerror or exc)
        self._schedule()

    async def close(self) -> None:
        """Stops serving, and writes the textfile a last time."""
        self._closed = True
        if self.socket is not None:
            await self.socket.close()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._inflight is not None:  # the last write lands after the one before it, never under it
            await asyncio.gather(self._inflight, return_exceptions=True)
        if self.config.textfile:
            await self._write()

    def _event(self, event) -> None:
        try:
            self.tally.event(event)
            self._schedule()
        except Exception:  # counting never stops an update
            log.exception("counting an event for the metrics failed")

    def _changed(self, snapshot: dict) -> None:
        self.tally.observe(snapshot["operation"], self.ctx.status.progress, time.monotonic())
        self._schedule()

    def _schedule(self) -> None:
        if not self.config.textfile or self._closed:
            return
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_soon())

    async def _write_soon(self) -> None:
        loop = asyncio.get_running_loop()
        while self._dirty:
            wait = self._last + MIN_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._write()

    async def _write(self) -> None:
        self._dirty = False
        self._last = asyncio.get_running_loop().time()
        path = self.config.textfile
        try:
            self._inflight = asyncio.ensure_future(asyncio.to_thread(write_atomic, path, self.text().encode(), 0o644))
            await asyncio.shield(self._inflight)
            self.writes += 1
        except OSError as exc:
            error = f"{exc.strerror or exc}"
            if error != self._error:  # said once, not at every status change
                log.error("cannot write the metrics to %s: %s (does its directory exist, and may the service write "
                          "there? see README, Metrics)", path, error)
            self._error = error
            return
        if self._error:
            log.info("the metrics are written to %s again", path)
            self._error = ""
