"""Property-based fuzzing (hypothesis) of what reads untrusted input: the XML and JSON decoders (and the
interpretation of what they return), the version order, the config loader and the state loader. Only the
project's own error types escape (``ProtocolError``, ``ConfigError``), and their messages stay short.

A bounded run is part of the normal suite (``FUZZ_EXAMPLES`` per target, 150 by default: seconds); ``make
fuzz`` runs many more (``FUZZ_EXAMPLES=20000``)."""
import json
import math
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from agent.config import Config, ConfigError, parse
from agent.omaha import ProtocolError, decode_request, decode_response, interpret, versions
from agent.state import State, Store, from_json

from .conftest import record_count

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
MAX_MESSAGE = 1000
APP = "{0a0b0c0d-1111-4222-8333-444455556666}"
RUNS: dict[str, int] = {}


def ran(target: str) -> None:
    RUNS[target] = RUNS.get(target, 0) + 1
    record_count("fuzz", "examples run per target: " + ", ".join(f"{k} {v}" for k, v in sorted(RUNS.items()))
                 + " (an error type that escapes fails its test)")


# ---------------------------------------------------------------------------------------------- values
_numbers = st.sampled_from(["0", "-1", "1" * 25, "9" * 5000, "1e400", "nan", "-0", "+5", "0x10", " 7 ", "١٢"])
_texts = st.text(max_size=40) | _numbers | st.sampled_from(
    ["", "&amp;", "ok", "noupdate", "error-internal", "2.0.0", APP, APP.upper(), "http://127.0.0.1:1/",
     "file:///etc/", "http://169.254.169.254/", "http://[::1", "A" * 5000, "1." + "AB" * 32])


def _xml_attr(name: str, value: str) -> str:
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    value = "".join(c for c in value if c in "\t\n\r" or (ord(c) >= 0x20 and not 0xD800 <= ord(c) <= 0xDFFF
                                                           and ord(c) not in (0xFFFE, 0xFFFF)))
    return f' {name}="{value}"'


_ATTRS = {
    "response": ["protocol", "server"], "daystart": ["elapsed_seconds", "elapsed_days"],
    "app": ["appid", "status", "cohort", "cohorthint", "cohortname"], "updatecheck": ["status", "info"],
    "urls": [], "url": ["codebase"], "manifest": ["version"], "packages": [],
    "package": ["name", "size", "hash", "hash_sha256", "fp", "required"], "actions": [],
    "action": ["event", "sha256", "run", "ChromeOSVersion"], "ping": ["status"], "event": ["status"],
}
_CHILDREN = {
    "response": ["daystart", "app"], "app": ["updatecheck", "ping", "event"], "updatecheck": ["urls", "manifest"],
    "urls": ["url"], "manifest": ["packages", "actions"], "packages": ["package"], "actions": ["action"],
}


@st.composite
def omaha_tree(draw, name="response", depth=0, texts=_texts):
    attrs = {}
    for attr in _ATTRS.get(name, []):
        if draw(st.booleans()):
            attrs[attr] = draw(texts)
    if name == "app" and draw(st.integers(0, 3)):
        attrs["appid"] = APP
    if draw(st.integers(0, 9)) == 0:
        attrs[draw(st.sampled_from(["x", "size", "version", "hash_sha256"]) | texts)] = draw(texts)
    children = []
    if depth < 7:
        for child in _CHILDREN.get(name, []):
            for _ in range(draw(st.integers(0, 2))):
                children.append(draw(omaha_tree(child, depth + 1, texts)))
    return name, attrs, children


def to_xml(tree) -> str:
    name, attrs, children = tree
    inner = "".join(to_xml(c) for c in children)
    return f"<{name}{''.join(_xml_attr(k, v) for k, v in attrs.items())}>{inner}</{name}>"


def to_json(tree):
    name, attrs, children = tree
    obj: dict = dict(attrs)
    for child in children:
        obj.setdefault(child[0], []).append(to_json(child)[child[0]])
    return {name: obj}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30)


def _decode_all(body: bytes) -> None:
    """What the agent does with an answer: decode, then interpret for its app. Only ProtocolError escapes."""
    try:
        response = decode_response(body)
    except ProtocolError as exc:
        assert len(str(exc)) < MAX_MESSAGE, str(exc)[:300]
        return
    outcome = interpret(response, APP)
    reason = getattr(outcome, "reason", "")
    assert isinstance(reason, str) and len(reason) < MAX_MESSAGE, reason[:300]
    for offer in [outcome] if hasattr(outcome, "packages") else []:
        assert versions.key(offer.version) is not None
        for pkg in offer.packages:
            assert pkg.size > 0 and (pkg.sha256 is not None or pkg.sha1 is not None) and pkg.urls


# ---------------------------------------------------------------------------------------------- decoders
@FUZZ
@given(omaha_tree(), st.booleans())
def test_fuzz_xml_responses_only_raise_protocol_error(tree, declaration):
    ran("xml")
    _decode_all((('<?xml version="1.0" encoding="UTF-8"?>' if declaration else "") + to_xml(tree)).encode())


@FUZZ
@given(omaha_tree(), st.sampled_from(["", ")]}'\n"]))
def test_fuzz_json_responses_only_raise_protocol_error(tree, prefix):
    ran("json")
    _decode_all((prefix + json.dumps(to_json(tree))).encode())


@FUZZ
@given(_json_values, st.sampled_from(["response", "request", "x"]))
def test_fuzz_arbitrary_json_documents_only_raise_protocol_error(value, root):
    ran("json-any")
    body = json.dumps({root: value}).encode()
    _decode_all(body)
    try:
        decode_request(body)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=2000) | omaha_tree().map(lambda t: to_xml(t).encode()).map(
    lambda b: b[:len(b) // 2] + b"\x00\xff" + b[len(b) // 2:]))
def test_fuzz_bytes_and_damaged_xml_only_raise_protocol_error(body):
    ran("bytes")
    _decode_all(body)
    try:
        decode_request(body)
    except ProtocolError:
        pass


# ---------------------------------------------------------------------------------------------- versions
_version = st.text(max_size=30) | st.from_regex(r"v?[0-9]{1,6000}(\.[0-9a-z_]{0,8}){0,6}(-[a-z0-9.]{0,6})?(\+[a-z]*)?",
                                                fullmatch=True)


@FUZZ
@given(_version, _version, _version)
def test_fuzz_versions_always_compare_in_a_total_order(a, b, c):
    ran("versions")
    assert versions.compare(a, b) == -versions.compare(b, a)
    assert versions.same(a, a) and not versions.is_newer(a, a)
    if versions.compare(a, b) <= 0 and versions.compare(b, c) <= 0:
        assert versions.compare(a, c) <= 0
    assert isinstance(versions.matches_prefix(a, b), bool)


# ---------------------------------------------------------------------------------------------- config
GOOD = {
    "server": {"url": "https://updates.example.com/v1/update/", "timeout": 30},
    "app": {"id": "{X}", "version": "1.0.0", "track": "stable"},
    "slots": {"a": {"file": "/tmp/fuzz-a.img"}, "b": {"file": "/tmp/fuzz-b.img"}},
    "boot": {"backend": "sim", "env": "/tmp/fuzz-env.json", "tries": 2},
    "schedule": {"interval": 18000, "backoff_base": 60},
    "health": {"commands": ["true"], "timeout": 30},
    "install": {"read_timeout": 60, "verify": "hash"},
}
_KEYS = [(s, k) for s, d in GOOD.items() for k in d] + [("server", "ca_file"), ("state_dir", None), ("dbus", "enabled")]
_yaml_scalars = st.sampled_from([".nan", ".inf", "-.inf", "1e-300", "1e400", "9" * 5000, "-1", "0", "null", "~",
                                 "true", "'x'", '"' + "y" * 5000 + '"', "[1, [2, [3]]]", "{a: 1}", "&a [1]", "*a",
                                 "!!python/object:os.system", "0x1F", "0o17", "2001-12-14", "'/tmp/fuzz-a.img'",
                                 "'http://[::1'", "'ftp://x/'", "\"\\0\""]) | st.text(max_size=20).map(json.dumps)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _yaml_scalars), max_size=4), st.booleans())
def test_fuzz_config_values_only_raise_config_error(edits, duplicate):
    ran("config")
    lines = []
    edited = {key: value for key, value in edits}
    for section, body in GOOD.items():
        items = dict(body)
        for (s, k), value in edited.items():
            if s == section and k is not None:
                items[k] = value
        rendered = ", ".join(f"{k}: {v if (section, k) in edited else json.dumps(v)}" for k, v in items.items())
        lines.append(f"{section}: {{{rendered}}}")
    if ("state_dir", None) in edited:
        lines.append(f"state_dir: {edited[('state_dir', None)]}")
    if duplicate:
        lines.append(lines[0])
    _parse_only_config_error("\n".join(lines) + "\n")


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_fuzz_config_text_only_raises_config_error(text):
    ran("config-text")
    _parse_only_config_error(text)


def _parse_only_config_error(text: str) -> None:
    try:
        config = parse(text, "/etc/omaha-agent/agent.yaml")
    except ConfigError as exc:
        assert len(str(exc)) < MAX_MESSAGE and "\n" not in str(exc), str(exc)[:300]
        return
    assert isinstance(config, Config)
    for value in (config.server.timeout, config.install.read_timeout, config.schedule.interval,
                  config.health.timeout):
        assert math.isfinite(value) and value > 0
    assert config.slots["a"] != config.slots["b"]


# ---------------------------------------------------------------------------------------------- state
@FUZZ
@given(_json_values)
def test_fuzz_state_from_json_keeps_only_what_is_usable(value):
    ran("state")
    state, dropped = from_json(value if isinstance(value, dict) else {"events": value, "trial": value})
    assert isinstance(state, State) and all(isinstance(d, str) for d in dropped)
    json.dumps(state.to_json())  # what was kept can be saved again


@settings(FUZZ, max_examples=max(20, EXAMPLES // 5))
@given(st.binary(max_size=400) | _json_values.map(lambda v: json.dumps(v).encode())
       | st.integers(1, 5000).map(lambda n: b'{"events": ' + b"[" * n + b"]" * n + b"}"))
def test_fuzz_state_file_bytes_never_stop_the_load(tmp_path_factory, raw):
    ran("state-file")
    directory = tmp_path_factory.mktemp("state")
    (directory / "state.json").write_bytes(raw)
    store = Store(str(directory))
    warning = store.load()
    assert warning is None or (isinstance(warning, str) and len(warning) < MAX_MESSAGE)
    store.commit_now()  # and what it holds now can be written back


# ---------------------------------------------------------------------------------------------- outside text
# every way text from outside enters the agent, fed text no well-behaved peer sends: bytes that are not UTF-8,
# lone surrogates, C0/C1 controls and terminal escapes, bidi and line-separator marks, and great lengths
_any_char = st.integers(0, 0x10FFFF).map(chr)  # (surrogates included: hypothesis's own text() leaves them out)
_nasty = st.sampled_from(["\x1b[31mRED\x1b[0m", "\x9b2J", "\udc9b", "\ud800", "\u202e", "\u2028", "\x00", "\x7f",
                          "\r\n", "\t", "  ", "\ufeff", "\U000e0001", "\udbff\udfff", "x" * 5000, "\u009b" * 300])
_outside = (st.lists(_any_char | _nasty, max_size=12).map("".join) | st.text(max_size=40)
            | st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")))
TEXT_RUNS: dict[str, list[int]] = {}  # target: [examples, misbehaved]


def _unclean(text) -> str | None:
    """What is wrong with ``text`` as text that left an entry point, or None."""
    import unicodedata
    if not isinstance(text, str):
        return f"not a str: {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"not valid UTF-8: {text[:80]!r}"
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")]
    return f"holds {bad[:3]!r}: {text[:80]!r}" if bad else None


def check_text(target: str, *texts, limit: int = 2000) -> None:
    """Counts one example of ``target``; every text must be clean and at most ``limit`` characters."""
    counts = TEXT_RUNS.setdefault(target, [0, 0])
    counts[0] += 1
    problems = [why for why in map(_unclean, texts) if why] + [f"{len(t)} characters" for t in texts
                                                                 if isinstance(t, str) and len(t) > limit]
    if problems:
        counts[1] += 1
    record_count("fuzz outside text", ", ".join(f"{k} {n} ({m} misbehaved)" for k, (n, m) in sorted(TEXT_RUNS.items()))
                 + " examples")
    assert not problems, problems


@FUZZ
@given(_outside | st.binary(max_size=300), st.integers(1, 500))
def test_fuzz_clean_makes_any_text_printable_utf8_bounded_and_is_idempotent(value, limit):
    from agent.text import clean, is_clean
    out = clean(value, limit)
    check_text("text.clean", out, limit=limit)
    assert clean(out, limit) == out and is_clean(out, limit)


@FUZZ
@given(omaha_tree(texts=_outside), st.booleans())
def test_fuzz_outside_text_in_answers_leaves_only_clean_reasons_and_valid_versions(tree, as_json):
    from agent.omaha import urls
    body = (")]}'\n" + json.dumps(to_json(tree))).encode() if as_json else to_xml(tree).encode("utf-8", "replace")
    from agent.http import OmahaHttpError
    try:
        response = decode_response(body)
    except ProtocolError as exc:  # what the adapter makes of it
        check_text("omaha answers", str(OmahaHttpError(f"unusable answer from the update server: {exc}")))
        return
    outcome = interpret(response, APP)
    check_text("omaha answers", getattr(outcome, "reason", ""))
    if hasattr(outcome, "packages"):
        assert versions.problem(outcome.version) is None
        assert all(urls.problem(u) is None for p in outcome.packages for u in p.urls)


@FUZZ
@given(_outside, _outside, st.sampled_from(["json", "raw", "nested", "bytes"]))
def test_fuzz_fleetlock_answers_become_clean_refusals(kind, value, shape):
    from agent.fleetlock import _reason
    raw = {"json": lambda: json.dumps({"kind": kind, "value": value}).encode(),
           "raw": lambda: (kind + value).encode("utf-8", "surrogatepass"),
           "nested": lambda: b'{"kind": ' + b"[" * 60000 + b"]" * 60000 + b"}",
           "bytes": lambda: kind.encode("utf-8", "surrogatepass") + b"\xff\x9b"}[shape]()
    check_text("fleetlock answers", *_reason(raw))


@FUZZ
@given(st.tuples(_outside, _outside, _outside, _outside, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)))
def test_fuzz_inhibitor_texts_from_logind_are_clean(row):
    from agent.logind import inhibitor
    lock = inhibitor(row)
    check_text("logind inhibitors", lock.what, lock.who, lock.why, lock.mode, str(lock))


@FUZZ
@given(_outside)
def test_fuzz_error_texts_that_quote_outside_text_are_clean(text):
    from agent.http import FetchError, OmahaHttpError, describe_error
    from agent.install import InstallError
    from agent.localfile import shown
    check_text("error messages", describe_error(ValueError(text)), str(OmahaHttpError(text)), str(FetchError(text)),
               str(InstallError(text)), shown(text))


@FUZZ
@given(_outside | _version)
def test_fuzz_one_version_rule_for_offers_arguments_and_statements(version):
    from agent import trust
    why = versions.problem(version)
    check_text("versions", why or version, limit=1000)
    statement = trust.statement("p.img", "ab" * 32, APP, version, 5)  # what a signed statement would say
    try:
        release = trust._statement(statement)
    except trust.SignatureError as exc:
        assert why is not None
        check_text("versions", str(exc))
    else:
        assert why is None and release.version == version


@FUZZ
@given(st.dictionaries(st.sampled_from(["operation", "current_version", "new_version", "last_error",
                                        "reboot_waiting_for", "reboot_version", "booted_slot", "trust"]), _outside),
       st.dictionaries(_outside, st.fixed_dictionaries({"state": _outside, "version": _outside}), max_size=2))
def test_fuzz_status_printed_to_a_terminal_holds_no_control_character(fields, slots):
    from agent.console import render_status
    from agent.text import shown
    status = {"operation": "idle", "current_version": "1", "booted_slot": "a", "reboot_time": 1, **fields,
              "slots": slots}
    lines = render_status(shown(status), 0).split("\n")
    check_text("terminal output", *lines, limit=20000)


# ---------------------------------------------------------------------------------------------- memory
_MEMORY_TARGETS = ("test_fuzz_xml_responses_only_raise_protocol_error", "test_fuzz_json_responses_only_raise_protocol_error",
                   "test_fuzz_bytes_and_damaged_xml_only_raise_protocol_error",
                   "test_fuzz_config_text_only_raises_config_error", "test_fuzz_config_values_only_raise_config_error",
                   "test_fuzz_versions_always_compare_in_a_total_order")
_MEMORY_BOUND_MIB = 768  # generous: a decoder that let a response or a config grow unbounded would pass it
# examples per memory child: past a few hundred, hypothesis's own record of the examples it explored grows with
# their count (tracemalloc: 87 MiB in hypothesis/internal/conjecture/data.py after 3000), which says nothing of
# the code under test; `make fuzz` runs its 20000 in the other tests
_MEMORY_EXAMPLES = 1000


def run_target(name: str) -> int:
    """(Run in a child process by ``_child_peak``.) Runs the fuzz target ``name``; the examples it ran."""
    globals()[name]()
    return sum(RUNS.values())


def _child_peak(target: str) -> tuple[float, float, int]:
    """Runs one fuzz target in a child process (tests/childmem.py): its own peak RSS (MiB), its peak RSS after
    its imports (MiB), and the examples it ran."""
    from .childmem import run_in_child
    report = run_in_child("tests.test_fuzz", "run_target", target, timeout=max(600, EXAMPLES / 5),
                          env={"FUZZ_EXAMPLES": str(min(EXAMPLES, _MEMORY_EXAMPLES))})
    return report["peak_mib"], report["base_mib"], report["result"]


def test_fuzz_targets_peak_rss_of_their_own_child_processes_is_printed_and_under_768_mib():
    """Each fuzz target of the decoders, the config loader and the version order runs in a child process of its own;
    its peak RSS is that child's own high-water mark, not the test runner's (which holds whatever earlier tests
    allocated)."""
    import time
    started, peaks = time.monotonic(), {}
    for target in _MEMORY_TARGETS:
        peaks[target] = _child_peak(target)
    short = {t: t.removeprefix("test_fuzz_").split("_only")[0].split("_always")[0] for t in peaks}
    text = (", ".join(f"{short[t]} {p:.0f}" for t, (p, _, _) in peaks.items()) + f" MiB peak RSS per child "
            f"({min(b for _, b, _ in peaks.values()):.0f} MiB after imports), {sum(n for *_, n in peaks.values())} "
            f"examples in {time.monotonic() - started:.0f} s")
    record_count("fuzz memory", text)
    print(f"\nfuzz memory: {text}")
    assert max(p for p, _, _ in peaks.values()) < _MEMORY_BOUND_MIB, text
