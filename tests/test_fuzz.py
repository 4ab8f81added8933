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
def omaha_tree(draw, name="response", depth=0):
    attrs = {}
    for attr in _ATTRS.get(name, []):
        if draw(st.booleans()):
            attrs[attr] = draw(_texts)
    if name == "app" and draw(st.integers(0, 3)):
        attrs["appid"] = APP
    if draw(st.integers(0, 9)) == 0:
        attrs[draw(st.sampled_from(["x", "size", "version", "hash_sha256"]))] = draw(_texts)
    children = []
    if depth < 7:
        for child in _CHILDREN.get(name, []):
            for _ in range(draw(st.integers(0, 2))):
                children.append(draw(omaha_tree(child, depth + 1)))
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
