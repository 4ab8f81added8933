"""HTTP headers of the protocol: what a request carries, and ``X-Retry-After`` from a response."""
from __future__ import annotations

from .encode import content_type
from .model import Request

RETRY_AFTER_CAP = 86400


def request_headers(req: Request, interactive: bool | None, request_age: int | None = None) -> dict[str, str]:
    """Headers for an update check (``interactive`` True/False) or a ping-back (``interactive`` None)."""
    headers = {
        "Content-Type": content_type(req.protocol),
        "X-Goog-Update-AppId": ",".join(app.appid for app in req.apps),
        "X-Goog-Update-Updater": f"{req.updater}-{req.updaterversion}",
    }
    if interactive is not None:
        headers["X-Goog-Update-Interactivity"] = "fg" if interactive else "bg"
    if request_age is not None:
        headers["X-Request-Age"] = str(max(0, int(request_age)))
    return headers


def parse_retry_after(value: str | None) -> int | None:
    """Seconds from ``X-Retry-After``: a positive integer, capped at one day; anything else is ignored."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        return None
    seconds = int(text)
    if seconds <= 0:
        return None
    return min(seconds, RETRY_AFTER_CAP)
