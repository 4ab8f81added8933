"""Which URLs the agent may connect to: the server's URL, the payload URLs an offer names, and every redirect.

Refused, before any connection: a scheme other than http(s); a URL that does not parse or has no host; a host
that is a link-local address (169.254.0.0/16, fe80::/10: cloud metadata services live there, and no update
server does), or a host name that resolves to one (checked by the session's resolver, ``http.make_session``,
between the lookup and the connection); plain http where only https is allowed; and a redirect from https down to http (the TLS the
configuration asked for would end there). Pure: no I/O.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urljoin, urlsplit

from ..text import is_clean

MAX_REDIRECTS = 5
MAX_URL = 4096
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


def short(text: str, limit: int = 80) -> str:
    """``text`` quoted for a message, at most ``limit`` characters of it."""
    text = str(text)
    return repr(text[:limit]) + (f" (+{len(text) - limit} more characters)" if len(text) > limit else "")


def problem(url: str, *, allow_http: bool = True) -> str | None:
    """Why ``url`` must not be fetched, or None when it may be."""
    if not is_clean(url, MAX_URL):
        return f"{short(url)} is not a URL (at most {MAX_URL} printable characters)"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        return f"{short(url)} is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"{short(url)} is not an http(s) URL"
    if not host:
        return f"{short(url)} names no host"
    if parts.scheme == "http" and not allow_http:
        return f"{short(url)} is plain http, where only https is allowed"
    if link_local(host):
        return f"{short(url)} points at a link-local address (a metadata service, not an update server)"
    return None


def link_local(host: str) -> bool:
    """Whether ``host`` is a link-local address literal (169.254.0.0/16, fe80::/10, or IPv4 link-local mapped into
    IPv6). A host name is not: the connection checks the addresses it resolves to (``http.make_session``)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return address.is_link_local or (address.version == 6 and address.ipv4_mapped is not None
                                     and address.ipv4_mapped.is_link_local)


def redirect(current: str, location: str | None, *, allow_http: bool) -> str:
    """The URL a redirect from ``current`` leads to; raises ``ValueError`` saying why it is refused."""
    if not location:
        raise ValueError(f"a redirect from {short(current)} has no Location")
    try:
        target = urljoin(current, location.strip())
    except ValueError:
        raise ValueError(f"a redirect to {short(location)} is not a valid URL") from None
    why = problem(target, allow_http=allow_http)
    if why is None and urlsplit(current).scheme == "https" and urlsplit(target).scheme == "http":
        why = f"{short(target)} is plain http, redirected to from https"
    if why is not None:
        raise ValueError(f"refused a redirect: {why}")
    return target
