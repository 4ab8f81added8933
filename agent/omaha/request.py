"""Building the requests the agent sends: update checks and event reports (ping-backs)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .model import App, Event, Os, Ping, Request, UpdateCheck


@dataclass(frozen=True)
class ClientInfo:
    """Who is asking: the device and its app, as the request describes them."""

    appid: str
    version: str
    track: str = "stable"
    board: str = ""
    hardware_class: str = ""
    lang: str = ""
    protocol: str = "3.0"
    updater: str = "omaha-agent"
    updaterversion: str = "0.0.0"
    os_version: str = ""  # kernel release
    arch: str = ""
    machineid: str | None = None  # off by default for privacy
    bootid: str | None = None
    targetversionprefix: str = ""
    rollback_allowed: bool = False
    updatedisabled: bool = False


@dataclass(frozen=True)
class Cohort:
    cohort: str = ""
    cohorthint: str = ""
    cohortname: str = ""


MAX_COHORT = 1024


def cohort_value_ok(value) -> bool:
    """The spec's limit for cohort, cohorthint and cohortname: at most 1024 printable ASCII characters (32-126).
    Anything else from a server is neither stored nor sent back."""
    return isinstance(value, str) and len(value) <= MAX_COHORT and all(32 <= ord(c) <= 126 for c in value)


def _envelope(info: ClientInfo, requestid: str, sessionid: str, installsource: str, app: App) -> Request:
    return Request(
        protocol=info.protocol, requestid=requestid, sessionid=sessionid, updater=info.updater,
        updaterversion=info.updaterversion, installsource=installsource, ismachine=1,
        os=Os(platform="Linux", version=info.os_version,
              sp=f"{info.os_version}_{info.arch}" if info.os_version else "", arch=info.arch),
        apps=(app,),
    )


def _app(info: ClientInfo, cohort: Cohort, installdate: int | None, **children) -> App:
    return App(
        appid=info.appid, version=info.version, track=info.track, board=info.board,
        hardware_class=info.hardware_class, delta_okay=False, lang=info.lang,
        installdate=installdate if installdate is not None else -1,
        cohort=cohort.cohort, cohorthint=cohort.cohorthint, cohortname=cohort.cohortname,
        machineid=info.machineid, bootid=info.bootid, **children,
    )


def update_check(info: ClientInfo, *, requestid: str, sessionid: str, interactive: bool, ping: Ping | None,
                 cohort: Cohort = Cohort(), installdate: int | None = None) -> Request:
    check = UpdateCheck(targetversionprefix=info.targetversionprefix, rollback_allowed=info.rollback_allowed,
                        updatedisabled=info.updatedisabled)
    app = _app(info, cohort, installdate, ping=ping, updatecheck=check)
    return _envelope(info, requestid, sessionid, "ondemandupdate" if interactive else "scheduler", app)


def event_report(info: ClientInfo, events: tuple[Event, ...], *, requestid: str, sessionid: str,
                 interactive: bool = False, cohort: Cohort = Cohort(), installdate: int | None = None,
                 version: str | None = None) -> Request:
    """A ping-back carrying ``events``; ``version`` overrides the app version (the version the events are
    about, e.g. the new version for 3/2)."""
    app = _app(info if version is None else replace(info, version=version), cohort, installdate, events=events)
    return _envelope(info, requestid, sessionid, "ondemandupdate" if interactive else "scheduler", app)





