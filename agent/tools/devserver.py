"""A small Omaha server for development, demos and the tests.

It answers update checks in V3 XML or 3.1 JSON (whichever the request used), in the Chrome OS or the
CoreOS/Flatcar response dialect, acknowledges events, serves payloads with Range support, and writes every
request and event it receives as JSON lines. Faults can be injected to test clients against a misbehaving
server. It reuses ``agent.omaha`` for the codec and nothing else of the agent.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

from ..omaha import decode_request, encode_response, versions
from ..omaha.model import (
    Action, DayStart, Manifest, Package, ProtocolError, Response, ResponseApp, ResponseUpdateCheck, Url,
)

EPOCH_2007 = 1167609600  # 2007-01-01T00:00:00Z


@dataclass
class Image:
    path: str
    version: str
    appid: str
    track: str = ""  # "" = any track
    name: str = ""  # file name in URLs; defaults to the path's basename
    size: int = 0
    sha256: bytes = b""
    sha1: bytes = b""
    signature: bytes | None = None  # served as <name>.sig (the DevServer's sign_key fills it in)
    chunk_index: str | None = None  # an adaptive release: its NAME.cidx; it and NAME.czst are served beside the
    #                                 payload (which is usually NAME.czst itself) and named in the signature
    parts: tuple = ()  # a release of several images (slot groups): the other packages (Images), offered after
    #                    this one, in this order, and signed with it in its one envelope

    def __post_init__(self):
        self.name = self.name or os.path.basename(self.path)
        h256, h1 = hashlib.sha256(), hashlib.sha1()
        size = 0
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                h256.update(block)
                h1.update(block)
                size += len(block)
        self.size, self.sha256, self.sha1 = size, h256.digest(), h1.digest()
        if self.chunk_index:
            from ..adaptive.release import data_path_for
            for path in (self.chunk_index, data_path_for(self.chunk_index)):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"chunk file {path} not found (omaha-agent chunk IMAGE writes "
                                            "IMAGE.cidx and IMAGE.czst side by side)")


def adaptive_image(raw_image: str, version: str, appid: str, out_dir: str | None = None, level: int = 3,
                   track: str = "") -> Image:
    """An adaptive release of ``raw_image`` (cut beside it, or in ``out_dir``): its chunk data is the payload."""
    from ..adaptive.cut import cut
    result = cut(raw_image, out_dir, level=level)
    return Image(result.data_path, version, appid, track=track, chunk_index=result.index_path)


@dataclass
class Faults:
    """Misbehaviour to inject. Counters count down as the faults fire."""

    check_status: int = 0  # answer update checks with this HTTP status (e.g. 503)
    check_failures: int = 0  # ... this many times (0 = always while check_status is set)
    retry_after: str | None = None  # X-Retry-After on update-check answers
    event_status: int = 0  # answer event reports with this HTTP status (the report is not recorded)
    event_failures: int = 0
    payload_status: int = 0  # answer payload GETs with this HTTP status ...
    payload_failures: int = 0  # ... this many times
    reset_after: int = 0  # cut the connection after this many body bytes ...
    resets: int = 0  # ... this many times
    short_body: bool = False  # send Content-Length but end the body early, once
    ignore_range: bool = False  # always answer 200 with the whole body
    drip_delay: float = 0.0  # seconds between 64 KiB pieces
    stall_after: int = 0  # stop sending (without closing) after this many bytes, once
    wrong_hash: bool = False  # advertise a hash the payload does not have
    size_lie: int = 0  # advertise size + this
    extra_urls: tuple[str, ...] = ()  # codebases listed before the real one (dead mirrors)
    always_offer: bool = False  # offer the image even to clients already at (or above) its version
    malformed: bytes | None = None  # answer update checks with these bytes
    cup: str = ""  # CUP proofs: "missing", "tampered" (body changed after signing), "other-request", "huge" (20 KiB)
    cohort: str | None = None  # send this cohort in every app answer
    gzip_encoding: bool = False  # Content-Encoding: gzip on payloads when the client accepts it (Range counts
    #                              the encoded bytes, as a server of precompressed files does)
    event_stall: bool = False  # record an event report, then never answer it
    redirect_check: str | None = None  # answer update checks and events with 307 to this URL
    multi_range: str = ""  # a request for several ranges: "whole" answers 200 with the whole file (nginx with
    #                        max_ranges 1), "first" only its first range as a plain 206
    hold_last: float = 0.0  # seconds to wait before a payload's last 64 KiB piece (the client has all the rest by
    #                         then: the moment the body ends is known to within that piece)


@dataclass
class DevServer:
    images: list[Image]
    dialect: str = "chromeos"  # chromeos | flatcar
    host: str = "127.0.0.1"
    port: int = 0
    log_path: str | None = None
    faults: Faults = field(default_factory=Faults)
    protocol: str | None = None  # answer only this protocol ("3.0" or "3.1"); None: both
    clock: callable = time.time
    sign_key: str | None = None  # a PEM private key: each image gets its DSSE envelope, served as <name>.sig
    cup_key: str | None = None  # a P-256 PEM private key: answers carry a CUP-ECDSA proof when asked (cup2key)
    cup_key_version: int = 1
    ssl_context: object = None  # an ssl.SSLContext: serve https (the TLS tests)
    payload_base: str | None = None  # codebase for payload URLs (another server); None: this server's /packages/

    def __post_init__(self):
        self.requests: list[dict] = []
        self.events: list[dict] = []
        # one record per payload response: {"start": offset, "sent_to": offset reached, "done": whole body sent}
        # (a test watching a download from the host, e.g. to pull a guest's plug at a chosen byte)
        self.streams: list[dict] = []
        # one record per answer through the range server (chunk files; the payload asked for a range with an end or
        # several): {"name", "range" (the header), "status", "ranges" (served, None = whole), "sent" (body bytes)}
        self.fetches: list[dict] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        for path in ("/update", "/update/", "/v1/update", "/v1/update/", "/service/update2"):
            app.router.add_post(path, self.handle_update)
        app.router.add_get("/packages/{name}", self.handle_payload)
        return app

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def sign(self, image: Image) -> None:
        """Gives ``image`` its envelope, signed with ``sign_key`` (its appid, version and track)."""
        from ..trust import load_private_key, sign_file
        from ..trust import Artifact
        if image.chunk_index:
            from ..adaptive.release import sign
            image.signature = sign(image.path, image.chunk_index, load_private_key(self.sign_key), image.appid,
                                   image.version, image.track or None)
            return
        more = tuple(Artifact(p.name, p.sha256.hex(), p.size) for p in image.parts)
        image.signature = sign_file(image.path, load_private_key(self.sign_key), image.appid, image.version,
                                    image.track or None, name=image.name, more=more)

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"{self.scheme}://{self.host}:{self.port}/v1/update/"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    # -- records
    def _log(self, record: dict) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def event_codes(self) -> list[str]:
        return [f"{e['eventtype']}/{e['eventresult']}" for e in self.events]

    # -- update checks and events
    def _daystart(self) -> DayStart:
        now = self.clock()
        return DayStart(elapsed_seconds=int(now % 86400), elapsed_days=int((now - EPOCH_2007) // 86400))

    def _image_for(self, appid: str, track: str | None) -> Image | None:
        for image in self.images:
            if image.appid.lower() == appid.lower() and (not image.track or image.track == (track or "")):
                return image
        return None

    def _updatecheck(self, image: Image | None, version: str, base: str) -> ResponseUpdateCheck:
        f = self.faults
        if image is None:
            return ResponseUpdateCheck(status="noupdate")
        if not f.always_offer and not versions.is_newer(image.version, version):
            return ResponseUpdateCheck(status="noupdate")
        sha256 = hashlib.sha256(b"wrong").digest() if f.wrong_hash else image.sha256
        sha1 = hashlib.sha1(b"wrong").digest() if f.wrong_hash else image.sha1
        size = image.size + f.size_lie
        parts = tuple(Package(name=p.name, size=p.size, required=True, hash=base64.b64encode(p.sha1).decode(),
                              hash_sha256=p.sha256.hex().upper(), fp=f"1.{p.sha256.hex().upper()}")
                      for p in image.parts)  # each with its own SHA-256 (the action's names only a lone package)
        codebase = self.payload_base or f"{base}/packages/"
        if not codebase.endswith("/"):
            codebase += "/"
        urls = tuple(Url(codebase=cb) for cb in f.extra_urls) + (Url(codebase=codebase),)
        sha256_b64 = base64.b64encode(sha256).decode()
        if self.dialect == "flatcar":  # go-omaha / Nebraska: SHA-1 base64 in hash, SHA-256 base64 in the action
            package = Package(name=image.name, size=size, required=True, hash=base64.b64encode(sha1).decode(),
                              hash_sha256=sha256.hex().upper() if parts else "")
            action = Action(event="postinstall", extra=(("sha256", sha256_b64), ("DisablePayloadBackoff", "true")))
            actions = (action,)
        else:  # Chrome OS nebraska: upper-case hex hash_sha256 and fp, plus the postinstall action
            hexd = sha256.hex().upper()
            package = Package(name=image.name, size=size, required=True, hash_sha256=hexd, fp=f"1.{hexd}")
            actions = (Action(event="update", run=image.name),
                       Action(event="postinstall", extra=(("ChromeOSVersion", image.version), ("sha256", sha256_b64),
                                                          ("IsDeltaPayload", "false"), ("MaxDaysToScatter", "14"))))
        return ResponseUpdateCheck(status="ok", urls=urls,
                                   manifest=Manifest(version=image.version, packages=(package, *parts),
                                                     actions=actions))

    def _fault(self, status_attr: str, count_attr: str) -> int:
        status = getattr(self.faults, status_attr)
        if not status:
            return 0
        count = getattr(self.faults, count_attr)
        if count:
            setattr(self.faults, count_attr, count - 1)
            if count == 1:
                setattr(self.faults, status_attr, 0)
        return status

    async def handle_update(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.faults.redirect_check:
            self._log({"kind": "redirected", "to": self.faults.redirect_check})
            return web.Response(status=307, headers={"Location": self.faults.redirect_check})
        try:
            req = decode_request(body)
        except ProtocolError as exc:
            return web.Response(status=400, text=f"Bad Omaha Request: {exc}\n")
        if self.protocol and not req.protocol.startswith(self.protocol):
            return web.Response(status=400, text=f"Bad Omaha Request: this server speaks protocol {self.protocol}\n")
        is_check = any(app.updatecheck is not None for app in req.apps)
        # payload URLs use the address the client reached us at (a VM sees the host as 10.0.2.2)
        base = f"{self.scheme}://{request.host}" if request.host else self.base
        headers = {}
        if is_check:
            if self.faults.retry_after:
                headers["X-Retry-After"] = self.faults.retry_after
            status = self._fault("check_status", "check_failures")
            if status:
                return web.Response(status=status, text="injected failure\n", headers=headers)
            if self.faults.malformed is not None:
                return web.Response(body=self.faults.malformed, content_type="text/xml", headers=headers)
        else:
            status = self._fault("event_status", "event_failures")
            if status:
                return web.Response(status=status, text="injected failure\n")
        record = {"time": self.clock(), "protocol": req.protocol, "requestid": req.requestid,
                  "sessionid": req.sessionid, "installsource": req.installsource,
                  "interactivity": request.headers.get("X-Goog-Update-Interactivity"),
                  "request_age": request.headers.get("X-Request-Age"), "cup2key": request.query.get("cup2key"),
                  "apps": []}
        apps = []
        for app in req.apps:
            image = self._image_for(app.appid, app.track)
            rec = {"appid": app.appid, "version": app.version, "track": app.track, "board": app.board,
                   "machineid": app.machineid, "updatecheck": app.updatecheck is not None,
                   "ping": None if app.ping is None else {"a": app.ping.a, "r": app.ping.r, "ad": app.ping.ad,
                                                          "rd": app.ping.rd}}
            record["apps"].append(rec)
            for event in app.events:
                ev = {"appid": app.appid, "version": app.version, "eventtype": event.eventtype,
                      "eventresult": event.eventresult, "errorcode": event.errorcode, "errorcat": event.errorcat,
                      "previousversion": event.previousversion, "nextversion": event.nextversion,
                      "requestid": req.requestid, "request_age": request.headers.get("X-Request-Age")}
                self.events.append(ev)
                self._log({"kind": "event", **ev})
            if app.events and self.faults.event_stall:
                await asyncio.sleep(3600)
            known = image is not None or any(i.appid.lower() == app.appid.lower() for i in self.images)
            if not known and self.images:
                apps.append(ResponseApp(appid=app.appid, status="error-unknownApplication"))
                continue
            apps.append(ResponseApp(
                appid=app.appid, status="ok", ping_status="ok" if app.ping is not None else None,
                cohort=self.faults.cohort,
                updatecheck=self._updatecheck(image, app.version, base) if app.updatecheck is not None else None,
                event_statuses=tuple("ok" for _ in app.events)))
        self.requests.append(record)
        self._log({"kind": "request", **record})
        resp = Response(protocol=req.protocol or "3.0", server="omaha-agent-devserver",
                        daystart=self._daystart(), apps=tuple(apps))
        ctype = "application/json" if req.protocol.startswith("3.1") else "text/xml"
        payload = encode_response(resp)
        if self.cup_key and request.query.get("cup2key"):
            from .. import cup
            from ..trust import load_private_key
            ch = cup.Challenge(request.query["cup2key"], hashlib.sha256(body).hexdigest())
            proof = cup.sign(load_private_key(self.cup_key), ch, payload)
            if self.faults.cup == "other-request":
                proof = proof.rsplit(":", 1)[0] + ":" + "00" * 32
            if self.faults.cup == "huge":
                proof = "0" * (20 << 10) + proof
            if self.faults.cup != "missing":
                headers["X-Cup-Server-Proof"] = proof
            if self.faults.cup == "tampered":
                payload = payload.replace(b"omaha-agent-devserver", b"omaha-agent-devservex")
        return web.Response(body=payload, content_type=ctype, charset="utf-8", headers=headers)

    # -- payloads
    async def handle_payload(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        signed = next((i for i in self.images if i.name + ".sig" == name), None)
        if signed is not None:
            if signed.signature is None and self.sign_key:
                await asyncio.to_thread(self.sign, signed)
            if signed.signature is None:
                raise web.HTTPNotFound(text="this release is not signed\n")
            self._log({"kind": "signature", "name": name})
            return web.Response(body=signed.signature, content_type="application/json")
        image = next((i for i in self.images for i in (i, *i.parts) if i.name == name), None)
        chunk_file = self._chunk_file(name)
        if image is None and chunk_file is None:
            raise web.HTTPNotFound(text="no such package\n")
        status = self._fault("payload_status", "payload_failures")
        if status:
            return web.Response(status=status, text="injected failure\n")
        rng = request.headers.get("Range", "")
        if chunk_file is not None or (rng and not re.fullmatch(r"bytes=\d+-", rng)):
            from .ranges import serve
            path = chunk_file or image.path
            record = {"name": name, "range": rng[:200]}
            self.fetches.append(record)
            resp = await serve(request, path, os.path.getsize(path), self.faults, record)
            self._log({"kind": "fetch", **record})
            return resp
        if self.faults.gzip_encoding and "gzip" in request.headers.get("Accept-Encoding", ""):
            return await self._gzip_payload(request, image)
        start = 0
        if rng.startswith("bytes=") and not self.faults.ignore_range:
            try:
                start = int(rng[6:].split("-", 1)[0])
            except ValueError:
                start = 0
            if not 0 <= start < image.size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{image.size}"})
        length = image.size - start
        resp = web.StreamResponse(status=206 if start else 200)
        resp.content_length = length
        resp.content_type = "application/octet-stream"
        resp.headers["Accept-Ranges"] = "bytes"
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{image.size - 1}/{image.size}"
        await resp.prepare(request)
        self._log({"kind": "download", "name": name, "start": start, "session": request.headers.get(
            "X-Goog-Update-SessionId"), "accept_encoding": request.headers.get("Accept-Encoding")})
        f = self.faults
        limit = length
        if f.short_body:
            f.short_body = False
            limit = length // 2
        cut = f.reset_after if f.resets and f.reset_after else 0
        sent = 0
        stream = {"start": start, "sent_to": start, "done": False}
        self.streams.append(stream)
        with open(image.path, "rb") as fh:
            fh.seek(start)
            while sent < limit:
                piece = fh.read(min(1 << 16, limit - sent))
                if not piece:
                    break
                if cut and sent + len(piece) >= cut:
                    await resp.write(piece[: cut - sent])
                    f.resets -= 1
                    request.transport.abort() if request.transport else None
                    return resp
                if f.hold_last and start + sent + len(piece) >= image.size:
                    await asyncio.sleep(f.hold_last)
                if f.stall_after and sent + len(piece) >= f.stall_after:
                    f.stall_after = 0
                    await resp.write(piece)
                    await asyncio.sleep(3600)
                await resp.write(piece)
                sent += len(piece)
                stream["sent_to"] = start + sent
                if f.drip_delay:
                    await asyncio.sleep(f.drip_delay)
        if limit < length:
            request.transport.abort() if request.transport else None
            return resp
        await resp.write_eof()
        stream["done"] = True
        return resp


    def _chunk_file(self, name: str) -> str | None:
        """The path of an adaptive release's chunk file named ``name`` (its index, or a data file that is not
        the payload), or None."""
        from ..adaptive.release import data_path_for
        for image in self.images:
            if image.chunk_index and name != image.name:
                for path in (image.chunk_index, data_path_for(image.chunk_index)):
                    if os.path.basename(path) == name:
                        return path
        return None

    async def _gzip_payload(self, request: web.Request, image: Image) -> web.StreamResponse:
        """The payload gzip-encoded as a whole (Content-Encoding), a Range counted in encoded bytes; cut once
        after ``reset_after`` encoded bytes while ``resets`` lasts."""
        import gzip
        with open(image.path, "rb") as fh:
            body = gzip.compress(fh.read(), mtime=0)
        start = 0
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes="):
            try:
                start = int(rng[6:].split("-", 1)[0])
            except ValueError:
                start = 0
            if not 0 <= start < len(body):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(body)}"})
        resp = web.StreamResponse(status=206 if start else 200)
        resp.content_length = len(body) - start
        resp.content_type = "application/octet-stream"
        resp.headers["Content-Encoding"] = "gzip"
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        await resp.prepare(request)
        self._log({"kind": "download", "name": image.name, "start": start, "encoding": "gzip"})
        f, data = self.faults, body[start:]
        if f.resets and f.reset_after and f.reset_after < len(data):
            f.resets -= 1
            await resp.write(data[:f.reset_after])
            request.transport.abort() if request.transport else None
            return resp
        await resp.write(data)
        await resp.write_eof()
        return resp


async def serve(args) -> int:
    """``omaha-agent devserver``: serve one image until interrupted."""
    parts = tuple(Image(path, args.version, args.appid) for path in getattr(args, "package", None) or ())
    image = Image(args.payload, args.version, args.appid, track=args.track or "",
                  chunk_index=getattr(args, "chunks", None), parts=parts)
    server = DevServer([image], dialect=args.dialect, host=args.host, port=args.port, log_path=args.log,
                       faults=Faults(always_offer=args.always_offer), protocol=args.protocol,
                       sign_key=args.sign_key, payload_base=getattr(args, "payload_base", None),
                       cup_key=getattr(args, "cup_key", None), cup_key_version=getattr(args, "cup_key_version", 1))
    url = await server.start()
    print(f"devserver: serving {image.name} version {image.version} ({image.size} bytes, sha256 "
          f"{image.sha256.hex()}) for app {image.appid}", flush=True)
    print(f"devserver: update URL {url} (dialect {server.dialect}; XML or JSON as the client asks)", flush=True)
    if image.chunk_index:
        print(f"devserver: an adaptive release: {os.path.basename(image.chunk_index)} and its chunk data served "
              "beside the payload (Range, multipart/byteranges)", flush=True)
    for part in image.parts:
        print(f"devserver: and {part.name} ({part.size} bytes, sha256 {part.sha256.hex()}) in the same release",
              flush=True)
    if server.payload_base:
        print(f"devserver: payload URLs point at {server.payload_base}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
    return 0

