"""Encoding requests and responses in both dialects: V3 XML (``protocol="3.0"``) and 3.1 JSON.

Attributes equal to the spec default are left out (the texts allow it) unless real servers expect them
(``ALWAYS``); ``None`` is never sent.
"""
from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

from .model import (
    Action, App, Event, Os, Package, Ping, Request, Response, ResponseApp, ResponseData, ResponseUpdateCheck, Url,
)

JSON_PREFIX = ")]}'\n"

ALWAYS: dict[type, frozenset[str]] = {
    Request: frozenset({"protocol", "requestid", "sessionid", "updater", "updaterversion", "installsource",
                        "ismachine"}),
    Os: frozenset({"platform", "version", "sp", "arch"}),
    App: frozenset({"appid", "version"}),
    Ping: frozenset({"active", "r"}),
    Event: frozenset({"eventtype", "eventresult"}),
    Response: frozenset({"protocol", "server"}),
    ResponseApp: frozenset({"appid", "status"}),
    ResponseUpdateCheck: frozenset({"status"}),
    Url: frozenset({"codebase"}),
    Package: frozenset({"name", "size", "required"}),
    Action: frozenset({"event"}),
    ResponseData: frozenset({"name", "status"}),
}

_SKIP = {"extra", "text"}


def _attributes(obj) -> list[tuple[str, object]]:
    """(name, value) of ``obj``'s attribute fields worth sending, then its ``extra`` pairs."""
    always = ALWAYS.get(type(obj), frozenset())
    out: list[tuple[str, object]] = []
    for f in dataclasses.fields(obj):
        if f.metadata.get("child") or f.name in _SKIP:
            continue
        value = getattr(obj, f.name)
        if value is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if value == default and f.name not in always:
            continue
        out.append((f.name, value))
    out.extend(getattr(obj, "extra", ()))
    return out


def _xml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _xml_element(parent: ET.Element | None, tag: str, obj=None, **attrs) -> ET.Element:
    pairs = _attributes(obj) if obj is not None else []
    pairs += list(attrs.items())
    values = {name: _xml_value(value) for name, value in pairs}
    return ET.Element(tag, values) if parent is None else ET.SubElement(parent, tag, values)


def _xml_bytes(root: ET.Element) -> bytes:
    ET.indent(root, space="  ")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


# ---------------------------------------------------------------- requests


def request_xml(req: Request) -> bytes:
    root = _xml_element(None, "request", req)
    if req.hw is not None:
        _xml_element(root, "hw", req.hw)
    if req.os is not None:
        _xml_element(root, "os", req.os)
    for app in req.apps:
        node = _xml_element(root, "app", app)
        if app.ping is not None:
            _xml_element(node, "ping", app.ping)
        if app.updatecheck is not None:
            _xml_element(node, "updatecheck", app.updatecheck)
        for event in app.events:
            _xml_element(node, "event", event)
        for data in app.data:
            _xml_element(node, "data", data).text = data.text or None
    return _xml_bytes(root)


def _json_object(obj) -> dict:
    return {name: value for name, value in _attributes(obj)}


def request_json(req: Request) -> bytes:
    body = _json_object(req)
    body["protocol"] = "3.1" if req.protocol == "3.0" else req.protocol
    if req.os is not None:
        body["@os"] = req.os.platform.lower()
        body["os"] = _json_object(req.os)
    body["@updater"] = req.updater
    if req.hw is not None:
        body["hw"] = _json_object(req.hw)
    apps = []
    for app in req.apps:
        node = _json_object(app)
        if app.ping is not None:
            node["ping"] = _json_object(app.ping)
        if app.updatecheck is not None:
            node["updatecheck"] = _json_object(app.updatecheck)
        if app.events:
            node["event"] = [_json_object(e) for e in app.events]
        if app.data:
            node["data"] = [dict(_json_object(d), **({"#text": d.text} if d.text else {})) for d in app.data]
        apps.append(node)
    body["app"] = apps
    return json.dumps({"request": body}, separators=(",", ":")).encode()


def encode_request(req: Request) -> bytes:
    """The request in the dialect its ``protocol`` names ("3.0": XML, "3.1": JSON)."""
    return request_json(req) if req.protocol.startswith("3.1") else request_xml(req)


def content_type(protocol: str) -> str:
    return "application/json" if protocol.startswith("3.1") else "text/xml; charset=utf-8"


# ---------------------------------------------------------------- responses (the development server's side)


def response_xml(resp: Response) -> bytes:
    root = _xml_element(None, "response", resp)
    _xml_element(root, "daystart", resp.daystart)
    for app in resp.apps:
        node = _xml_element(root, "app", app)
        if app.ping_status is not None:
            _xml_element(node, "ping", status=app.ping_status)
        uc = app.updatecheck
        if uc is not None:
            uc_node = _xml_element(node, "updatecheck", uc)
            if uc.urls:
                urls = _xml_element(uc_node, "urls")
                for url in uc.urls:
                    _xml_element(urls, "url", url)
            if uc.manifest is not None:
                man = _xml_element(uc_node, "manifest", uc.manifest)
                packages = _xml_element(man, "packages")
                for pkg in uc.manifest.packages:
                    _xml_element(packages, "package", pkg)
                actions = _xml_element(man, "actions")
                for action in uc.manifest.actions:
                    _xml_element(actions, "action", action)
        for status in app.event_statuses:
            _xml_element(node, "event", status=status)
        for data in app.data:
            _xml_element(node, "data", data).text = data.text or None
    return _xml_bytes(root)


def response_json(resp: Response) -> bytes:
    body = _json_object(resp)
    body["protocol"] = "3.1" if resp.protocol == "3.0" else resp.protocol
    body["daystart"] = _json_object(resp.daystart)
    apps = []
    for app in resp.apps:
        node = _json_object(app)
        if app.ping_status is not None:
            node["ping"] = {"status": app.ping_status}
        uc = app.updatecheck
        if uc is not None:
            uc_node = _json_object(uc)
            if uc.urls:
                uc_node["urls"] = {"url": [_json_object(u) for u in uc.urls]}
            if uc.manifest is not None:
                man = _json_object(uc.manifest)
                man["packages"] = {"package": [_json_object(p) for p in uc.manifest.packages]}
                if uc.manifest.actions:
                    man["actions"] = {"action": [_json_object(a) for a in uc.manifest.actions]}
                uc_node["manifest"] = man
            node["updatecheck"] = uc_node
        if app.event_statuses:
            node["event"] = [{"status": s} for s in app.event_statuses]
        if app.data:
            node["data"] = [dict(_json_object(d), **({"#text": d.text} if d.text else {})) for d in app.data]
        apps.append(node)
    body["app"] = apps
    return (JSON_PREFIX + json.dumps({"response": body}, separators=(",", ":"))).encode()


def encode_response(resp: Response) -> bytes:
    return response_json(resp) if resp.protocol.startswith("3.1") else response_xml(resp)

