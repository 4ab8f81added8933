"""Configuration: YAML loaded into typed, frozen objects, validated; every error names the key and line.

``load(path)`` raises ``ConfigError("agent.yaml:3: server.url: missing")`` style errors. See
``config/agent.yaml`` for the documented defaults.
"""
from __future__ import annotations

import math
import re
import os
from dataclasses import dataclass, field

import yaml

from .omaha import urls
from .slots import SlotSpec

DEFAULT_PATH = "/etc/omaha-agent/agent.yaml"
MAX_FILE = 1 << 20  # a config is a few hundred bytes; a bigger file is an error, never a truncation
MAX_STRING = 4096  # PATH_MAX; every string value is at most this long
MAX_DURATION = 366 * 86400  # seconds: no duration in the config needs more than a year


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class CupConfig:
    key_version: int
    public_key: str  # the Omaha server's CUP-ECDSA P-256 public key (PEM or DER)


@dataclass(frozen=True)
class ServerConfig:
    url: str
    protocol: str = "3.0"
    insecure_http: bool = False
    ca_file: str | None = None
    timeout: float = 30.0
    cup: CupConfig | None = None
    client_cert: str | None = None  # the device's TLS certificate (PEM), for servers that identify devices by it
    client_key: str | None = None
    proxy: str | None = None  # an http:// proxy for every request; unset: https_proxy/http_proxy/no_proxy
    no_proxy: tuple[str, ...] = ()  # with proxy: hosts reached directly (no_proxy's rules)


@dataclass(frozen=True)
class AppConfig:
    id: str
    version: str | None = None
    version_file: str | None = "/etc/os-release"
    track: str = "stable"
    board: str = ""
    hardware_class: str = ""
    send_machine_id: bool = False
    targetversionprefix: str = ""
    rollback_allowed: bool = False


@dataclass(frozen=True)
class BootConfig:
    backend: str
    tries: int = 3
    env: str | None = None  # grubenv and sim: the env file
    disk: str | None = None  # gpt: the whole disk
    labels: tuple[tuple[str, str], ...] = (("a", "ROOT-A"), ("b", "ROOT-B"))  # gpt: partition names
    fw_config: str | None = None  # uboot: fw_env.config
    esp: str = "/boot/efi"  # bls: the EFI system partition's mount point (its loader/entries)
    efivars: str = "/sys/firmware/efi/efivars"  # bls: where LoaderEntrySelected is read


@dataclass(frozen=True)
class ScheduleConfig:
    interval: int = 5 * 3600  # coprime with a day: checks drift around the clock
    initial_delay: int = 600  # the first check comes after a random delay up to this
    backoff_cap: int = 5 * 3600
    backoff_base: int = 60


@dataclass(frozen=True)
class FleetLockConfig:
    url: str
    group: str = "default"
    machine_id: str = "/etc/machine-id"  # the device's ID is derived from it (never sent as it is)


@dataclass(frozen=True)
class RebootConfig:
    policy: str = "manual"  # manual | immediate | windows
    windows: tuple = ()  # windows.Window, for the windows policy
    fleetlock: FleetLockConfig | None = None
    notice: int = 0  # seconds between announcing a reboot and doing it
    max_postpone: int = 4 * 3600  # PostponeReboot moves a reboot at most this far past its first planned time
    max_inhibit_delay: int = 900  # how long a shutdown inhibitor may hold a reboot back before the next window


@dataclass(frozen=True)
class HealthConfig:
    commands: tuple[str, ...] = ()
    timeout: int = 300
    after: str = "boot-complete"  # boot-complete: wait for ConfirmBoot from omaha-agent-confirm.service | start
    boot_complete_timeout: int = 900


@dataclass(frozen=True)
class InstallConfig:
    verify: str = "hash"  # hash | readback
    read_timeout: float = 60.0
    max_rate: int | None = None  # bytes/s for a background download (None: unlimited)
    max_rate_interactive: int | None = None  # bytes/s for one asked for (CheckForUpdate, the CLI)
    on_metered: str = "wait"  # wait | allow: a background download on a metered connection
    adaptive: bool = True  # a release with a chunk index installs from the chunks the device has (adaptive updates)
    index: str = ""  # the chunk index of the image shipped in the device (for the booted slot, when none is saved)
    arm: str = "immediately"  # immediately | on-apply (the Apply command) | in-window (just before the reboot)
    post_install: tuple[str, ...] = ()  # shell commands run after the image is verified, before the slot is armed
    post_install_timeout: int = 300
    post_install_network: bool = False  # the commands run without network unless this is true


@dataclass(frozen=True)
class DbusConfig:
    enabled: bool = True
    flatcar_compat: bool = False


@dataclass(frozen=True)
class TrustConfig:
    keys: tuple[str, ...] = ("/etc/omaha-agent/keys/*.pem",)  # PEM public keys (paths or globs)
    require_signature: bool = True  # a release installs only with a DSSE envelope a trusted key signed


@dataclass(frozen=True)
class MetricsConfig:
    textfile: str | None = None  # the Prometheus exposition, replaced atomically (node exporter's textfile collector)
    socket: str | None = None  # a Unix socket that answers every connection with the exposition


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    app: AppConfig
    slots: dict[str, SlotSpec]
    boot: BootConfig
    state_dir: str = "/var/lib/omaha-agent"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    reboot: RebootConfig = field(default_factory=RebootConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    install: InstallConfig = field(default_factory=InstallConfig)
    dbus: DbusConfig = field(default_factory=DbusConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    groups: tuple = ()  # groups.SlotGroup: every A/B pair, the first holding the root filesystem (``slots``)

    def __post_init__(self):
        if not self.groups:  # built by hand (the tests, provisioning): the one pair is the one group
            from .groups import DEFAULT_GROUP, SlotGroup
            object.__setattr__(self, "groups", (SlotGroup(DEFAULT_GROUP, self.slots["a"], self.slots["b"]),))


class _Reader:
    """Typed access to the parsed YAML with the line of every key, for messages like ``agent.yaml:3: ...``."""

    def __init__(self, path: str, text: str):
        self.name = os.path.basename(path)
        try:
            # aliases first, before anything is built: an anchor bomb (a list of aliases of lists of aliases...)
            # expands into gigabytes only once constructed or printed; the config has no use for aliases at all
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.AliasEvent):
                    raise ConfigError(f"{self.name}:{event.start_mark.line + 1}: YAML aliases "
                                      f"(*{str(event.anchor)[:40]}) are not allowed in the configuration")
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            why = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line: PyYAML's texts span lines
            raise ConfigError(f"{self.name}{line}: not valid YAML: {why[:200]}") from None
        except (ValueError, RecursionError, MemoryError) as exc:  # an int of 5000 digits, nesting 10 000 deep
            raise ConfigError(f"{self.name}: not a usable configuration: {str(exc)[:120] or type(exc).__name__}") from None
        self.lines: dict[str, int] = {}
        if node is not None:
            self._index(node, "")
        if self.data is None:
            self.data = {}
        if not isinstance(self.data, dict):
            raise ConfigError(f"{self.name}:1: the top level must be a mapping of keys")

    def _index(self, node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                name = f"{prefix}.{key.value}" if prefix else str(key.value)
                if name in seen:  # YAML would silently keep the last one
                    raise ConfigError(f"{self.name}:{key.start_mark.line + 1}: {name[:60]}: duplicate "
                                      f"key (also on line {self.lines[name]}); keep one")
                seen.add(name)
                self.lines[name] = key.start_mark.line + 1
                self._index(value, name)

    def fail(self, key: str, message: str):
        line = self.lines.get(key)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        while line is None and parent:
            line = self.lines.get(parent)
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        raise ConfigError(f"{self.name}{':' + str(line) if line else ''}: {key}: {message}")

    def get(self, key: str, default=..., kind=None):
        value = self.data
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value or value[part] is None:
                if default is ...:
                    self.fail(key, "missing")
                return default
            value = value[part]
        if kind is not None and not _is(value, kind):
            self.fail(key, f"must be {_kind_name(kind)}, not {_describe(value)}")
        if kind is str and not isinstance(value, str):  # a number where a string (a path, a version) goes
            value = str(value)
        if isinstance(value, str) and len(value) > MAX_STRING:
            self.fail(key, f"is {len(value)} characters long, at most {MAX_STRING} are allowed "
                           f"({urls.short(value, 40)})")
        return value

    def section(self, key: str) -> dict:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, "must be a mapping")
        return value

    def unknown(self, key: str, allowed: set[str]) -> None:
        for name in self.section(key) if key else self.data:
            if name not in allowed:
                full = f"{key}.{str(name)[:60]}" if key else str(name)[:60]
                self.fail(full, f"unknown key (known: {', '.join(sorted(allowed))})")


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, list)
    return isinstance(value, kind)


def _describe(value) -> str:
    """A bad value for a message: a short prefix of a scalar, only the shape of anything bigger (never a whole
    ``repr``: a huge value would take memory and time to print)."""
    if isinstance(value, str):
        return urls.short(value, 40)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'mapping'} of {len(value)} item(s)"
    return f"a {type(value).__name__}"


def _kind_name(kind) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            list: "a list"}.get(kind, kind.__name__)


def _positive(r: _Reader, key: str, default, kind=int, minimum=1, maximum=None):
    value = r.get(key, default, kind)
    if isinstance(value, float) and not math.isfinite(value):
        r.fail(key, f"must be a finite number, not {value}")
    if value < minimum or (maximum is not None and value > maximum):
        r.fail(key, f"must be between {minimum} and {maximum}" if maximum is not None else f"must be at least {minimum}")
    return value


def _duration(r: _Reader, key: str, default, kind=int, minimum=1):
    """Seconds: a finite number from ``minimum`` up to a year (nan, inf and 1e-300 are not durations)."""
    return _positive(r, key, default, kind, minimum, MAX_DURATION)


def _ca_file(r: _Reader, path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        r.fail("server.ca_file", f"{urls.short(path)} does not exist")
    import ssl
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        r.fail("server.ca_file", f"{urls.short(path)} is not a PEM bundle of CA certificates "
                                 f"({str(exc)[:80] or type(exc).__name__})")
    return path


def _client_cert(r: _Reader, cert: str | None, key: str | None) -> tuple[str | None, str | None]:
    """The device's TLS identity: both files or neither, and they must load as a certificate and its key."""
    if cert is None and key is None:
        return None, None
    if cert is None or key is None:
        r.fail("server.client_cert" if cert is None else "server.client_key",
               "missing (server.client_cert and server.client_key go together)")
    for name, path in (("server.client_cert", cert), ("server.client_key", key)):
        if not os.path.isfile(path):
            r.fail(name, f"{urls.short(path)} does not exist")
    import ssl
    try:
        ssl.create_default_context().load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        r.fail("server.client_cert", f"{urls.short(cert)} and {urls.short(key)} are not a PEM certificate and its "
                                     f"key ({str(exc)[:80] or type(exc).__name__})")
    return cert, key


def _same_slot(a: SlotSpec, b: SlotSpec) -> bool:
    paths = ("file", "device")
    if a.kind in paths and b.kind in paths:
        return os.path.realpath(a.value) == os.path.realpath(b.value)
    return a.kind == b.kind and a.value.lower() == b.value.lower()


FLEETLOCK_GROUP = re.compile(r"[a-zA-Z0-9.-]+")


def _reboot(r: _Reader) -> RebootConfig:
    from . import windows as w

    policy = str(r.get("reboot.policy", "manual", str))
    if policy not in ("manual", "immediate", "windows"):
        r.fail("reboot.policy", f"must be manual, immediate or windows, not {policy!r}")
    items = r.get("reboot.windows", [], list)
    if policy == "windows" and not items:
        r.fail("reboot.windows" if "reboot.windows" in r.lines else "reboot.policy",
               "the windows policy needs at least one window, e.g. windows: [{days: [sat, sun], start: \"02:00\", "
               "length: 120}]")
    if items and policy != "windows":
        r.fail("reboot.windows", f"windows apply to the windows policy only (reboot.policy is {policy})")
    if len(items) > 64:
        r.fail("reboot.windows", f"{len(items)} windows; at most 64")
    parsed = []
    for i, item in enumerate(items, 1):
        where = f"window {i}"
        if not isinstance(item, dict):
            r.fail("reboot.windows", f"{where}: must be a mapping with days, start, length (and timezone)")
        extra = set(map(str, item)) - {"days", "start", "length", "timezone"}
        if extra:
            r.fail("reboot.windows", f"{where}: unknown key {sorted(extra)[0][:40]!r} (known: days, length, start, "
                                     "timezone)")
        try:
            days = w.parse_days(item.get("days"))
            start = w.parse_start(str(item.get("start", "")))
            tz = w.zone(str(item.get("timezone", "UTC")))
        except ValueError as exc:
            r.fail("reboot.windows", f"{where}: {exc}")
        length = item.get("length")
        if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= w.MAX_LENGTH:
            r.fail("reboot.windows", f"{where}: length must be a whole number of minutes from 1 to {w.MAX_LENGTH}")
        parsed.append(w.Window(days, start, length, tz))
    fleetlock = None
    if r.get("reboot.fleetlock", None, dict) is not None:
        r.unknown("reboot.fleetlock", {"url", "group", "machine_id"})
        url = str(r.get("reboot.fleetlock.url", kind=str))
        why = urls.problem(url)
        if why is not None:
            r.fail("reboot.fleetlock.url", f"{why} (the base URL of a FleetLock server)")
        group = str(r.get("reboot.fleetlock.group", "default", str))
        if not FLEETLOCK_GROUP.fullmatch(group):
            r.fail("reboot.fleetlock.group", f"{urls.short(group, 40)} is not a group name: letters, digits, "
                                             "dots and dashes only")
        fleetlock = FleetLockConfig(url.rstrip("/"), group,
                                    str(r.get("reboot.fleetlock.machine_id", "/etc/machine-id", str)))
    return RebootConfig(policy, tuple(parsed), fleetlock, _duration(r, "reboot.notice", 0, int, 0),
                        _duration(r, "reboot.max_postpone", 4 * 3600, int, 0),
                        _duration(r, "reboot.max_inhibit_delay", 900, int, 0))


def parse(text: str, path: str = "agent.yaml") -> Config:
    r = _Reader(path, text)
    r.unknown("", {"server", "app", "slots", "boot", "state_dir", "schedule", "reboot", "health", "install", "dbus",
                   "trust", "metrics"})
    for sec, keys in {"server": {"url", "protocol", "insecure_http", "ca_file", "timeout", "cup", "client_cert",
                                 "client_key", "proxy", "no_proxy"},
                      "app": {"id", "version", "version_file", "track", "board", "hardware_class", "send_machine_id",
                              "targetversionprefix", "rollback_allowed"},
                      "boot": {"backend", "tries", "env", "disk", "labels", "fw_config", "esp", "efivars"},
                      "schedule": {"interval", "initial_delay", "backoff_cap", "backoff_base"},
                      "reboot": {"policy", "windows", "fleetlock", "notice", "max_postpone", "max_inhibit_delay"},
                      "health": {"commands", "timeout", "after", "boot_complete_timeout"},
                      "install": {"verify", "read_timeout", "max_rate", "max_rate_interactive", "on_metered", "adaptive",
                                  "post_install", "post_install_timeout", "post_install_network",
                                  "index", "arm"},
                      "dbus": {"enabled", "flatcar_compat"}, "trust": {"keys", "require_signature"},
                      "metrics": {"textfile", "socket"}}.items():
        r.unknown(sec, keys)

    url = str(r.get("server.url", kind=str))
    insecure = r.get("server.insecure_http", False, bool)
    why = urls.problem(url)
    if why is not None:
        r.fail("server.url", why)
    cup = None
    if r.get("server.cup", None, dict) is not None:
        r.unknown("server.cup", {"key_version", "public_key"})
        key = str(r.get("server.cup.public_key", kind=str))
        if not os.path.isfile(key):
            r.fail("server.cup.public_key", f"{key[:200]} does not exist")
        cup = CupConfig(_positive(r, "server.cup.key_version", 1, int, 1, 1 << 30), key)
    if url.lower().startswith("http:") and not insecure and cup is None:
        r.fail("server.url", "plain http is refused; use https or server.cup, or set server.insecure_http: true "
                             "for a lab setup")
    protocol = str(r.get("server.protocol", "3.0", str))
    if protocol not in ("3.0", "3.1"):
        r.fail("server.protocol", f"must be \"3.0\" (XML) or \"3.1\" (JSON), not {protocol!r}")
    ca_file = _ca_file(r, r.get("server.ca_file", None, str))
    cert, key = _client_cert(r, r.get("server.client_cert", None, str), r.get("server.client_key", None, str))
    server = ServerConfig(url, protocol, insecure, ca_file, float(_duration(r, "server.timeout", 30, float, 0.1)), cup,
                          cert, key, *_proxy(r))

    version = r.get("app.version", None, str)
    version_file = r.get("app.version_file", "/etc/os-release", str)
    app = AppConfig(
        id=str(r.get("app.id", kind=str)), version=None if version is None else str(version),
        version_file=version_file or None, track=str(r.get("app.track", "stable", str)),
        board=str(r.get("app.board", "", str)), hardware_class=str(r.get("app.hardware_class", "", str)),
        send_machine_id=r.get("app.send_machine_id", False, bool),
        targetversionprefix=str(r.get("app.targetversionprefix", "", str)),
        rollback_allowed=r.get("app.rollback_allowed", False, bool))
    if not app.id.strip():
        r.fail("app.id", "must not be empty")

    from .groups import parse_slots
    slots, groups = parse_slots(r, r.get("slots", kind=dict), _same_slot)

    backend = str(r.get("boot.backend", kind=str))
    if backend not in ("grubenv", "gpt", "uboot", "sim", "bls"):
        r.fail("boot.backend", f"must be grubenv, gpt, uboot, bls or sim, not {backend!r}")
    labels = r.get("boot.labels", {"a": "ROOT-A", "b": "ROOT-B"}, dict)
    boot = BootConfig(backend, _positive(r, "boot.tries", 3, int, 1, 9 if backend == "grubenv" else 15),
                      r.get("boot.env", None, str), r.get("boot.disk", None, str),
                      tuple((k, str(labels.get(k, f"ROOT-{k.upper()}"))) for k in ("a", "b")),
                      r.get("boot.fw_config", None, str), str(r.get("boot.esp", "/boot/efi", str)),
                      str(r.get("boot.efivars", "/sys/firmware/efi/efivars", str)))
    if backend in ("grubenv", "sim") and not boot.env:
        r.fail("boot.env", f"missing (the {backend} backend needs the path of its env file)")
    if backend == "gpt" and not boot.disk:
        r.fail("boot.disk", "missing (the gpt backend needs the whole disk, e.g. /dev/sda)")

    schedule = ScheduleConfig(_duration(r, "schedule.interval", 18000, int, 60),
                              _duration(r, "schedule.initial_delay", 600, int, 0),
                              _duration(r, "schedule.backoff_cap", 18000, int, 60),
                              _duration(r, "schedule.backoff_base", 60, int, 1))
    reboot = _reboot(r)
    commands = r.get("health.commands", [], list)
    if not all(isinstance(c, str) and c.strip() for c in commands):
        r.fail("health.commands", "must be a list of shell command strings")
    after = str(r.get("health.after", "boot-complete", str))
    if after not in ("boot-complete", "start"):
        r.fail("health.after", f"must be boot-complete or start, not {after!r}")
    hooks = r.get("install.post_install", [], list)
    if not all(isinstance(c, str) and c.strip() for c in hooks):
        r.fail("install.post_install", "must be a list of shell command strings")
    verify = str(r.get("install.verify", "hash", str))
    if verify not in ("hash", "readback"):
        r.fail("install.verify", f"must be hash or readback, not {verify!r}")
    arm = str(r.get("install.arm", "immediately", str))
    if arm not in ("immediately", "on-apply", "in-window"):
        r.fail("install.arm", f"must be immediately, on-apply or in-window, not {arm!r}")
    if arm == "in-window" and reboot.policy == "manual":
        r.fail("install.arm", "in-window arms the update just before the reboot the policy plans: it needs "
               "reboot.policy immediate or windows (on-apply waits for omaha-agent apply instead)")
    state_dir = str(r.get("state_dir", "/var/lib/omaha-agent", str))
    keys = r.get("trust.keys", list(TrustConfig.keys), list)
    if not keys or not all(isinstance(k, str) and k.strip() for k in keys):
        r.fail("trust.keys", "must be a list of PEM public key files or globs")
    trust = TrustConfig(tuple(keys), r.get("trust.require_signature", True, bool))
    return Config(
        path=path, server=server, app=app, slots=slots, groups=groups, boot=boot, state_dir=state_dir, schedule=schedule,
        reboot=reboot,
        health=HealthConfig(tuple(commands), _duration(r, "health.timeout", 300, int, 1), after,
                            _duration(r, "health.boot_complete_timeout", 900, int, 1)),
        install=InstallConfig(verify, float(_duration(r, "install.read_timeout", 60, float, 0.1)),
                              _rate(r, "install.max_rate"), _rate(r, "install.max_rate_interactive"),
                              _choice(r, "install.on_metered", "wait", ("wait", "allow")),
                              r.get("install.adaptive", True, bool), str(r.get("install.index", "", str)),
                              arm=arm, post_install=tuple(hooks),
                              post_install_timeout=_duration(r, "install.post_install_timeout", 300, int, 1),
                              post_install_network=r.get("install.post_install_network", False, bool)),
        dbus=DbusConfig(r.get("dbus.enabled", True, bool), r.get("dbus.flatcar_compat", False, bool)), trust=trust,
        metrics=_metrics(r))


def _proxy(r: _Reader) -> tuple[str | None, tuple[str, ...]]:
    from .proxy import ProxyError, no_proxy_list, parse
    value = r.get("server.proxy", None, str)
    bypass = r.get("server.no_proxy", [], list)
    if not all(isinstance(e, str) and e.strip() and len(e) <= 255 for e in bypass) or len(bypass) > 64:
        r.fail("server.no_proxy", "must be a list of at most 64 host names, domains (.example.com) or addresses")
    if bypass and value is None:
        r.fail("server.no_proxy", "goes with server.proxy (without it, the environment's no_proxy applies)")
    if value is not None:
        try:
            parse(value, "")
        except ProxyError as exc:
            r.fail("server.proxy", str(exc).removeprefix(": "))
    return value, no_proxy_list(",".join(bypass))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MIN_RATE = 4096  # bytes/s: a slower cap would outlast every read timeout


def _rate(r: _Reader, key: str) -> int | None:
    """Bytes per second: a whole number, or with a K, M or G suffix (binary: 2M is 2 MiB/s); unset: unlimited."""
    value = r.get(key, None, str)
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,12}(?:\.\d{1,6})?)\s*([kKmMgG]?)(?:i?B)?(?:/s)?\s*", str(value))
    if not m:
        r.fail(key, f"must be bytes per second, e.g. 2M, 512K or 1000000, not {urls.short(str(value), 40)}")
    rate = int(float(m[1]) * _UNITS[m[2].upper()])
    if not MIN_RATE <= rate <= 1 << 40:
        r.fail(key, f"must be between 4K and 1024G bytes per second (unset it for no limit), not {value}")
    return rate


def _choice(r: _Reader, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = str(r.get(key, default, str))
    if value not in allowed:
        r.fail(key, f"must be {' or '.join(allowed)}, not {urls.short(value, 40)}")
    return value


MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with its terminating NUL


def _metrics(r: _Reader) -> MetricsConfig:
    paths = {}
    for name in ("textfile", "socket"):
        key = f"metrics.{name}"
        path = r.get(key, None, str)
        if path is None:
            continue
        if not os.path.isabs(path) or path.endswith("/") or any(not c.isprintable() for c in path):
            r.fail(key, f"must be an absolute file path, not {urls.short(path, 40)}")
        if os.path.isdir(path):
            r.fail(key, f"{urls.short(path, 80)} is a directory; give the file's path in it")
        paths[name] = path
    if len(os.fsencode(paths.get("socket", ""))) > MAX_SOCKET_PATH:
        r.fail("metrics.socket", f"is longer than {MAX_SOCKET_PATH} bytes, the most a Unix socket's path can be")
    if paths.get("socket") and paths.get("socket") == paths.get("textfile"):
        r.fail("metrics.socket", "is the same path as metrics.textfile; give each its own")
    return MetricsConfig(paths.get("textfile"), paths.get("socket"))


def load(path: str = DEFAULT_PATH) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (copy config/agent.yaml there, or pass --config)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {str(exc)[:200]}") from None
    if len(text) > MAX_FILE:
        raise ConfigError(f"{path}: larger than {MAX_FILE >> 20} MiB; a configuration is a few hundred bytes "
                          "(is this the right file?)")
    return parse(text, path)
