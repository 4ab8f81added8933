"""Typed, immutable model of Omaha V3 / 3.1 requests and responses.

Every attribute the V3 text defines is a field with the spec's default. Attributes real servers use that
the V3 text does not define (``track``, ``board``, ``delta_okay``, ``machineid`` ...) default to ``None``,
which means "not sent". The codec (``encode``/``decode``) maps these objects to XML and JSON.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def child(**kw):
    """Marks a dataclass field as a child element (or list of them) instead of an attribute."""
    return field(metadata={"child": True}, **kw)


# ---------------------------------------------------------------- request


@dataclass(frozen=True)
class Hw:
    sse: int = -1
    sse2: int = -1
    sse3: int = -1
    sse41: int = -1
    sse42: int = -1
    ssse3: int = -1
    avx: int = -1
    physmemory: int = -1


@dataclass(frozen=True)
class Os:
    platform: str = ""
    version: str = ""
    sp: str = ""
    arch: str = ""


@dataclass(frozen=True)
class Ping:
    active: int = 0
    a: int | None = None  # days since the last active ping; -1 = never; None = not sent
    r: int = 0  # days since the last roll-call ping; -1 = never
    ad: int = -2  # elapsed_days of the last active ping; -1 never, -2 unknown
    rd: int = -2  # elapsed_days of the last roll call; -1 never, -2 unknown
    ping_freshness: str = ""


@dataclass(frozen=True)
class UpdateCheck:
    tttoken: str = ""
    updatedisabled: bool = False
    targetversionprefix: str = ""
    rollback_allowed: bool = False
    sameversionupdate: bool = False


@dataclass(frozen=True)
class Event:
    eventtype: int = 0
    eventresult: int = 0
    errorcode: int = 0
    extracode1: int = 0
    errorcat: int = 0
    download_time_ms: int = 0
    downloaded: int = 0
    downloader: str = ""
    total: int = 0
    update_check_time_ms: int = 0
    install_time_ms: int = 0
    source_url_index: int | None = None
    state_cancelled: int = 0
    time_since_update_available_ms: int = -2
    time_since_download_start_ms: int = -2
    url: str = ""
    nextversion: str = "0.0.0.0"
    previousversion: str = "0.0.0.0"
    nextfp: str = ""
    previousfp: str = ""


@dataclass(frozen=True)
class Data:
    name: str = ""
    index: str = "0"
    text: str = ""


@dataclass(frozen=True)
class App:
    appid: str
    version: str = "0.0.0.0"
    lang: str = ""
    brand: str = ""
    client: str = ""
    enabled: int = -1
    experiments: str = ""
    iid: str = ""
    installage: int = 0
    installdate: int = -2
    installsource: str = ""
    ismachine: int = -1
    tag: str = ""
    fp: str = ""
    cohort: str = ""
    cohorthint: str = ""
    cohortname: str = ""
    release_channel: str = ""
    # attributes of the Chrome OS and CoreOS dialects (None: not sent)
    track: str | None = None
    board: str | None = None
    hardware_class: str | None = None
    delta_okay: bool | None = None
    machineid: str | None = None
    bootid: str | None = None
    oem: str | None = None
    oemversion: str | None = None
    alephversion: str | None = None
    # children
    ping: Ping | None = child(default=None)
    updatecheck: UpdateCheck | None = child(default=None)
    events: tuple[Event, ...] = child(default=())
    data: tuple[Data, ...] = child(default=())


@dataclass(frozen=True)
class Request:
    protocol: str = "3.0"
    requestid: str = ""
    sessionid: str = ""
    updater: str = "0.0.0.0"
    updaterversion: str = "0.0.0.0"
    updaterchannel: str = ""
    installsource: str = ""
    ismachine: int = 0
    acceptformat: str = ""
    dedup: str = ""
    dlpref: str = ""
    originurl: str = ""
    testsource: str = ""
    userid: str = ""
    hw: Hw | None = child(default=None)
    os: Os | None = child(default=None)
    apps: tuple[App, ...] = child(default=())


# ---------------------------------------------------------------- response


@dataclass(frozen=True)
class DayStart:
    elapsed_seconds: int | None = None
    elapsed_days: int | None = None


@dataclass(frozen=True)
class Url:
    codebase: str = ""
    codebasediff: str = ""


@dataclass(frozen=True)
class Package:
    name: str = ""
    namediff: str = ""
    required: bool = False
    size: int | None = None
    sizediff: int | None = None
    hash: str = ""  # SHA-1, base64 (V3, CoreOS)
    hashdiff: str = ""
    hash_sha256: str = ""  # SHA-256, hex per the texts (some servers send base64)
    hashdiff_sha256: str = ""
    fp: str = ""  # "1." + SHA-256 hex
    extra: tuple[tuple[str, str], ...] = ()  # attributes the texts do not define


@dataclass(frozen=True)
class Action:
    event: str = ""
    run: str = ""
    arguments: str = ""
    successurl: str = ""
    terminateallbrowsers: bool = False
    successaction: str = ""
    # every other attribute, in document order (sha256, MetadataSize, ChromeOSVersion, ...)
    extra: tuple[tuple[str, str], ...] = ()

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.extra:
            if key == name:
                return value
        return default


@dataclass(frozen=True)
class Manifest:
    version: str = ""
    packages: tuple[Package, ...] = child(default=())
    actions: tuple[Action, ...] = child(default=())
    extra: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ResponseUpdateCheck:
    status: str = ""
    info: str = ""
    urls: tuple[Url, ...] = child(default=())
    manifest: Manifest | None = child(default=None)
    extra: tuple[tuple[str, str], ...] = ()  # PollInterval, _eol_date, ...


@dataclass(frozen=True)
class ResponseData:
    name: str = ""
    index: str = "0"
    status: str = "ok"
    text: str = ""


@dataclass(frozen=True)
class ResponseApp:
    appid: str
    status: str = "ok"
    experiments: str = ""
    # cohort values: None = not sent (keep what we had); "" = sent empty (clear it)
    cohort: str | None = None
    cohorthint: str | None = None
    cohortname: str | None = None
    ping_status: str | None = None
    updatecheck: ResponseUpdateCheck | None = child(default=None)
    event_statuses: tuple[str, ...] = child(default=())
    data: tuple[ResponseData, ...] = child(default=())


@dataclass(frozen=True)
class Response:
    protocol: str = "3.0"
    server: str = ""
    daystart: DayStart = child(default=DayStart())
    apps: tuple[ResponseApp, ...] = child(default=())

    def app(self, appid: str) -> ResponseApp | None:
        """The response's app for ``appid``, matched case-insensitively (appids are ASCII-case-insensitive)."""
        wanted = appid.lower()
        for candidate in self.apps:
            if candidate.appid.lower() == wanted:
                return candidate
        return None


class ProtocolError(ValueError):
    """A request or response that cannot be understood; the message says what is wrong and where."""
