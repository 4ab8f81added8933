"""Every example in the protocol texts parses to the right model; our requests round-trip and satisfy an
independent stdlib parse."""
import dataclasses
import json
import pathlib
import xml.etree.ElementTree as StdET

import pytest

from agent.omaha import (
    AppMissing, NoUpdate, ProtocolError, UpdateOffer, Unusable, decode_request, decode_response, encode_request,
    encode_response, interpret,
)
from agent.omaha import pings, request as build
from agent.omaha.events import DOWNLOAD_STARTED, UPDATED_AND_REBOOTED
from agent.omaha.model import Event

DATA = pathlib.Path(__file__).parent / "data" / "omaha"
CROS_APP = "{87efface-864d-49a5-9bb3-4b050a7c227a}"
COREOS_APP = "e96281a6-d1af-4bde-9a0a-97b76e56dc57"


def load(name):
    return (DATA / name).read_bytes()


def test_chromeos_check_request_parses_with_its_attributes():
    req = decode_request(load("chromeos_check_request_1.xml"))
    assert req.protocol == "3.0" and req.updater == "ChromeOSUpdateEngine" and req.ismachine == 1
    assert req.installsource == "ondemandupdate"
    assert req.os.platform == "Chrome OS" and req.os.sp == "14092.106.2021_11_08_1354_x86_64"
    (app,) = req.apps
    assert app.appid == CROS_APP and app.track == "stable-channel" and app.board == "amd64-generic"
    assert app.delta_okay is True and app.installdate == 5418 and app.hardware_class == ""
    assert (app.ping.active, app.ping.a, app.ping.r) == (1, 3, 3)
    assert app.updatecheck is not None and app.events == ()
    second = decode_request(load("chromeos_check_request_2.xml"))
    assert (second.apps[0].ping.a, second.apps[0].ping.r) == (-1, -1)


@pytest.mark.parametrize("name,code", [("chromeos_event_13_request.xml", (13, 1)),
                                       ("chromeos_event_14_request.xml", (14, 1)),
                                       ("chromeos_event_3_request.xml", (3, 1))])
def test_chromeos_event_requests_parse(name, code):
    (app,) = decode_request(load(name)).apps
    (event,) = app.events
    assert (event.eventtype, event.eventresult) == code and app.updatecheck is None


@pytest.mark.parametrize("name", ["chromeos_event_13_response.xml", "chromeos_event_14_response.xml",
                                  "chromeos_event_3_response.xml"])
def test_chromeos_event_acks_parse(name):
    resp = decode_response(load(name))
    assert resp.server == "nebraska" and resp.daystart.elapsed_days == 5425
    assert resp.app(CROS_APP).event_statuses == ("ok",)


def test_chromeos_response_for_another_appid_is_app_missing():
    resp = decode_response(load("chromeos_update_response_other_appid.xml"))
    outcome = interpret(resp, CROS_APP)
    assert isinstance(outcome, AppMissing)
    assert "server did not answer for app " + CROS_APP in outcome.reason
    assert "{87efface-863d-49a5-9bb3-4b050a7c227a}" in outcome.reason
    # the offer itself is fine when asked for the app it names
    offer = interpret(resp, "{87EFFACE-863D-49A5-9BB3-4B050A7C227A}")
    assert isinstance(offer, UpdateOffer) and offer.version == "99999.0.0"
    (pkg,) = offer.packages
    assert pkg.urls == ("http://192.168.31.120:8080/delta.bin",)
    assert pkg.size == 653474911
    assert pkg.sha256_hex == "35b5d783a4b241d5e20fe8f5fd132a8007c0fac22015450f065eaddbe754831c"
    assert dict(offer.metadata)["MetadataSize"] == "57970"


def test_chromeos_malformed_response_is_no_usable_update_naming_what_is_missing():
    resp = decode_response(load("chromeos_update_response_malformed.xml"))
    outcome = interpret(resp, CROS_APP)
    assert isinstance(outcome, Unusable)
    assert "no usable update" in outcome.reason
    assert "the manifest has no version (unrecognised attributes: versions)" in outcome.reason
    # its package still names its SHA-256 through fp="1.<hex>", so the hash is not what is missing
    assert "hash" not in outcome.reason


def test_a_package_without_any_hash_names_what_is_missing():
    body = load("chromeos_update_response_malformed.xml").replace(b' fp="1.35B5', b' xfp="1.35B5')
    body = body.replace(b"versions=", b"version=").replace(b'sha256="NbXX', b'sha257="NbXX')
    outcome = interpret(decode_response(body), CROS_APP)
    assert isinstance(outcome, Unusable)
    assert "package 'delta.bin' has no usable hash" in outcome.reason
    assert "hash_has256" in outcome.reason


def test_coreos_update_response_keeps_every_hash():
    offer = interpret(decode_response(load("coreos_update_response.xml")), COREOS_APP.upper())
    assert isinstance(offer, UpdateOffer) and offer.version == "1.0.2"
    (pkg,) = offer.packages
    assert pkg.sha1.hex() == "fe7374bddde2ddf07f6bfcc728d115d14338964b"
    assert pkg.sha256_hex == "b602d630f0a081840d0ca8fc4d35810e42806642b3127bb702d65c3df227d0f5"
    assert pkg.urls == ("http://index.example.com/webapp:1.0.2/update.gz",) and pkg.size == 23


def test_coreos_noupdate_and_event_ack():
    assert isinstance(interpret(decode_response(load("coreos_noupdate_response.xml")), COREOS_APP), NoUpdate)
    ack = decode_response(load("coreos_event_ack_response.xml"))
    assert ack.app(COREOS_APP).status == "ok"
    req = decode_request(load("coreos_event_3_2_request.xml"))
    (app,) = req.apps
    assert app.bootid == "{fake-client-018}" and app.track == "beta"
    assert (app.events[0].eventtype, app.events[0].eventresult) == (3, 2)


def test_v3_two_app_examples():
    req = decode_request(load("v3_check_two_apps_request.xml"))
    assert [a.appid for a in req.apps] == ["{430FD4D0-B729-4F61-AA34-91526481799D}",
                                            "{D0AB2EBC-931B-4013-9FEB-C9C4C2225C8C}"]
    assert req.hw.sse2 == 1 and req.hw.sse == -1 and req.apps[0].installage == 39 and req.apps[0].ping.r == 1
    neg = decode_response(load("v3_noupdate_two_apps_response.xml"))
    assert all(isinstance(interpret(neg, a.appid), NoUpdate) for a in req.apps)
    pos = decode_response(load("v3_update_second_app_response.xml"))
    assert isinstance(interpret(pos, req.apps[0].appid), NoUpdate)
    offer = interpret(pos, req.apps[1].appid.lower())
    assert isinstance(offer, UpdateOffer) and offer.version == "13.0.782.112"
    assert offer.packages[0].sha1.hex() == "557ae2194548d1336a7cb954d36bc17a5e10dd9a"
    assert offer.packages[0].urls == ("http://cache.pack.google.com/edgedl/chrome/install/782.112/"
                                      "chrome_installer.exe",)
    assert pos.apps[1].updatecheck.manifest.actions[0].arguments == "--do-not-launch-chrome"


def test_v3_event_and_data_examples():
    req = decode_request(load("v3_event_request.xml"))
    events = req.apps[0].events
    assert [(e.eventtype, e.eventresult) for e in events] == [(9, 1), (5, 1), (2, 4)]
    assert events[2].errorcode == -2147219440 and events[2].extracode1 == 268435463
    assert decode_response(load("v3_event_response.xml")).apps[0].event_statuses == ("ok", "ok", "ok")
    data_req = decode_request(load("v3_data_request.xml"))
    assert [(d.name, d.index, d.text) for d in data_req.apps[0].data] == [
        ("install", "verboselogging", ""), ("untrusted", "0", "Some untrusted data")]
    data_resp = decode_response(load("v3_data_response.xml"))
    assert data_resp.apps[0].data[0].text == "app-specific values here"


INFO = build.ClientInfo(appid=CROS_APP, version="14092.106.2021_11_08_1016", track="stable-channel",
                        board="amd64-generic", os_version="6.1.0-13-amd64", arch="x86_64",
                        machineid="{deadbeef}", bootid="{b007}")


def our_requests():
    ping = pings.ping_for(pings.PingState(active_daystart=0.0, rollcall_daystart=0.0, active_days=5420,
                                          rollcall_days=5420, freshness="{f}"), now=3 * 86400 + 5)
    check = build.update_check(INFO, requestid="{r1}", sessionid="{s1}", interactive=True, ping=ping,
                               cohort=build.Cohort("1:2:", "", "stable"), installdate=5418)
    events = tuple(Event(eventtype=t, eventresult=r, previousversion="1.0", nextversion="2.0")
                   for t, r in (DOWNLOAD_STARTED, UPDATED_AND_REBOOTED))
    report = build.event_report(INFO, events, requestid="{r2}", sessionid="{s1}", installdate=5418)
    return [check, report]


@pytest.mark.parametrize("protocol", ["3.0", "3.1"])
@pytest.mark.parametrize("index", [0, 1])
def test_our_requests_round_trip(protocol, index):
    req = dataclasses.replace(our_requests()[index], protocol=protocol)
    body = encode_request(req)
    back = decode_request(body)
    expected = req if protocol == "3.0" else dataclasses.replace(req, protocol="3.1")
    assert back == expected


def test_our_xml_request_is_what_an_independent_parser_sees():
    check, report = our_requests()
    root = StdET.fromstring(encode_request(check))
    assert root.tag == "request" and root.get("protocol") == "3.0" and root.get("ismachine") == "1"
    assert root.get("installsource") == "ondemandupdate" and root.get("updater") == "omaha-agent"
    os_ = root.find("os")
    assert os_.get("platform") == "Linux" and os_.get("sp") == "6.1.0-13-amd64_x86_64" and os_.get("arch") == "x86_64"
    app = root.find("app")
    assert app.get("appid") == CROS_APP and app.get("track") == "stable-channel"
    assert app.get("board") == "amd64-generic" and app.get("delta_okay") == "false"
    assert app.get("installdate") == "5418" and app.get("cohort") == "1:2:" and app.get("machineid") == "{deadbeef}"
    ping = app.find("ping")
    assert (ping.get("active"), ping.get("a"), ping.get("r"), ping.get("ad"), ping.get("rd")) == \
        ("1", "3", "3", "5420", "5420")
    assert ping.get("ping_freshness") == "{f}" and app.find("updatecheck") is not None
    events = StdET.fromstring(encode_request(report)).find("app").findall("event")
    assert [(e.get("eventtype"), e.get("eventresult")) for e in events] == [("13", "1"), ("3", "2")]
    assert events[1].get("previousversion") == "1.0" and events[1].get("nextversion") == "2.0"
    assert StdET.fromstring(encode_request(report)).find("app").find("updatecheck") is None


def test_our_json_request_is_what_json_sees():
    check = dataclasses.replace(our_requests()[0], protocol="3.1")
    body = json.loads(encode_request(check))["request"]
    assert body["protocol"] == "3.1" and body["@os"] == "linux" and body["ismachine"] == 1
    (app,) = body["app"]
    assert app["appid"] == CROS_APP and app["ping"]["rd"] == 5420 and "updatecheck" in app


@pytest.mark.parametrize("protocol", ["3.0", "3.1"])
def test_responses_round_trip_through_both_dialects(protocol):
    for name in ("chromeos_update_response_other_appid.xml", "coreos_update_response.xml",
                 "v3_update_second_app_response.xml", "v3_data_response.xml", "chromeos_event_3_response.xml"):
        resp = dataclasses.replace(decode_response(load(name)), protocol=protocol)
        back = decode_response(encode_response(resp))
        assert back == (resp if protocol == "3.0" else dataclasses.replace(resp, protocol="3.1")), name


def test_json_response_with_safe_prefix_and_actions_list():
    body = b""")]}'
{"response":{"protocol":"3.1","daystart":{"elapsed_days":6000},"app":[{"appid":"X","status":"ok",
 "updatecheck":{"status":"ok","urls":{"url":[{"codebase":"https://a/"},{"codebase":"https://b"}]},
 "manifest":{"version":"2.0","packages":{"package":[{"name":"p.img","size":12,
 "hash_sha256":"B602D630F0A081840D0CA8FC4D35810E42806642B3127BB702D65C3DF227D0F5","fp":"1.b602"}]}}}}]}}"""
    offer = interpret(decode_response(body), "x")
    assert isinstance(offer, UpdateOffer)
    assert offer.packages[0].urls == ("https://a/p.img", "https://b/p.img")
    assert offer.packages[0].sha256_hex.startswith("b602d630")


def test_unknown_elements_and_attributes_are_tolerated_and_defaults_applied():
    body = b"""<response protocol="3.0" novel="x"><future/><app appid="A" shiny="1"><unknown status="x"/>
    <updatecheck status="noupdate" PollInterval="3600"><bonus/></updatecheck></app></response>"""
    resp = decode_response(body)
    assert resp.server == "" and resp.daystart.elapsed_seconds is None
    outcome = interpret(resp, "a")
    assert isinstance(outcome, NoUpdate) and outcome.poll_interval == 3600


def test_a_bad_integer_names_the_element():
    body = b'<response protocol="3.0"><app appid="A"><updatecheck status="ok"><manifest version="2">' \
           b'<packages><package name="p" size="lots"/></packages></manifest></updatecheck></app></response>'
    with pytest.raises(ProtocolError, match=r"response/app/updatecheck/manifest/packages/package: size='lots'"):
        decode_response(body)
