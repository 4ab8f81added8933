"""The hostile-server matrix: a table of misbehaving Omaha and payload servers (a real aiohttp server on
127.0.0.1), each run against a simulated device through ``Agent.run_once`` in this event loop.

For every case: the run ends with a one-line reason (or a success), no traceback and no other exception; slot
b is never set for a trial unless it holds exactly the right bytes; the booted slot a is untouched (its bytes
and its state); and the agent keeps working: a second run against a well-behaved server installs the next
version. No connection leaves 127.0.0.1: ``socket.connect`` is guarded for the whole matrix, and URLs that
must be refused (other schemes, metadata addresses) are refused before any connection.
"""
import asyncio
import gzip
import hashlib
import os
import socket
import time
import zlib
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiohttp import web

from agent.boot import SlotState
from agent.boot.sim import SimBoot
from agent.config import parse
from agent.daemon import Agent, AgentError
from agent.omaha import decode_request
from agent.tools.devserver import DevServer, Image

from .conftest import record_count

APP = "{0a0b0c0d-1111-4222-8333-444455556666}"
PAYLOAD_SIZE = 256 << 10
SLOT_SIZE = 1 << 20
CASE_TIMEOUT = 20


# ---------------------------------------------------------------------------------------------- the server
class Hostile(DevServer):
    """The development server with two seams: ``on_check`` answers update checks (and, for redirects, every
    POST) and ``on_payload`` answers payload GETs; None means the ordinary answer."""

    on_check: Callable[["Hostile", web.Request], Awaitable[web.StreamResponse]] | None = None
    on_payload: Callable[["Hostile", web.Request], Awaitable[web.StreamResponse]] | None = None
    redirect_all_posts = False
    gate: asyncio.Semaphore | None = None  # when set, each update check waits for a permit (one case, one check)
    passed: set = set()

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/elsewhere", self.handle_update)
        app.router.add_get("/cdn/{name}", self.handle_payload)
        return app

    async def handle_update(self, request):
        body = await request.read()
        try:
            req = decode_request(body)
            is_check = any(a.updatecheck is not None for a in req.apps)
        except Exception:  # noqa: BLE001 - the agent's own requests always decode
            req, is_check = None, False
        if is_check and self.gate is not None and req.requestid not in self.passed:
            self.passed.add(req.requestid)  # a redirected check (same body) is the same check: it waits once
            await self.gate.acquire()
        if self.on_check is not None and request.path != "/elsewhere":  # where the redirect cases send it
            if self.redirect_all_posts or is_check:
                return await self.on_check(self, request)
        return await super().handle_update(request)

    async def handle_payload(self, request):
        if self.on_payload is not None and request.path.startswith("/packages/"):
            return await self.on_payload(self, request)
        return await super().handle_payload(request)

    async def hang(self) -> None:
        """Sends nothing more until the case is over (``normal``), at most 30 s: a stalled handler must not keep
        the server's shutdown waiting."""
        try:
            await asyncio.wait_for(self.released.wait(), 30)
        except asyncio.TimeoutError:
            pass

    def normal(self) -> None:
        self.released.set()
        self.on_check = self.on_payload = None
        self.redirect_all_posts = False


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------------------------- responses
def xml_response(app_inner: str, app_attrs: str = 'status="ok"', appid: str = APP) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?><response protocol="3.0" server="hostile">'
            '<daystart elapsed_seconds="100" elapsed_days="6000"/>'
            f'<app appid="{appid}" {app_attrs}>{app_inner}</app></response>')


def offer(srv: Hostile, *, version=None, size=None, sha256=None, codebase=None, name=None, pkg_attrs="",
          urls=None, packages=None, cohort=None, uc_attrs='status="ok"', manifest=True) -> str:
    img = srv.images[0]
    version = img.version if version is None else version
    size = img.size if size is None else size
    sha256 = img.sha256.hex() if sha256 is None else sha256
    name = img.name if name is None else name
    codebase = f"{srv.base}/packages/" if codebase is None else codebase
    urls = f'<urls><url codebase="{codebase}"/></urls>' if urls is None else urls
    pkg = f'<package name="{name}" size="{size}" hash_sha256="{sha256}" required="true" {pkg_attrs}/>'
    packages = pkg if packages is None else packages
    man = f'<manifest version="{version}"><packages>{packages}</packages></manifest>' if manifest else ""
    attrs = 'status="ok"' + (f' cohort="{cohort}"' if cohort is not None else "")
    return xml_response(f'<updatecheck {uc_attrs}>{urls}{man}</updatecheck>', attrs)


def answer(body, status=200, headers=None, ctype="text/xml"):
    async def handler(srv, request):
        text = body(srv) if callable(body) else body
        data = text.encode() if isinstance(text, str) else text
        return web.Response(status=status, body=data, headers=headers or {}, content_type=ctype)
    return handler


def offering(**kw):
    return answer(lambda srv: offer(srv, **kw))


def redirect(location, status=307):
    async def handler(srv, request):
        loc = location(srv) if callable(location) else location
        return web.Response(status=status, headers={"Location": loc} if loc is not None else {})
    return handler


async def stall(srv, request):
    await srv.hang()
    return web.Response(status=500)


async def reset_mid_answer(srv, request):
    resp = web.StreamResponse()
    resp.content_length = 4000
    await resp.prepare(request)
    await resp.write(b"<?xml version='1.0'?><response>")
    request.transport.abort()
    return resp


async def chunked_forever(srv, request):
    resp = web.StreamResponse()
    resp.content_type = "text/xml"
    await resp.prepare(request)
    await resp.write(b"<?xml version='1.0'?><response>")
    for _ in range(4000):  # 4000 x 1 KiB = 4 MB, no Content-Length: the 1 MiB cap must stop it
        await resp.write(b"<a/>" * 256)
    await resp.write_eof()
    return resp


def encoded_answer(body_fn, encoding="gzip", raw=False):
    async def handler(srv, request):
        data = body_fn(srv).encode() if not raw else body_fn(srv)
        if encoding == "gzip" and not raw:
            data = gzip.compress(data)
        return web.Response(body=data, headers={"Content-Encoding": encoding}, content_type="text/xml")
    return handler


def _gzip_bomb_answer(srv):
    return gzip.compress(b"<?xml version='1.0'?><response>" + b" " * (64 << 20), 9)


# ---------------------------------------------------------------------------------------------- payloads
def payload_bytes(srv) -> bytes:
    with open(srv.images[0].path, "rb") as f:
        return f.read()


def payload_answer(body_fn, status=200, headers=None):
    async def handler(srv, request):
        return web.Response(status=status, body=body_fn(srv), headers=headers or {},
                            content_type="application/octet-stream")
    return handler


def payload_status(status):
    async def handler(srv, request):
        return web.Response(status=status, text="no\n")
    return handler


async def payload_stall(srv, request):
    resp = web.StreamResponse()
    resp.content_length = srv.images[0].size
    await resp.prepare(request)
    await resp.write(payload_bytes(srv)[:1000])
    await srv.hang()
    request.transport.abort()
    return resp


async def payload_reset_always(srv, request):
    resp = web.StreamResponse()
    resp.content_length = srv.images[0].size
    await resp.prepare(request)
    request.transport.abort()
    return resp


async def payload_bad_content_range(srv, request):
    data = payload_bytes(srv)
    if "Range" in request.headers:
        return web.Response(status=206, body=data[1000:], headers={"Content-Range": f"bytes 1000-{len(data) - 1}/{len(data)}"})
    resp = web.StreamResponse()
    resp.content_length = len(data)
    await resp.prepare(request)
    await resp.write(data[:100_000])
    request.transport.abort()
    return resp


def payload_forced_gzip(cut_once=False):
    state = {"cut": cut_once}

    async def handler(srv, request):  # Content-Encoding whatever the client asked for
        body = gzip.compress(payload_bytes(srv))
        resp = web.StreamResponse(status=200)
        resp.content_length = len(body)
        resp.headers["Content-Encoding"] = "gzip"
        await resp.prepare(request)
        if state["cut"]:
            state["cut"] = False
            await resp.write(body[:len(body) // 2])
            request.transport.abort()
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp
    return handler


def payload_redirect(location, status=302):
    async def handler(srv, request):
        return web.Response(status=status, headers={"Location": location(srv) if callable(location) else location})
    return handler


def compressed_image(kind: str) -> Callable[[str], bytes]:
    def make(path_dir) -> bytes:
        if kind == "bomb":
            return gzip.compress(b"\0" * (8 << 20), 9)  # 8 MiB of zeros for a 1 MiB slot
        return b"\x1f\x8b\x08\x00" + os.urandom(4096)  # gzip magic, corrupt stream
    return make


# ---------------------------------------------------------------------------------------------- outside text
def raw(head: bytes):
    """A handler that answers with exactly these bytes (a status line and headers aiohttp would not send: bytes
    that are not UTF-8, control characters) and closes the connection."""
    async def handler(srv, request):
        request.transport.write(head)
        request.transport.close()
        return web.Response()  # (not sent: the connection is closed)
    return handler


def raw_status(reason: bytes, status: int = 503, extra: bytes = b""):
    return raw(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n%s\r\n" % (status, reason, extra))


def json_offer(srv: Hostile, *, version=None, name=None, codebase=None, app=None, uc=None, manifest_extra=None):
    """The offer as protocol 3.1 JSON (ensure_ascii: a lone surrogate and a control character go as \\u escapes,
    which JSON allows and XML does not)."""
    import json
    img = srv.images[0]
    package = {"name": img.name if name is None else name, "size": img.size, "hash_sha256": img.sha256.hex()}
    manifest = {"version": img.version if version is None else version, "packages": {"package": [package]},
                **(manifest_extra or {})}
    updatecheck = {"status": "ok", "urls": {"url": [{"codebase": f"{srv.base}/packages/" if codebase is None
                                                     else codebase}]}, "manifest": manifest}
    body = {"appid": APP, "status": "ok", "updatecheck": updatecheck if uc is None else uc, **(app or {})}
    return ")]}'\n" + json.dumps({"response": {"protocol": "3.1", "app": [body]}})


def json_answer(**kw):
    return answer(lambda srv: json_offer(srv, **kw), ctype="application/json")


ESC = "\x1b[31mRED\x1b[0m"
TEXT_CASES = [
    # the payload server's reason phrase (a mirror, a CDN, plain http)
    ("payload reason phrase with a C1 CSI byte", dict(on_payload=raw_status(b"Service \x9bUnavailable")), "HTTP 503"),
    ("payload reason phrase with ESC sequences", dict(on_payload=raw_status(b"Service \x1b[31mRED\x1b[0m")), "HTTP 503"),
    ("payload reason phrase not UTF-8", dict(on_payload=raw_status(b"\xff\xfe\xc3\x28 gone")), "HTTP 503"),
    ("payload reason phrase of 6000 bytes", dict(on_payload=raw_status(b"x" * 6000)), "HTTP 503"),
    ("payload reason phrase with U+2028 and bidi", dict(on_payload=raw_status("a\u2028b\u202ec".encode())), "HTTP 503"),
    # the update server's status line and answers
    ("check reason phrase with a C1 CSI byte", dict(on_check=raw_status(b"Service \x9bUnavailable")), "HTTP 503"),
    ("check updatecheck info with ESC (JSON)",
     dict(on_check=json_answer(uc={"status": "error-internal", "info": ESC})), "error-internal"),
    ("check updatecheck info with a lone surrogate (JSON)",
     dict(on_check=json_answer(uc={"status": "error-internal", "info": "a\udc9bb\ud800"})), "error-internal"),
    ("check updatecheck info of 600 KB (JSON)",
     dict(on_check=json_answer(uc={"status": "error-internal", "info": "\u009b" * 100_000})), "error-internal"),
    ("check updatecheck status with ESC and a surrogate (JSON)",
     dict(on_check=json_answer(uc={"status": "error-\x1b[2J\udcff"})), "updatecheck status"),
    ("check app status with ESC (JSON)", dict(on_check=json_answer(app={"status": "error-" + ESC})), "refused app"),
    ("check updatecheck info with C1 controls (XML)",
     dict(on_check=answer(xml_response('<updatecheck status="error-internal" info="a\u009b[31mb\u0085c"/>'))),
     "error-internal"),
    ("check unknown attribute names with ESC (JSON)",
     dict(on_check=json_answer(version="", manifest_extra={"\x1b]0;title\x07": "x", "\udc9b": "y"})), "no version"),
    ("check root element named with ESC (JSON)",
     dict(on_check=answer(")]}'\n" + '{"\\u001b[31m": {}}', ctype="application/json")), "unusable answer"),
    ("check redirect Location with ESC", dict(on_check=raw(b"HTTP/1.1 307 Moved\r\nLocation: http://127.0.0.1:1/\x1b[2J"
                                                           b"\r\nContent-Length: 0\r\n\r\n")), "refused a redirect"),
    ("check redirect Location not UTF-8", dict(on_check=raw(b"HTTP/1.1 307 Moved\r\nLocation: http://127.0.0.1:1/\xff\x9b"
                                                            b"\r\nContent-Length: 0\r\n\r\n")), "refused a redirect"),
    # versions, file names and URLs an offer names
    ("offer version with ESC (JSON)", dict(on_check=json_answer(version="2.0.0\n" + ESC)), "not a version"),
    ("offer version with a lone surrogate (JSON)", dict(on_check=json_answer(version="2.0.\udc9b")), "not a version"),
    ("offer version of 512 KB (JSON)", dict(on_check=json_answer(version="2." + "1" * (512 << 10))), "not a version"),
    ("offer package name with ESC (JSON)", dict(on_check=json_answer(name="p\x1b[2J.img")), "is not a URL"),
    ("offer package name with a lone surrogate (JSON)", dict(on_check=json_answer(name="p\udc9b.img")), "is not a URL"),
    ("offer codebase with a C1 CSI (XML)", dict(on_check=offering(codebase="http://127.0.0.1/\u009b[31m/")),
     "is not a URL"),
    ("payload Content-Encoding with ESC on a resumed body", dict(on_payload=raw(
        b"HTTP/1.1 206 Partial\r\nContent-Encoding: \x1b[31mx\xff\r\nContent-Range: bytes 0-9/10\r\n"
        b"Content-Length: 10\r\n\r\n0123456789")), "download failed"),
]


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    name: str
    expect: str = "fail"  # fail: must not install; ok: must install the right bytes; any: either, if right
    on_check: Callable | None = None
    on_payload: Callable | None = None
    redirect_all_posts: bool = False
    image: Callable[[str], bytes] | None = None  # a hostile payload file served with its own (true) hash
    says: str = ""  # the reason must contain this
    text: bool = False  # a case of outside text (counted apart: TEXT_CASES)


def closed(srv) -> str:
    return f"http://127.0.0.1:{closed_port()}/x/"


CASES = [
    # -- answers to the update check
    Case("check HTTP 500", on_check=answer("boom", 500), says="HTTP 500"),
    Case("check HTTP 503 + X-Retry-After", on_check=answer("", 503, {"X-Retry-After": "99999999999999"}), says="HTTP 503"),
    Case("check HTTP 404", on_check=answer("", 404), says="HTTP 404"),
    Case("check empty body", on_check=answer(""), says="empty body"),
    Case("check junk text", on_check=answer("hello world"), says="neither XML nor JSON"),
    Case("check truncated XML", on_check=answer(lambda s: offer(s)[:120]), says="malformed XML"),
    Case("check billion laughs", on_check=answer('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">'
                                                  '<!ENTITY b "&a;&a;&a;&a;">]><response>&b;</response>'), says="refused"),
    Case("check external entity", on_check=answer('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM '
                                                   '"file:///etc/passwd">]><response>&x;</response>'), says="refused"),
    Case("check 2 MiB body", on_check=answer(lambda s: offer(s) + " " * (2 << 20)), says="limit"),
    Case("check 4 MB chunked body", on_check=chunked_forever, says="limit"),
    Case("check nested 100 deep", on_check=answer("<response>" + "<a>" * 100 + "</a>" * 100 + "</response>"), says="deeper"),
    Case("check 20000 elements", on_check=answer("<response>" + "<a/>" * 20000 + "</response>"), says="elements"),
    Case("check JSON nested 100000 deep", on_check=answer(")]}'\n" + '{"response":' + "[" * 100000 + "]" * 100000 + "}",
                                                          ctype="application/json"), says="unusable answer"),
    Case("check JSON 5000-digit number", on_check=answer('{"response": {"protocol": ' + "9" * 5000 + "}}",
                                                         ctype="application/json"), says="unusable answer"),
    Case("check invalid UTF-8", on_check=answer(b"<?xml version='1.0' encoding='UTF-8'?><response \xff\xfe/>"),
         says="unusable answer"),
    Case("check wrong root element", on_check=answer("<request protocol='3.0'/>"), says="expected <response>"),
    Case("check answers another app", on_check=answer(xml_response("<updatecheck status='noupdate'/>", appid="{other}")),
         says="did not answer for app"),
    Case("check app status error-unknownApplication",
         on_check=answer(xml_response("", 'status="error-unknownApplication"')), says="refused app"),
    Case("check updatecheck error-internal", on_check=answer(xml_response('<updatecheck status="error-internal"/>')),
         says="error-internal"),
    Case("check status with a newline", on_check=answer(xml_response('<updatecheck status="error-x&#10;second line"/>')),
         says="error-x"),
    Case("check ok without manifest", on_check=offering(manifest=False), says="no <manifest>"),
    Case("offer without version", on_check=offering(version=""), says="no version"),
    Case("offer version of 5000 digits", on_check=offering(version="9" * 5000), says="not a version"),
    Case("offer version of 200 characters", on_check=offering(version="2." + "1" * 198), says="not a version"),
    Case("offer version with control characters", on_check=offering(version="2.0&#9;&#133;x"), says="not a version"),
    Case("offer without packages", on_check=offering(packages=""), says="packages"),
    Case("offer size 0 with the hash of nothing", on_check=offering(size=0, sha256=hashlib.sha256(b"").hexdigest()),
         says="size 0"),
    Case("offer size negative", on_check=offering(size=-5), says="below 0"),
    Case("offer size not a number", on_check=offering(size="lots"), says="not an integer"),
    Case("offer size of 21 digits", on_check=offering(size="1" * 21), says="not an integer"),
    Case("offer size larger than the slot", on_check=offering(size=10 << 20), says="larger than slot"),
    Case("offer size 1 byte short", on_check=offering(size=PAYLOAD_SIZE - 1), says="more than the promised"),
    Case("offer size 1 byte long", on_check=offering(size=PAYLOAD_SIZE + 1), says="promised"),
    Case("offer without any hash", on_check=offering(sha256=""), says="no usable hash"),
    Case("offer hash_sha256 garbage", on_check=offering(sha256="zz" * 40), says="hash_sha256"),
    Case("offer hash of other bytes", on_check=offering(sha256=hashlib.sha256(b"other").hexdigest()), says="SHA-256 mismatch"),
    Case("offer SHA-256 values disagree", on_check=offering(pkg_attrs=f'fp="1.{"ab" * 32}"'), says="disagree"),
    Case("offer wrong SHA-1 beside a right SHA-256", on_check=offering(pkg_attrs=f'hash="{"00" * 20}"'), says="SHA-1 mismatch"),
    Case("offer without URLs", on_check=offering(urls=""), says="download URLs"),
    Case("offer file:// codebase", on_check=offering(codebase="file:///etc/"), says="not an http(s) URL"),
    Case("offer ftp:// codebase", on_check=offering(codebase="ftp://127.0.0.1/"), says="not an http(s) URL"),
    Case("offer metadata-address codebase", on_check=offering(codebase="http://169.254.169.254/latest/"), says="link-local"),
    Case("offer IPv6 link-local codebase", on_check=offering(codebase="http://[fe80::1]/"), says="link-local"),
    Case("offer invalid codebase URL", on_check=offering(codebase="http://[::1/"), says="not a valid URL"),
    Case("offer codebase on a closed local port", on_check=answer(lambda s: offer(s, codebase=closed(s))),
         says="download failed"),
    Case("offer of two packages", on_check=answer(lambda s: offer(s, packages=(
        f'<package name="{s.images[0].name}" size="{s.images[0].size}" hash_sha256="{s.images[0].sha256.hex()}"/>' * 2))),
         says="2 packages"),
    Case("offer with a 900 KB cohort", expect="ok", on_check=offering(cohort="c" * 900_000)),
    Case("offer with a control-character cohort", expect="ok", on_check=offering(cohort="a&#10;b")),
    Case("check never answers", on_check=stall, says="timed out"),
    Case("check connection reset mid-answer", on_check=reset_mid_answer, says="closed before the end of the body"),
    # -- payload downloads
    Case("payload HTTP 404", on_payload=payload_status(404), says="HTTP 404"),
    Case("payload HTTP 500", on_payload=payload_status(500), says="HTTP 500"),
    Case("payload HTTP 416 always", on_payload=payload_status(416), says="HTTP 416"),
    Case("payload short body", on_payload=payload_answer(lambda s: payload_bytes(s)[:1000]), says="promised"),
    Case("payload longer than promised", on_payload=payload_answer(lambda s: payload_bytes(s) + b"x" * 5000),
         says="more than the promised"),
    Case("payload other bytes of the same size", on_payload=payload_answer(lambda s: os.urandom(PAYLOAD_SIZE)),
         says="SHA-256 mismatch"),
    Case("payload stalls after 1000 bytes", on_payload=payload_stall, says="timed out"),
    Case("payload reset before any byte, always", on_payload=payload_reset_always, says="download failed"),
    Case("payload 206 at the wrong offset after a cut", on_payload=payload_bad_content_range, says="resumed at byte"),
    Case("payload gzip-encoded whatever was asked", expect="any", on_payload=payload_forced_gzip()),
    Case("payload gzip-encoded and cut once", expect="any", on_payload=payload_forced_gzip(cut_once=True)),
    Case("payload Content-Encoding br on raw bytes", expect="any",
         on_payload=payload_answer(payload_bytes, headers={"Content-Encoding": "br"})),
    Case("payload Content-Encoding gzip on raw bytes", on_payload=payload_answer(payload_bytes, headers={"Content-Encoding": "gzip"}),
         says="Content-Encoding gzip does not decode"),
    Case("payload gzip bomb (8 MiB for a 1 MiB slot)", image=compressed_image("bomb"), says="beyond the slot"),
    Case("payload corrupt gzip stream", image=compressed_image("corrupt"), says="corrupt"),
    # -- redirects
    Case("check 307 to the same server", expect="ok", redirect_all_posts=True,
         on_check=redirect(lambda s: f"{s.base}/elsewhere")),
    Case("check 308 relative Location", expect="ok", redirect_all_posts=True, on_check=redirect("/elsewhere", 308)),
    Case("check redirect loop", redirect_all_posts=True, on_check=redirect(lambda s: s.url), says="more than 5 times"),
    Case("check redirect to file://", on_check=redirect("file:///etc/passwd"), says="refused a redirect"),
    Case("check redirect to the metadata address", on_check=redirect("http://169.254.169.254/latest/meta-data/"),
         says="link-local"),
    Case("check redirect to ftp://", on_check=redirect("ftp://127.0.0.1:1/"), says="refused a redirect"),
    Case("check redirect without Location", on_check=redirect(None), says="no Location"),
    Case("check redirect to an invalid URL", on_check=redirect("http://[::1/"), says="not a valid URL"),
    Case("check redirect to a closed local port", on_check=redirect(closed), says="cannot reach"),
    Case("payload 302 to the same server", expect="ok",
         on_payload=payload_redirect(lambda s: f"{s.base}/cdn/{s.images[0].name}")),
    Case("payload redirect loop", on_payload=payload_redirect(lambda s: f"{s.base}/packages/{s.images[0].name}"),
         says="more than 5 times"),
    Case("payload redirect to the metadata address", on_payload=payload_redirect("http://169.254.169.254/img"),
         says="link-local"),
    Case("payload redirect to file://", on_payload=payload_redirect("file:///etc/shadow"), says="refused a redirect"),
    Case("payload redirect to a closed local port", on_payload=payload_redirect(closed), says="download failed"),
    # -- encodings of the check answer
    Case("check answer gzip-encoded", expect="ok", on_check=encoded_answer(offer)),
    Case("check answer says gzip, is not", on_check=encoded_answer(lambda s: b"<response/>", raw=True),
         says="Content-Encoding gzip does not decode"),
    Case("check answer gzip bomb (64 MiB)", on_check=encoded_answer(_gzip_bomb_answer, raw=True), says="limit"),
    Case("check answer deflate garbage", on_check=encoded_answer(lambda s: zlib.compress(b"x")[:3], "deflate", raw=True),
         says="cannot reach"),
] + [Case("text: " + name, says=says, text=True, **kw) for name, kw, says in TEXT_CASES]


# ---------------------------------------------------------------------------------------------- running a case
def _config(tmp, url: str) -> str:
    return f"""server: {{url: "{url}", insecure_http: true, timeout: 2}}
app: {{id: "{APP}", version: "1.0.0"}}
slots:
  a: {{file: {tmp}/slot-a.img}}
  b: {{file: {tmp}/slot-b.img}}
boot: {{backend: sim, env: {tmp}/bootenv.json, tries: 2}}
state_dir: {tmp}/state
health: {{after: start}}
install: {{read_timeout: 1}}
trust: {{require_signature: false}}
dbus: {{enabled: false}}
"""


@dataclass
class Verdict:
    case: str
    problems: list[str] = field(default_factory=list)
    reason: str = ""


async def _run(config) -> tuple[str | None, str | None, str | None]:
    """(success message, one-line failure, misbehaviour) of one ``run_once``."""
    try:
        return await asyncio.wait_for(Agent(config).run_once(), CASE_TIMEOUT), None, None
    except AgentError as exc:
        return None, str(exc), None
    except asyncio.TimeoutError:
        return None, None, f"no result within {CASE_TIMEOUT} s"
    except BaseException as exc:  # noqa: BLE001 - anything else escaping is what the matrix looks for
        return None, None, f"{type(exc).__name__} escaped: {str(exc)[:200]}"


def _digest(path: str, size: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size) if size else f.read()).hexdigest()


def _text_problems(reason: str, state_file: str) -> list[str]:
    """What is wrong with the outside text the run left: the reason and the saved LastError must be clean
    (valid printable UTF-8, bounded: ``text.clean``), and the state file must load without repairs."""
    import json

    from agent.state import from_json
    from agent.text import is_clean
    problems = []
    if not is_clean(reason, 2000):
        problems.append(f"the reason is not clean text: {reason[:200]!r}")
    try:
        with open(state_file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return problems
    if not is_clean(data.get("last_error", ""), 2000):
        problems.append(f"LastError is saved as text that is not clean: {data['last_error'][:200]!r}")
    if from_json(data)[1]:
        problems.append(f"the saved state needs repairs on load: {from_json(data)[1]}")
    return problems


async def run_case(case: Case, tmp) -> Verdict:
    v = Verdict(case.name)
    os.makedirs(tmp)
    slots = {s: f"{tmp}/slot-{s}.img" for s in "ab"}
    with open(slots["a"], "wb") as f:
        f.write(b"RUNNING SYSTEM " * 1000)
        f.truncate(SLOT_SIZE)
    with open(slots["b"], "wb") as f:
        f.write(b"STALE OLD IMAGE " * 1000)
        f.truncate(SLOT_SIZE)
    boot = SimBoot(f"{tmp}/bootenv.json", slots)
    boot.initialize("a", "1.0.0")
    a_before = _digest(slots["a"])
    payload = f"{tmp}/p.img"
    with open(payload, "wb") as f:
        f.write(case.image(tmp) if case.image else b"IMAGE" + os.urandom(PAYLOAD_SIZE - 5))
    srv = Hostile([Image(payload, "2.0.0", APP)])
    srv.released = asyncio.Event()
    srv.on_check, srv.on_payload, srv.redirect_all_posts = case.on_check, case.on_payload, case.redirect_all_posts
    await srv.start()
    try:
        config = parse(_config(tmp, srv.url), f"{tmp}/agent.yaml")
        ok, failed, wrong = await _run(config)
        if wrong:
            v.problems.append(wrong)
        reason = ok or failed or ""
        v.reason = reason
        if "\n" in reason or len(reason) > 1000:
            v.problems.append(f"the reason is not one short line: {reason[:300]!r}")
        status = boot.status()
        if boot.booted_slot() != "a" or status["a"].state is not SlotState.GOOD or _digest(slots["a"]) != a_before:
            v.problems.append("the booted slot a was touched")
        b_trial = status["b"].state is SlotState.TRIAL
        right = srv.images[0]
        if b_trial and _digest(slots["b"], right.size) != right.sha256.hex():
            v.problems.append("slot b is set for a trial with wrong bytes")
        if case.expect == "fail" and (b_trial or ok is not None):
            v.problems.append(f"expected a refusal, got {reason[:200]!r} (b trial: {b_trial})")
        if case.expect == "ok" and not (b_trial and ok and "installed 2.0.0" in ok):
            v.problems.append(f"expected an install, got {reason[:200]!r}")
        if case.says and case.says not in reason:
            v.problems.append(f"the reason does not say {case.says!r}: {reason[:300]!r}")
        v.problems += _text_problems(reason, f"{tmp}/state/state.json")
        # the agent keeps working: a well-behaved server, a new version
        srv.normal()
        image3 = f"{tmp}/p3.img"
        with open(image3, "wb") as f:
            f.write(b"THREE" + os.urandom(PAYLOAD_SIZE - 5))
        srv.images = [Image(image3, "3.0.0", APP)]
        ok2, failed2, wrong2 = await _run(config)
        if wrong2:
            v.problems.append(f"afterwards: {wrong2}")
        elif not b_trial:
            if not (ok2 and "installed 3.0.0" in ok2 and boot.status()["b"].state is SlotState.TRIAL
                    and _digest(slots["b"], srv.images[0].size) == srv.images[0].sha256.hex()):
                v.problems.append(f"afterwards the agent did not install 3.0.0: {(ok2 or failed2 or '')[:300]!r}")
    finally:
        await srv.stop()
    return v


async def test_hostile_server_matrix_every_case_is_refused_cleanly_or_installs_the_right_bytes(tmp_path, monkeypatch):
    outside = []
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1"):
            outside.append(host)
            raise OSError(f"test guard: no connection to {host} outside 127.0.0.1")
        return real_connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", guarded)

    started = time.monotonic()
    verdicts = []
    took = []
    for i, case in enumerate(CASES):
        t0 = time.monotonic()
        verdicts.append(await run_case(case, str(tmp_path / f"case{i:03d}")))
        took.append((round(time.monotonic() - t0, 1), case.name))
    bad = [v for v in verdicts if v.problems]
    record_count("hostile-server matrix", f"{len(verdicts)} cases, {len(bad)} misbehaved "
                                          f"({time.monotonic() - started:.0f} s)")
    print(f"hostile-server matrix: {len(verdicts)} cases, {len(bad)} misbehaved")
    text = [v for v, c in zip(verdicts, CASES) if c.text]
    record_count("hostile-server matrix, outside text", f"{len(text)} cases (non-UTF-8, surrogates, escapes, "
                                                        f"lengths), {len([v for v in text if v.problems])} misbehaved")
    print(f"hostile-server matrix, outside text: {len(text)} cases, {len([v for v in text if v.problems])} "
          "misbehaved")
    assert len(CASES) >= 60
    assert not outside, f"connections outside 127.0.0.1 were attempted: {outside}"
    assert not bad, "\n".join(f"{v.case}: {'; '.join(v.problems)}" for v in bad)
    assert max(took)[0] < CASE_TIMEOUT, f"slowest cases: {sorted(took, reverse=True)[:3]}"


class VirtualClock:
    """Wall-clock time that moves only when the daemon sleeps: the forever loop's backoffs (and an X-Retry-After
    of a day) pass at once, so every case of the table gets its own scheduled check within seconds."""

    def __init__(self):
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    async def sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        if wake is None or not wake.is_set():
            self.offset += max(0.0, seconds)
        await asyncio.sleep(0.001)


async def test_the_forever_daemon_survives_every_refused_case_in_turn_and_then_installs(tmp_path, monkeypatch):
    import logging

    from agent.daemon import Agent as Daemon
    failing = [c for c in CASES if c.expect == "fail" and c.image is None]
    tmp = str(tmp_path)
    slots = {s: f"{tmp}/slot-{s}.img" for s in "ab"}
    for path in slots.values():
        with open(path, "wb") as f:
            f.truncate(SLOT_SIZE)
    boot = SimBoot(f"{tmp}/bootenv.json", slots)
    boot.initialize("a", "1.0.0")
    with open(f"{tmp}/p.img", "wb") as f:
        f.write(b"IMAGE" + os.urandom(PAYLOAD_SIZE - 5))
    srv = Hostile([Image(f"{tmp}/p.img", "2.0.0", APP)])
    srv.released = asyncio.Event()
    srv.gate, srv.passed = asyncio.Semaphore(0), set()
    await srv.start()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    handler = Keep(logging.INFO)
    logger = logging.getLogger("omaha-agent")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    async def next_line(start: int, needle: str, limit: float = CASE_TIMEOUT) -> int:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for i in range(start, len(records)):
                if needle in records[i].getMessage():
                    return i + 1
            assert not daemon.done(), f"the daemon stopped: {daemon.exception() if not daemon.cancelled() else 'cancelled'}"
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {needle!r} within {limit} s; last: {[r.getMessage()[:200] for r in records[-5:]]}")

    config = parse(_config(tmp, srv.url).replace("dbus: {enabled: false}", "dbus: {enabled: false}\nschedule: "
                                                  "{initial_delay: 0, interval: 3600, backoff_base: 1}"), f"{tmp}/agent.yaml")
    agent = Daemon(config, clock=VirtualClock())
    stop = asyncio.Event()
    daemon = asyncio.ensure_future(agent.run_forever(stop))
    try:
        seen, reasons = 0, []
        for i, case in enumerate(failing):  # one check per case: the server lets one through per case
            srv.released.set()
            srv.released = asyncio.Event()
            srv.images = [Image(f"{tmp}/p.img", f"2.0.{i}", APP)]  # a version refused by a hash is blocked
            srv.on_check, srv.on_payload, srv.redirect_all_posts = case.on_check, case.on_payload, case.redirect_all_posts
            srv.gate.release()
            seen = await next_line(seen, "check failed:")
            reasons.append(records[seen - 1].getMessage())
        srv.released.set()
        srv.normal()
        for _ in range(100):  # a check already waiting at the gate goes on (and the server can stop at once)
            srv.gate.release()
        srv.gate = None
        with open(f"{tmp}/p3.img", "wb") as f:
            f.write(b"THREE" + os.urandom(PAYLOAD_SIZE - 5))
        srv.images = [Image(f"{tmp}/p3.img", "3.0.0", APP)]
        await next_line(seen, "installed 3.0.0 on slot b")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.shield(daemon), 30)
        await srv.stop()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    unexpected = [r.getMessage()[:200] for r in records if "unexpectedly" in r.getMessage() or r.exc_info]
    assert not unexpected, unexpected
    mismatched = [(c.name, why[:200]) for c, why in zip(failing, reasons) if c.says not in why]
    assert not mismatched, mismatched  # each check met its own case: the reason is the one the matrix expects
    assert boot.booted_slot() == "a" and boot.status()["a"].state is SlotState.GOOD
    assert boot.status()["b"].state is SlotState.TRIAL and _digest(slots["b"], srv.images[0].size) == srv.images[0].sha256.hex()
    record_count("forever daemon through the refused cases", f"{len(failing)} cases in turn, still running, then installed")
