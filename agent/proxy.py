"""Which HTTP proxy a request goes through: ``server.proxy`` (with ``server.no_proxy``), or else the environment's
``https_proxy``/``HTTPS_PROXY``, ``http_proxy`` (lower case only, as curl reads it) and ``no_proxy``/``NO_PROXY``.

The proxy is an ``http://`` URL: an https request goes through it with CONNECT, so TLS runs end to end between
the agent and the update server (whose certificate is checked against the system's CAs and ``server.ca_file``);
a plain-http request (a lab server, ``server.insecure_http``) is sent to the proxy as it is. TLS to the proxy
itself (an ``https://`` proxy URL) and SOCKS are refused. A proxy at a link-local address is refused like an
update server there (``omaha.urls``); a proxy host name is resolved through the session's resolver, which refuses
link-local addresses too (``http.RefusingResolver``).

User and password in the proxy URL are sent as ``Proxy-Authorization`` (Basic) and never shown: ``shown``
gives the URL without them, ``redact`` takes them out of any text. The rules are pure (the environment is passed
in); ``request_class`` applies them to every request of an aiohttp session (``http.make_session``).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .omaha import urls
from .text import is_clean

MAX_NO_PROXY = 64  # entries of no_proxy that are read; the rest are ignored


class ProxyError(ValueError):
    """A proxy setting that cannot be used; the message names the setting and says what to do."""


@dataclass(frozen=True)
class Proxy:
    url: str  # scheme, host and port only: no user, no password
    user: str = ""
    password: str = ""

    def __str__(self) -> str:
        return self.url


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]*@")


def redact(text: str) -> str:
    """``text`` with the user and password of every URL in it taken out."""
    return _USERINFO.sub(r"\1", text)


def parse(value: str, where: str) -> Proxy:
    """The proxy ``value`` names (``host:port`` alone means ``http://host:port``); raises ``ProxyError`` whose
    message starts with ``where`` and never quotes the credentials."""
    value = value.strip()
    if "://" not in value:
        value = "http://" + value
    if not is_clean(value, urls.MAX_URL):
        raise ProxyError(f"{where}: not a proxy URL (at most {urls.MAX_URL} printable characters)")
    shown_value = redact(value)
    try:
        parts = urlsplit(value)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ProxyError(f"{where}: {urls.short(shown_value)} is not a valid URL") from None
    if parts.scheme == "https":
        raise ProxyError(f"{where}: {urls.short(shown_value)}: TLS to the proxy is not supported; give its "
                         "http:// URL (https requests still run TLS end to end to the server, through CONNECT)")
    if parts.scheme != "http":
        raise ProxyError(f"{where}: {urls.short(shown_value)} is not an http:// proxy URL (SOCKS is not supported)")
    if not host:
        raise ProxyError(f"{where}: {urls.short(shown_value)} names no host")
    if (parts.path not in ("", "/")) or parts.query or parts.fragment:
        raise ProxyError(f"{where}: {urls.short(shown_value)}: a proxy URL is scheme, host and port only")
    if urls.link_local(host):
        raise ProxyError(f"{where}: {urls.short(shown_value)} points at a link-local address (refused like an "
                         "update server there)")
    netloc = f"[{host}]" if ":" in host else host
    return Proxy(f"http://{netloc}:{port or 80}", unquote(parts.username or ""), unquote(parts.password or ""))


@dataclass(frozen=True)
class Route:
    """The proxies for https and http URLs (``None``: direct) and the hosts that go direct anyway."""
    https: Proxy | None = None
    http: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    def for_url(self, url: str) -> Proxy | None:
        """The proxy a request to ``url`` goes through, or ``None`` (direct)."""
        try:
            parts = urlsplit(str(url))
            host, port = (parts.hostname or "").lower(), parts.port
        except ValueError:
            return None
        proxy = self.https if parts.scheme == "https" else self.http if parts.scheme == "http" else None
        if proxy is None or bypassed(host, port or (443 if parts.scheme == "https" else 80), self.no_proxy):
            return None
        return proxy

    def describe(self) -> str:
        """One line for the log, credentials left out."""
        if self.https is None and self.http is None:
            return "direct (no proxy)"
        line = f"https through {self.https or 'none'}, http through {self.http or 'none'}"
        return line + (f"; direct for {', '.join(self.no_proxy)[:200]}" if self.no_proxy else "")


def no_proxy_list(value: str) -> tuple[str, ...]:
    """``no_proxy``'s entries (commas or blanks between them), lower case, at most ``MAX_NO_PROXY``."""
    return tuple(e for e in re.split(r"[,\s]+", value.strip().lower()) if e)[:MAX_NO_PROXY]


def bypassed(host: str, port: int, entries: tuple[str, ...]) -> bool:
    """Whether ``host`` goes direct by ``entries`` (curl's rules): ``*`` is every host; a name matches itself and
    its subdomains (a leading ``.`` or ``*.`` is ignored); an address or CIDR block matches address literals;
    ``entry:port`` only that port."""
    host = host.strip("[]").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in entries:
        if entry == "*":
            return True
        name, want = entry, None
        if m := re.fullmatch(r"(.*?):(\d{1,5})", entry):
            if not m[1].count(":"):  # (an IPv6 literal has colons of its own)
                name, want = m[1], int(m[2])
        if want is not None and want != port:
            continue
        name = name.strip("[]")
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.removeprefix("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def route(proxy: str | None, no_proxy: tuple[str, ...], environ) -> Route:
    """The route for ``server.proxy`` (and ``server.no_proxy``) when set, else for the environment's variables;
    raises ``ProxyError`` for a value that cannot be used (never going direct instead)."""
    if proxy:
        p = parse(proxy, "server.proxy")
        return Route(p, p, tuple(e.lower() for e in no_proxy))
    https = environ.get("https_proxy") or environ.get("HTTPS_PROXY")
    http = environ.get("http_proxy")  # never HTTP_PROXY: a CGI program's environment sets it from a header
    bypass = no_proxy_list(environ.get("no_proxy") or environ.get("NO_PROXY") or "")
    return Route(parse(https, "https_proxy") if https else None, parse(http, "http_proxy") if http else None, bypass)


def request_class(route: Route):
    """aiohttp's request class, with the proxy ``route`` names for each request's URL (every request of the
    session, whoever makes it, goes through the same rule); the credentials travel as ``Proxy-Authorization``
    (on the CONNECT of an https request, on the request itself for plain http), never in a URL aiohttp could
    quote in an error."""
    import base64

    from aiohttp import ClientRequest
    from multidict import CIMultiDict
    from yarl import URL

    class ProxiedRequest(ClientRequest):
        def __init__(self, method, url, *args, proxy=None, **kwargs):
            chosen = route.for_url(str(url)) if proxy is None else None
            if chosen is not None:
                proxy = URL(chosen.url)
                if chosen.user or chosen.password:
                    auth = "Basic " + base64.b64encode(f"{chosen.user}:{chosen.password}".encode()).decode()
                    if url.scheme == "https":
                        kwargs["proxy_headers"] = {"Proxy-Authorization": auth}
                    else:
                        kwargs["headers"] = CIMultiDict(kwargs.get("headers") or {})
                        kwargs["headers"]["Proxy-Authorization"] = auth
            super().__init__(method, url, *args, proxy=proxy, **kwargs)

    return ProxiedRequest
