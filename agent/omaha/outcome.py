"""What an update-check response means for one app: a typed outcome, never a guess.

``interpret(response, appid)`` returns one of:

* ``UpdateOffer``    an update with everything needed to install and verify it;
* ``NoUpdate``       the server has nothing newer;
* ``AppMissing``     the server did not answer for our app (it answered for others, or for none);
* ``AppRejected``    the app's status is not ``ok`` (``error-unknownApplication``, ``restricted`` ...);
* ``ServerError``    updatecheck status ``error-*`` (or another status we do not know);
* ``Unusable``       an update was offered but cannot be installed safely (no version, no size, no usable
  hash, no URL ...); ``reason`` names what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..text import clean
from . import urls as url_policy
from . import versions
from .hashes import SHA1_LEN, SHA256_LEN, digest_from_text, sha256_from_fp
from .model import Package, ProtocolError, Response, ResponseApp


@dataclass(frozen=True)
class PackageOffer:
    name: str
    urls: tuple[str, ...]  # codebase + name, in the server's order
    size: int
    sha256: bytes | None  # every SHA-256 the server gave agreed on this value
    sha1: bytes | None
    fp: str = ""
    required: bool = True

    @property
    def sha256_hex(self) -> str:
        return self.sha256.hex() if self.sha256 else ""


@dataclass(frozen=True)
class UpdateOffer:
    appid: str
    version: str
    packages: tuple[PackageOffer, ...]
    metadata: tuple[tuple[str, str], ...] = ()  # postinstall attributes (MetadataSize, IsDeltaPayload ...)
    poll_interval: int | None = None  # updatecheck PollInterval in seconds, if sent

    @property
    def size(self) -> int:
        return sum(p.size for p in self.packages)


@dataclass(frozen=True)
class NoUpdate:
    appid: str
    info: str = ""
    poll_interval: int | None = None


@dataclass(frozen=True)
class AppMissing:
    appid: str
    answered: tuple[str, ...]

    @property
    def reason(self) -> str:
        others = ", ".join(url_policy.short(a, 60) for a in self.answered[:3]) if self.answered else "no app at all"
        more = f" and {len(self.answered) - 3} more" if len(self.answered) > 3 else ""
        return f"server did not answer for app {self.appid} (it answered for {others}{more})"


@dataclass(frozen=True)
class AppRejected:
    appid: str
    status: str

    @property
    def reason(self) -> str:
        return f"server refused app {self.appid}: status {url_policy.short(self.status, 60)}"


@dataclass(frozen=True)
class ServerError:
    appid: str
    status: str
    info: str = ""

    @property
    def reason(self) -> str:
        info = f" ({clean(self.info, 200)})" if self.info.strip() else ""
        return f"server answered updatecheck status {url_policy.short(self.status, 60)}{info}"


@dataclass(frozen=True)
class Unusable:
    appid: str
    reason: str
    version: str = ""

    def __post_init__(self):  # the reason quotes what the server sent (attribute names, URLs, digests)
        object.__setattr__(self, "reason", clean(self.reason, 600))


MAX_VERSION = versions.MAX_VERSION

Outcome = UpdateOffer | NoUpdate | AppMissing | AppRejected | ServerError | Unusable


def join_url(codebase: str, name: str) -> str:
    """codebase + name with exactly one ``/`` between them (servers disagree on the trailing slash)."""
    if not name:
        return codebase
    return codebase.rstrip("/") + "/" + name.lstrip("/")


def _postinstall_sha256(actions) -> tuple[bytes | None, tuple[tuple[str, str], ...]]:
    for action in actions:
        if action.event == "postinstall":
            raw = action.get("sha256")
            digest = digest_from_text(raw, SHA256_LEN, "postinstall action sha256") if raw else None
            return digest, tuple((k, v) for k, v in action.extra if k != "sha256")
    return None, ()


def _package_offer(pkg: Package, codebases: list[str], action_sha256: bytes | None, single: bool) -> PackageOffer:
    label = f"package {pkg.name!r}"
    if not pkg.name:
        raise ProtocolError("a package has no name")
    if pkg.size is None:
        raise ProtocolError(f"{label} has no size")
    if pkg.size == 0:  # the SHA-256 of nothing would "verify" whatever a slot already holds
        raise ProtocolError(f"{label} has size 0: an empty image is not an update")
    sha256_values: list[tuple[str, bytes]] = []
    if pkg.hash_sha256:
        sha256_values.append(("hash_sha256", digest_from_text(pkg.hash_sha256, SHA256_LEN, f"{label} hash_sha256")))
    if pkg.fp:
        fp_digest = sha256_from_fp(pkg.fp)
        if fp_digest is not None:
            sha256_values.append(("fp", fp_digest))
    if action_sha256 is not None and single:
        sha256_values.append(("postinstall sha256", action_sha256))
    sha1 = digest_from_text(pkg.hash, SHA1_LEN, f"{label} hash") if pkg.hash else None
    distinct = {value for _, value in sha256_values}
    if len(distinct) > 1:
        names = ", ".join(name for name, _ in sha256_values)
        raise ProtocolError(f"{label}: its SHA-256 values disagree ({names})")
    sha256 = distinct.pop() if distinct else None
    if sha256 is None and sha1 is None:
        raise ProtocolError(f"{label} has no usable hash (expected hash_sha256, hash, fp or the "
                            "postinstall action's sha256)" + _unknown_hint(pkg.extra))
    urls = tuple(join_url(cb, pkg.name) for cb in codebases)
    return PackageOffer(name=pkg.name, urls=urls, size=pkg.size, sha256=sha256, sha1=sha1, fp=pkg.fp,
                        required=pkg.required)


def _unknown_hint(extra) -> str:
    names = [name for name, _ in extra][:5]
    return f" (unrecognised attributes: {', '.join(names)})" if names else ""


def _poll_interval(extra) -> int | None:
    for key, value in extra:
        if key == "PollInterval" and value.strip().isdigit():
            return int(value)
    return None


def _offer(app: ResponseApp, appid: str) -> Outcome:
    uc = app.updatecheck
    manifest = uc.manifest
    if manifest is None:
        return Unusable(appid, "updatecheck status ok but no <manifest>")
    missing = []
    if not manifest.version:
        missing.append("the manifest has no version" + _unknown_hint(manifest.extra))
    elif why := versions.problem(manifest.version):
        return Unusable(appid, f"the manifest's version {why}")
    if not manifest.packages:
        missing.append("packages")
    codebases = [u.codebase for u in uc.urls if u.codebase]
    if not codebases:
        missing.append("download URLs (urls/url codebase)")
    bad_urls = [why for why in map(url_policy.problem, codebases) if why]
    if bad_urls:
        return Unusable(appid, f"download URL {bad_urls[0]}", manifest.version)
    try:
        action_sha256, metadata = _postinstall_sha256(manifest.actions)
        packages = tuple(_package_offer(p, codebases, action_sha256, len(manifest.packages) == 1)
                         for p in manifest.packages)
    except ProtocolError as exc:
        missing.append(str(exc))
        packages, metadata = (), ()
    if missing:
        return Unusable(appid, "no usable update: " + "; ".join(missing), manifest.version)
    bad_urls = [why for p in packages for why in map(url_policy.problem, p.urls) if why]  # codebase + name
    if bad_urls:
        return Unusable(appid, f"download URL {bad_urls[0]}", manifest.version)
    return UpdateOffer(appid=appid, version=manifest.version, packages=packages, metadata=metadata,
                       poll_interval=_poll_interval(uc.extra))


def interpret(response: Response, appid: str) -> Outcome:
    """The outcome of an update check for ``appid``; other apps in the response are ignored."""
    app = response.app(appid)
    if app is None:
        return AppMissing(appid, tuple(a.appid for a in response.apps))
    if app.status != "ok":
        return AppRejected(appid, app.status)
    uc = app.updatecheck
    if uc is None:
        return ServerError(appid, "missing", "the app has no <updatecheck> answer")
    if uc.status == "noupdate":
        return NoUpdate(appid, uc.info, _poll_interval(uc.extra))
    if uc.status == "ok":
        return _offer(app, appid)
    return ServerError(appid, uc.status or "(empty)", uc.info)
