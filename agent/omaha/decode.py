"""Decoding responses (and, for the development server, requests) in both dialects.

XML is parsed only through defusedxml: DTDs, entities and external references are refused. The body is
capped in bytes, elements and depth. JSON loses its ``)]}'`` prefix and is mapped onto the same element
tree as XML (scalars become attributes, objects and lists become child elements), so one builder makes the
model from either. Unknown elements and attributes are ignored; missing ones take their defaults.
Anything wrong raises ``ProtocolError`` naming the element; nothing else escapes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, ParseError

from .model import (
    Action, App, Data, DayStart, Event, Hw, Manifest, Os, Package, Ping, ProtocolError, Request, Response,
    ResponseApp, ResponseData, ResponseUpdateCheck, UpdateCheck, Url,
)

MAX_BYTES = 1 << 20
MAX_ELEMENTS = 10_000
MAX_DEPTH = 32


@dataclass
class Node:
    name: str
    attrs: dict[str, str]
    path: str
    children: list["Node"] = field(default_factory=list)
    text: str = ""

    def all(self, name: str) -> list["Node"]:
        return [c for c in self.children if c.name == name]

    def one(self, name: str) -> "Node | None":
        for c in self.children:
            if c.name == name:
                return c
        return None


@dataclass(frozen=True)
class Limits:
    max_bytes: int = MAX_BYTES
    max_elements: int = MAX_ELEMENTS
    max_depth: int = MAX_DEPTH


class _TreeTarget:
    """expat target building ``Node``s, refusing documents that exceed the limits as it goes."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.stack: list[Node] = []
        self.root: Node | None = None
        self.count = 0

    def start(self, tag, attrs):
        self.count += 1
        if self.count > self.limits.max_elements:
            raise ProtocolError(f"more than {self.limits.max_elements} elements")
        if len(self.stack) >= self.limits.max_depth:
            raise ProtocolError(f"elements nested deeper than {self.limits.max_depth}")
        name = tag.rsplit("}", 1)[-1]
        parent = self.stack[-1] if self.stack else None
        node = Node(name, {k.rsplit("}", 1)[-1]: v for k, v in attrs.items()},
                    f"{parent.path}/{name}" if parent else name)
        if parent is None:
            if self.root is not None:
                raise ProtocolError("more than one root element")
            self.root = node
        else:
            parent.children.append(node)
        self.stack.append(node)

    def end(self, tag):
        self.stack.pop()

    def data(self, text):
        if self.stack:
            self.stack[-1].text += text

    def close(self):
        return self.root


def _check_size(body: bytes, limits: Limits) -> None:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"body must be bytes, not {type(body).__name__}")
    if len(body) > limits.max_bytes:
        raise ProtocolError(f"body of {len(body)} bytes is over the {limits.max_bytes}-byte limit")


def parse_xml(body: bytes, limits: Limits = Limits()) -> Node:
    _check_size(body, limits)
    data = bytes(body).lstrip(b"\xef\xbb\xbf").lstrip()  # a BOM or stray blank before <?xml is common
    target = _TreeTarget(limits)
    parser = DefusedXMLParser(target=target, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    try:
        parser.feed(data)
        root = parser.close()
    except ProtocolError:
        raise
    except DefusedXmlException as exc:
        raise ProtocolError(f"refused XML construct: {type(exc).__name__}") from None
    except ParseError as exc:
        raise ProtocolError(f"malformed XML: {exc}") from None
    except (ValueError, TypeError, LookupError, RecursionError, MemoryError) as exc:
        raise ProtocolError(f"malformed XML: {exc}") from None
    if root is None:
        raise ProtocolError("empty XML document")
    return root


def _json_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


def _json_to_node(name: str, obj, path: str, budget: list[int], limits: Limits, depth: int) -> Node:
    budget[0] += 1
    if budget[0] > limits.max_elements:
        raise ProtocolError(f"more than {limits.max_elements} elements")
    if depth > limits.max_depth:
        raise ProtocolError(f"elements nested deeper than {limits.max_depth}")
    if not isinstance(obj, dict):
        raise ProtocolError(f"{path}: expected an object, got {type(obj).__name__}")
    node = Node(name, {}, path)
    for key, value in obj.items():
        if key == "#text":
            node.text = _json_scalar(value)
        elif isinstance(value, dict):
            node.children.append(_json_to_node(key, value, f"{path}/{key}", budget, limits, depth + 1))
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    node.children.append(_json_to_node(key, item, f"{path}/{key}", budget, limits, depth + 1))
                elif isinstance(item, list):
                    raise ProtocolError(f"{path}/{key}: nested lists are not part of the protocol")
                else:  # a list of scalars: keep the first as an attribute
                    node.attrs.setdefault(key, _json_scalar(item))
        else:
            node.attrs[key] = _json_scalar(value)
    return node


def parse_json(body: bytes, limits: Limits = Limits()) -> Node:
    _check_size(body, limits)
    data = bytes(body).lstrip(b"\xef\xbb\xbf").lstrip()
    if data.startswith(b")]}'"):
        data = data[4:]
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ProtocolError("JSON body must be one object with a single member (request or response)")
    (name, inner), = obj.items()
    return _json_to_node(name, inner, name, [0], limits, 1)


def parse(body: bytes, limits: Limits = Limits()) -> Node:
    """Parse either dialect, told apart by the first byte of the body."""
    _check_size(body, limits)
    head = bytes(body[:64]).lstrip(b"\xef\xbb\xbf").lstrip()
    if head[:1] in (b"{", b")"):
        return parse_json(body, limits)
    if head[:1] == b"<":
        return parse_xml(body, limits)
    raise ProtocolError("body is neither XML nor JSON" if head else "empty body")


# ---------------------------------------------------------------- attribute readers


def _str(node: Node, name: str, default: str = "") -> str:
    return node.attrs.get(name, default)


def _opt_str(node: Node, name: str) -> str | None:
    return node.attrs.get(name)


def _int(node: Node, name: str, default: int | None = None, minimum: int | None = None) -> int | None:
    raw = node.attrs.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    sign = text[:1] in "+-"
    if not (text[int(sign):].isascii() and text[int(sign):].isdigit()) or len(text) > 20:
        raise ProtocolError(f"{node.path}: {name}={raw[:40]!r} is not an integer")
    value = int(text)
    if minimum is not None and value < minimum:
        raise ProtocolError(f"{node.path}: {name}={value} is below {minimum}")
    return value


def _bool(node: Node, name: str, default: bool = False) -> bool:
    raw = node.attrs.get(name)
    if raw is None:
        return default
    text = raw.strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    return default


def _extras(node: Node, known: set[str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in node.attrs.items() if k not in known)


def _expect_root(root: Node, name: str) -> None:
    if root.name != name:
        raise ProtocolError(f"root element is <{root.name}>, expected <{name}>")


# ---------------------------------------------------------------- responses


def _package(node: Node) -> Package:
    return Package(
        name=_str(node, "name"), namediff=_str(node, "namediff"), required=_bool(node, "required"),
        size=_int(node, "size", None, 0), sizediff=_int(node, "sizediff", None, 0),
        hash=_str(node, "hash"), hashdiff=_str(node, "hashdiff"), hash_sha256=_str(node, "hash_sha256"),
        hashdiff_sha256=_str(node, "hashdiff_sha256"), fp=_str(node, "fp"), extra=_extras(node, _PACKAGE_KNOWN),
    )


_PACKAGE_KNOWN = {"name", "namediff", "required", "size", "sizediff", "hash", "hashdiff", "hash_sha256",
                  "hashdiff_sha256", "fp"}


_ACTION_KNOWN = {"event", "run", "arguments", "successurl", "terminateallbrowsers", "successaction"}


def _action(node: Node) -> Action:
    return Action(
        event=_str(node, "event"), run=_str(node, "run"), arguments=_str(node, "arguments"),
        successurl=_str(node, "successurl"), terminateallbrowsers=_bool(node, "terminateallbrowsers"),
        successaction=_str(node, "successaction"), extra=_extras(node, _ACTION_KNOWN),
    )


def _updatecheck(node: Node) -> ResponseUpdateCheck:
    urls = tuple(Url(codebase=_str(u, "codebase"), codebasediff=_str(u, "codebasediff"))
                 for holder in node.all("urls") for u in holder.all("url"))
    manifest = None
    man = node.one("manifest")
    actions: list[Action] = [_action(a) for holder in node.all("actions") for a in holder.all("action")]
    actions += [_action(a) for a in node.all("action")]  # 3.1 JSON puts a list of actions here
    if man is not None:
        actions = [_action(a) for holder in man.all("actions") for a in holder.all("action")] + actions
        manifest = Manifest(
            version=_str(man, "version"),
            packages=tuple(_package(p) for holder in man.all("packages") for p in holder.all("package")),
            actions=tuple(actions), extra=_extras(man, {"version"}),
        )
    return ResponseUpdateCheck(
        status=_str(node, "status"), info=_str(node, "info"), urls=urls, manifest=manifest,
        extra=_extras(node, {"status", "info"}),
    )


def _response_app(node: Node) -> ResponseApp:
    if "appid" not in node.attrs:
        raise ProtocolError(f"{node.path}: appid is missing")
    ping = node.one("ping")
    uc = node.one("updatecheck")
    return ResponseApp(
        appid=_str(node, "appid"), status=_str(node, "status", "ok"), experiments=_str(node, "experiments"),
        cohort=_opt_str(node, "cohort"), cohorthint=_opt_str(node, "cohorthint"),
        cohortname=_opt_str(node, "cohortname"),
        ping_status=_opt_str(ping, "status") if ping is not None else None,
        updatecheck=_updatecheck(uc) if uc is not None else None,
        event_statuses=tuple(_str(e, "status") for e in node.all("event")),
        data=tuple(ResponseData(name=_str(d, "name"), index=_str(d, "index", "0"), status=_str(d, "status", "ok"),
                                text=d.text.strip()) for d in node.all("data")),
    )


def response_from_tree(root: Node) -> Response:
    _expect_root(root, "response")
    ds = root.one("daystart") or root.one("clock")
    daystart = DayStart(_int(ds, "elapsed_seconds", None, 0), _int(ds, "elapsed_days", None, 0)) \
        if ds is not None else DayStart()
    return Response(
        protocol=_str(root, "protocol"), server=_str(root, "server"), daystart=daystart,
        apps=tuple(_response_app(a) for a in root.all("app")),
    )


def decode_response(body: bytes, limits: Limits = Limits()) -> Response:
    """A ``Response`` from an XML or JSON body; ``ProtocolError`` for anything that is not one."""
    return _guard(lambda: response_from_tree(parse(body, limits)))


# ---------------------------------------------------------------- requests (the development server's side)


def _event(node: Node) -> Event:
    if "eventtype" not in node.attrs:
        raise ProtocolError(f"{node.path}: eventtype is missing")
    i = lambda name, default: _int(node, name, default)  # noqa: E731
    return Event(
        eventtype=i("eventtype", 0), eventresult=i("eventresult", 0), errorcode=i("errorcode", 0),
        extracode1=i("extracode1", 0), errorcat=i("errorcat", 0), download_time_ms=i("download_time_ms", 0),
        downloaded=i("downloaded", 0), downloader=_str(node, "downloader"), total=i("total", 0),
        update_check_time_ms=i("update_check_time_ms", 0), install_time_ms=i("install_time_ms", 0),
        source_url_index=i("source_url_index", None), state_cancelled=i("state_cancelled", 0),
        time_since_update_available_ms=i("time_since_update_available_ms", -2),
        time_since_download_start_ms=i("time_since_download_start_ms", -2), url=_str(node, "url"),
        nextversion=_str(node, "nextversion", "0.0.0.0"), previousversion=_str(node, "previousversion", "0.0.0.0"),
        nextfp=_str(node, "nextfp"), previousfp=_str(node, "previousfp"),
    )


def _request_app(node: Node) -> App:
    if "appid" not in node.attrs:
        raise ProtocolError(f"{node.path}: appid is missing")
    ping = node.one("ping")
    uc = node.one("updatecheck")
    delta = node.attrs.get("delta_okay")
    return App(
        appid=_str(node, "appid"), version=_str(node, "version", "0.0.0.0"), lang=_str(node, "lang"),
        brand=_str(node, "brand"), client=_str(node, "client"), enabled=_int(node, "enabled", -1),
        experiments=_str(node, "experiments"), iid=_str(node, "iid"), installage=_int(node, "installage", 0),
        installdate=_int(node, "installdate", -2), installsource=_str(node, "installsource"),
        ismachine=_int(node, "ismachine", -1), tag=_str(node, "tag"), fp=_str(node, "fp"),
        cohort=_str(node, "cohort"), cohorthint=_str(node, "cohorthint"), cohortname=_str(node, "cohortname"),
        release_channel=_str(node, "release_channel"), track=_opt_str(node, "track"),
        board=_opt_str(node, "board"), hardware_class=_opt_str(node, "hardware_class"),
        delta_okay=None if delta is None else _bool(node, "delta_okay"), machineid=_opt_str(node, "machineid"),
        bootid=_opt_str(node, "bootid"), oem=_opt_str(node, "oem"), oemversion=_opt_str(node, "oemversion"),
        alephversion=_opt_str(node, "alephversion"),
        ping=None if ping is None else Ping(
            active=_int(ping, "active", 0), a=_int(ping, "a", None), r=_int(ping, "r", 0),
            ad=_int(ping, "ad", -2), rd=_int(ping, "rd", -2), ping_freshness=_str(ping, "ping_freshness")),
        updatecheck=None if uc is None else UpdateCheck(
            tttoken=_str(uc, "tttoken"), updatedisabled=_bool(uc, "updatedisabled"),
            targetversionprefix=_str(uc, "targetversionprefix"), rollback_allowed=_bool(uc, "rollback_allowed"),
            sameversionupdate=_bool(uc, "sameversionupdate")),
        events=tuple(_event(e) for e in node.all("event")),
        data=tuple(Data(name=_str(d, "name"), index=_str(d, "index", "0"), text=d.text.strip())
                   for d in node.all("data")),
    )


def request_from_tree(root: Node) -> Request:
    _expect_root(root, "request")
    hw, os_ = root.one("hw"), root.one("os")
    return Request(
        protocol=_str(root, "protocol"), requestid=_str(root, "requestid"), sessionid=_str(root, "sessionid"),
        updater=_str(root, "updater", "0.0.0.0"), updaterversion=_str(root, "updaterversion", "0.0.0.0"),
        updaterchannel=_str(root, "updaterchannel"), installsource=_str(root, "installsource"),
        ismachine=_int(root, "ismachine", 0), acceptformat=_str(root, "acceptformat"), dedup=_str(root, "dedup"),
        dlpref=_str(root, "dlpref"), originurl=_str(root, "originurl"), testsource=_str(root, "testsource"),
        userid=_str(root, "userid"),
        hw=None if hw is None else Hw(**{k: _int(hw, k, -1) for k in
                                        ("sse", "sse2", "sse3", "sse41", "sse42", "ssse3", "avx", "physmemory")}),
        os=None if os_ is None else Os(platform=_str(os_, "platform"), version=_str(os_, "version"),
                                       sp=_str(os_, "sp"), arch=_str(os_, "arch")),
        apps=tuple(_request_app(a) for a in root.all("app")),
    )


def decode_request(body: bytes, limits: Limits = Limits()) -> Request:
    return _guard(lambda: request_from_tree(parse(body, limits)))


def _guard(build):
    """Runs a decoder; any exception that is not already a ``ProtocolError`` becomes one."""
    try:
        return build()
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, MemoryError, OverflowError) as exc:
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None
