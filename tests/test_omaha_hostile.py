"""Hostile bodies are refused with bounded memory (measured in a child process), and only ever as ProtocolError."""
import pytest
from hypothesis import given, settings, strategies as st

from agent.omaha import Limits, ProtocolError, decode_request, decode_response, interpret

from .childmem import in_child

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<response protocol="3.0"><app appid="&lol9;"/></response>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<response protocol="3.0"><app appid="&x;"/></response>"""
DTD_ONLY = b"""<?xml version="1.0"?><!DOCTYPE response SYSTEM "http://127.0.0.1:9/evil.dtd">
<response protocol="3.0"/>"""


BODIES = {
    "billion laughs": lambda: BILLION_LAUGHS,
    "external entity": lambda: EXTERNAL_ENTITY,
    "DTD only": lambda: DTD_ONLY,
    "10 MB": lambda: b'<response protocol="3.0">' + b"<x/>" * (10 * 1024 * 1024 // 4) + b"</response>",
    "100k nested": lambda: b"<response>" + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</response>",
    "100k siblings": lambda: b"<response>" + b"<a/>" * 100_000 + b"</response>",
    "deep JSON": lambda: b'{"response":' + b'{"a":' * 5000 + b"{}" + b"}" * 5000 + b"}",
}


def refusal(name: str, max_bytes: int | None = None) -> str:
    """(Run in a child process by ``in_child``.) The ProtocolError that decoding ``BODIES[name]`` raises."""
    body = BODIES[name]()
    try:
        decode_response(body, Limits(max_bytes=max_bytes) if max_bytes else Limits())
    except ProtocolError as exc:
        return str(exc)
    return "decoded"


def refused(name: str, max_bytes: int | None = None) -> tuple[str, float]:
    """The error for ``BODIES[name]`` and how many MiB the child's peak RSS grew by while decoding it (the body
    itself included)."""
    return in_child("tests.test_omaha_hostile", "refusal", name, max_bytes)


@pytest.mark.parametrize("name,what", [("billion laughs", "Forbidden"), ("external entity", "Forbidden"),
                                       ("DTD only", "DTDForbidden")])
def test_entities_and_dtds_are_refused_with_bounded_memory(name, what):
    error, grown = refused(name)
    assert what in error and grown < 50, (error, grown)


def test_a_10_mb_body_is_refused_before_parsing():
    error, grown = refused("10 MB")
    assert "over the 1048576-byte limit" in error
    assert grown < 40, grown  # the body's 10 MiB and a copy at most: never a parse tree of 2.6 million elements


def test_100k_nested_elements_are_refused_with_bounded_memory():
    error, grown = refused("100k nested", 2 << 20)
    assert "nested deeper than" in error and grown < 50, (error, grown)


def test_100k_sibling_elements_are_refused():
    error, _ = refused("100k siblings")
    assert "more than 10000 elements" in error


def test_deep_json_is_refused():
    error, _ = refused("deep JSON")
    assert "nested deeper" in error or "recursion depth" in error


@pytest.mark.parametrize("body", [b"", b"   ", b"\x00\x01", b"<response", b"<response></request>",
                                  b"<request protocol='3.0'/>", b")]}'\n[1,2]", b"{\"response\": 5}",
                                  b"{\"response\": {\"app\": [{\"appid\": \"a\", \"updatecheck\": [[1]]}]}}",
                                  b"\xff\xfe<\x00r\x00", b"<?xml version='1.0' encoding='klingon'?><response/>"])
def test_junk_is_a_protocol_error(body):
    with pytest.raises(ProtocolError):
        decode_response(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_never_raises_anything_but_protocol_error_on_bytes(body):
    for decode in (decode_response, decode_request):
        try:
            decode(body)
        except ProtocolError:
            pass


xml_attr = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
names = st.sampled_from(["app", "updatecheck", "manifest", "packages", "package", "urls", "url", "actions",
                         "action", "daystart", "ping", "event", "data", "response", "request", "x"])
attr_names = st.sampled_from(["appid", "status", "version", "size", "hash", "hash_sha256", "fp", "codebase",
                              "name", "event", "sha256", "elapsed_days", "elapsed_seconds", "eventtype", "a", "r"])


@st.composite
def xml_trees(draw, depth=0):
    name = draw(names)
    attrs = draw(st.dictionaries(attr_names, xml_attr, max_size=4))
    from xml.sax.saxutils import quoteattr
    text = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
    children = draw(st.lists(xml_trees(depth + 1), max_size=3)) if depth < 5 else []
    return f"<{name}{text}>{''.join(children)}</{name}>"


@settings(max_examples=300, deadline=None)
@given(xml_trees())
def test_structured_but_wrong_xml_never_escapes(doc):
    body = ("<response protocol='3.0'>" + doc + "</response>").encode("utf-8", "surrogatepass")
    try:
        resp = decode_response(body)
    except ProtocolError:
        return
    for app in resp.apps:
        interpret(resp, app.appid)  # never raises: every outcome is a value
