"""Hostile bodies are refused quickly, with bounded memory, and only ever as ProtocolError."""
import resource
import time

import pytest
from hypothesis import given, settings, strategies as st

from agent.omaha import Limits, ProtocolError, decode_request, decode_response, interpret

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<response protocol="3.0"><app appid="&lol9;"/></response>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<response protocol="3.0"><app appid="&x;"/></response>"""
DTD_ONLY = b"""<?xml version="1.0"?><!DOCTYPE response SYSTEM "http://127.0.0.1:9/evil.dtd">
<response protocol="3.0"/>"""


def _refused_fast(body, limits=Limits()):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ProtocolError) as info:
        decode_response(body, limits)
    elapsed = time.perf_counter() - start
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return info.value, elapsed, grown_kib


@pytest.mark.parametrize("body,what", [(BILLION_LAUGHS, "Forbidden"), (EXTERNAL_ENTITY, "Forbidden"),
                                       (DTD_ONLY, "DTDForbidden")])
def test_entities_and_dtds_are_refused(body, what):
    error, elapsed, grown = _refused_fast(body)
    assert what in str(error)
    assert elapsed < 2 and grown < 50 * 1024


def test_a_10_mb_body_is_refused_before_parsing():
    body = b'<response protocol="3.0">' + b"<x/>" * (10 * 1024 * 1024 // 4) + b"</response>"
    error, elapsed, grown = _refused_fast(body)
    assert "over the 1048576-byte limit" in str(error)


def test_100k_nested_elements_are_refused():
    body = b"<response>" + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</response>"
    error, elapsed, grown = _refused_fast(body, Limits(max_bytes=2 << 20))
    assert "nested deeper than" in str(error)
    assert elapsed < 2 and grown < 50 * 1024


def test_100k_sibling_elements_are_refused():
    body = b"<response>" + b"<a/>" * 100_000 + b"</response>"
    error, _, _ = _refused_fast(body)
    assert "more than 10000 elements" in str(error)


def test_deep_json_is_refused():
    body = b'{"response":' + b'{"a":' * 5000 + b"{}" + b"}" * 5000 + b"}"
    error, _, _ = _refused_fast(body)
    assert "nested deeper" in str(error) or "recursion depth" in str(error)


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
