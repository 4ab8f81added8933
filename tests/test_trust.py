"""Signed releases: DSSE envelopes over an in-toto statement, keys made by openssl, checked by the daemon before the
target slot is touched, against the development server on 127.0.0.1."""
import base64
import hashlib
import json
import subprocess

import pytest

from agent import trust
from agent.tools.devserver import DevServer

from .conftest import need_tool
from .simdevice import APP, Device, image


def openssl_key(tmp_path, kind: str, name: str):
    """(private PEM path, public PEM path), made by openssl as a build host would."""
    need_tool("openssl")
    private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    algo = ["-algorithm", "ed25519"] if kind == "ed25519" else ["-algorithm", "EC", "-pkeyopt",
                                                                 "ec_paramgen_curve:P-256"]
    subprocess.run(["openssl", "genpkey", *algo, "-out", str(private)], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True,
                   capture_output=True)
    return str(private), str(public)


@pytest.fixture
def keys(tmp_path):
    return {kind: openssl_key(tmp_path, kind, kind) for kind in ("ed25519", "p256")}


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_an_envelope_signed_by_a_trusted_key_opens_to_its_statement(tmp_path, keys, kind):
    payload = tmp_path / "v2.img"
    payload.write_bytes(b"release" * 1000)
    envelope = trust.sign_file(str(payload), trust.load_private_key(keys[kind][0]), APP, "2.0.0", "stable")
    release = trust.open_envelope(envelope, trust.load_public_keys([keys[kind][1]]))
    assert release == trust.Release("v2.img", hashlib.sha256(payload.read_bytes()).hexdigest(), APP, "2.0.0", 7000,
                                    "stable", None)
    other = "p256" if kind == "ed25519" else "ed25519"
    with pytest.raises(trust.SignatureError, match="no signature verifies under a trusted key"):
        trust.open_envelope(envelope, trust.load_public_keys([keys[other][1]]))
    env = json.loads(envelope)
    body = base64.b64decode(env["payload"]).replace(b"2.0.0", b"9.0.0")
    env["payload"] = base64.b64encode(body).decode()  # the statement altered after signing
    with pytest.raises(trust.SignatureError, match="no signature verifies"):
        trust.open_envelope(json.dumps(env).encode(), trust.load_public_keys([keys[kind][1]]))


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_an_envelope_made_with_plain_openssl_verifies(tmp_path, keys, kind):
    # the README's recipe for build systems without the agent: the statement, its PAE, openssl signs it
    statement = trust.statement("v2.img", "ab" * 32, APP, "2.0.0", 123)
    pae = tmp_path / "pae.bin"
    pae.write_bytes(b"DSSEv1 %d %s %d %s" % (len(trust.PAYLOAD_TYPE), trust.PAYLOAD_TYPE.encode(), len(statement),
                                             statement))
    sig = tmp_path / "sig.bin"
    if kind == "ed25519":
        cmd = ["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", keys[kind][0], "-in", str(pae), "-out", str(sig)]
    else:
        cmd = ["openssl", "dgst", "-sha256", "-sign", keys[kind][0], "-out", str(sig), str(pae)]
    subprocess.run(cmd, check=True, capture_output=True)
    envelope = json.dumps({"payloadType": trust.PAYLOAD_TYPE, "payload": base64.b64encode(statement).decode(),
                           "signatures": [{"sig": base64.b64encode(sig.read_bytes()).decode()}]}).encode()
    release = trust.open_envelope(envelope, trust.load_public_keys([keys[kind][1]]))
    assert (release.version, release.size, release.sha256) == ("2.0.0", 123, "ab" * 32)


@pytest.mark.parametrize("envelope,says", [
    (b"x" * (70 << 10), "larger than 64 KiB"),
    (b"not json", "not a JSON DSSE envelope"),
    (b'{"payloadType": "text/plain", "payload": "", "signatures": []}', "payloadType"),
    (b'{"payloadType": "application/vnd.in-toto+json", "payload": "%%%", "signatures": [{"sig": "AA"}]}',
     "not valid base64"),
    (b'{"payloadType": "application/vnd.in-toto+json", "payload": "e30=", "signatures": []}', "no signatures"),
])
def test_malformed_envelopes_are_refused_with_a_reason(keys, envelope, says):
    with pytest.raises(trust.SignatureError, match=says):
        trust.open_envelope(envelope, trust.load_public_keys([keys["p256"][1]]))


def test_a_key_file_that_is_not_a_public_key_is_named(tmp_path, keys):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(trust.TrustKeyError, match="bad.pem: not a PEM public key"):
        trust.load_public_keys([str(bad)])
    assert len(trust.load_public_keys([str(tmp_path / "*.pub.pem")])) == 2


# ---------------------------------------------------------------------------------------------- through the daemon
def signed_device(tmp_path, server, public: str, extra: str = "") -> Device:
    return Device(tmp_path, server.url, trust=f"trust: {{keys: [{public}], require_signature: true}}\n", extra=extra)


async def with_release(tmp_path, sign_key=None, version="2.0.0"):
    srv = DevServer([image(tmp_path, version)], sign_key=sign_key, log_path=str(tmp_path / "server.jsonl"))
    await srv.start()
    return srv


async def test_a_signed_release_installs(tmp_path, keys):
    srv = await with_release(tmp_path, keys["ed25519"][0])
    try:
        dev = signed_device(tmp_path, srv, keys["ed25519"][1])
        rc, out, err = await dev.once()
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
    finally:
        await srv.stop()


def _resign(tmp_path, srv, key_path, **change):
    img = srv.images[0]
    fields = dict(name=img.name, sha256_hex=img.sha256.hex(), appid=img.appid, version=img.version, size=img.size)
    fields.update(change)
    body = trust.statement(**fields)
    img.signature = trust.sign_statement(body, trust.load_private_key(key_path))


CASES = {
    "missing": (lambda tmp, srv, keys: None, "no signature for the release"),
    "malformed": (lambda tmp, srv, keys: setattr(srv.images[0], "signature", b"{not json"), "not a JSON DSSE"),
    "wrong key": (lambda tmp, srv, keys: _resign(tmp, srv, keys["p256"][0]), "no signature verifies"),
    "other digest": (lambda tmp, srv, keys: _resign(tmp, srv, keys["ed25519"][0], sha256_hex="00" * 32),
                     "signed digest"),
    "other size": (lambda tmp, srv, keys: _resign(tmp, srv, keys["ed25519"][0], size=5), "signed size"),
    "other version": (lambda tmp, srv, keys: _resign(tmp, srv, keys["ed25519"][0], version="2.0.1"),
                      "signed as version '2.0.1'"),
    "other app": (lambda tmp, srv, keys: _resign(tmp, srv, keys["ed25519"][0], appid="{other}"), "signed for app"),
    "other track": (lambda tmp, srv, keys: _resign(tmp, srv, keys["ed25519"][0], track="beta"), "signed for track"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_bad_signature_is_refused_with_3_0_code_18_and_the_slot_untouched(tmp_path, keys, case):
    srv = await with_release(tmp_path)  # no sign_key: each case provides its own envelope
    try:
        tamper, says = CASES[case]
        tamper(tmp_path, srv, keys)
        dev = signed_device(tmp_path, srv, keys["ed25519"][1])
        before = open(dev.slots["b"], "rb").read()
        env_before = (dev.dir / "bootenv.json").read_bytes()
        rc, out, err = await dev.once()
        assert rc == 1 and says in err and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("omaha-agent: update to 2.0.0 failed: signature refused")
        assert srv.event_codes() == ["3/0"] and srv.events[0]["errorcode"] == 18
        assert open(dev.slots["b"], "rb").read() == before  # byte for byte
        assert (dev.dir / "bootenv.json").read_bytes() == env_before  # not even marked bad
        logged = [json.loads(line) for line in (tmp_path / "server.jsonl").read_text().splitlines()]
        assert [r["kind"] for r in logged if r["kind"] in ("download", "signature")] in ([], ["signature"])
        assert dev.state()["blocked"]["version"] == "2.0.0"
        rc, out, err = await dev.once()  # blocked like a hash failure: not fetched again at once
        assert rc == 0 and "failed on this device" in out
    finally:
        await srv.stop()


async def test_cli_sign_and_verify(tmp_path, keys):
    payload = image(tmp_path, "2.0.0").path
    dev = Device(tmp_path, "http://127.0.0.1:9/")  # only for its cli helper; no server is contacted
    rc, out, err = await dev.cli("sign", "--key", keys["p256"][0], "--appid", APP, "--version", "2.0.0", payload,
                                 config=False)
    assert rc == 0 and out.strip().endswith(payload + ".sig"), err
    rc, out, err = await dev.cli("verify", "--key", keys["p256"][1], payload, config=False)
    assert rc == 0 and json.loads(out)["version"] == "2.0.0", err
    rc, out, err = await dev.cli("verify", "--key", keys["ed25519"][1], payload, config=False)
    assert rc == 1 and err.strip() == f"omaha-agent: {payload}.sig: no signature verifies under a trusted key " \
                                      "(signed with another key, or altered)"
    with open(payload, "ab") as f:
        f.write(b"tampered")
    rc, out, err = await dev.cli("verify", "--key", keys["p256"][1], payload, config=False)
    assert rc == 1 and "not those of" in err


async def test_status_says_when_unsigned_releases_are_accepted(tmp_path, server):
    dev = Device(tmp_path, server.url)  # the test device does not require signatures
    rc, out, err = await dev.cli("daemon", "--once", "-v")
    assert rc == 0 and "release signatures are not required" in err


# ---------------------------------------------------------------------------------------------- offline installs
async def test_an_offline_install_of_a_signed_file_goes_through_to_3_2(tmp_path, keys, system_bus):
    from agent.dbus.client import Client, ClientError

    from .test_dbus import Daemon, cli, wait_status
    srv = DevServer([], log_path=str(tmp_path / "server.jsonl"))  # reachable for the events; offers nothing
    await srv.start()
    payload = image(tmp_path, "2.0.0").path
    envelope = trust.sign_file(payload, trust.load_private_key(keys["p256"][0]), APP, "2.0.0", "stable")
    (tmp_path / "v2.0.0.img.sig").write_bytes(envelope)
    unsigned = image(tmp_path, "3.0.0").path
    dev = signed_device(tmp_path, srv, keys["p256"][1], extra="schedule: {initial_delay: 3600}\n")
    daemon = Daemon(dev)
    await daemon.start()
    client = await Client.connect()
    try:
        before = open(dev.slots["b"], "rb").read()
        rc, out, err = await cli("install", unsigned, "--wait", timeout=60)
        assert rc == 1 and "signature refused: no signature envelope" in out, (out, err)
        assert open(dev.slots["b"], "rb").read() == before and srv.events == []
        rc, out, err = await cli("install", payload, "--wait", timeout=60)
        assert rc == 0, (out, err)
        assert f"installing {payload}" in out and "2.0.0 is installed; it boots on trial after a reboot" in out
        with pytest.raises(ClientError, match="waits for a reboot; reboot first"):
            await client.call("Install", "sss", [payload, "", ""])
        await wait_status(client, lambda s: not s["pending_events"])
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        assert "rebooting into 2.0.0" in await client.call("Reboot")
        await wait_status(client, lambda s: s["operation"] == "updated-need-reboot" and dev.boot.booted_slot() == "b")
    finally:
        client.close()
        await daemon.stop()
    second = Daemon(dev)
    await second.start()
    client = await Client.connect()
    try:
        await wait_status(client, lambda s: s["operation"] == "idle" and not s["pending_events"])
        assert srv.event_codes() == ["13/1", "14/1", "3/1", "3/2"] and dev.boot.status()["b"].state.value == "good"
    finally:
        client.close()
        await second.stop()
        await srv.stop()


# ------------------------------------------------------------------------------ adaptive releases' statements
def _private(keys):
    return trust.load_private_key(keys["p256"][0])


def _public(keys):
    return trust.load_public_keys([keys["p256"][1]])

def _adaptive_statement(**change) -> dict:
    body = json.loads(trust.statement(
        "os.czst", "aa" * 32, APP, "2.0.0", 900, image=trust.Artifact(None, "bb" * 32, 4096),
        chunks=trust.Chunks(trust.Artifact("os.cidx", "cc" * 32, 200), trust.Artifact("os.czst", "aa" * 32, 900))))
    for path, value in change.items():
        node, *keys = path.split(".")
        target = body[node]
        for k in keys[:-1]:
            target = target[k]
        if value is None:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return body


def test_an_adaptive_statement_names_its_image_and_chunk_files_and_lists_them_as_subjects(keys):
    body = _adaptive_statement()
    assert [s["name"] for s in body["subject"]] == ["os.czst", "os.cidx"]  # the data file is the payload: once
    release = trust.open_envelope(trust.sign_statement(json.dumps(body).encode(), _private(keys)), _public(keys))
    assert release.image == trust.Artifact(None, "bb" * 32, 4096)
    assert release.chunks.index == trust.Artifact("os.cidx", "cc" * 32, 200)
    assert release.chunks.data == trust.Artifact("os.czst", "aa" * 32, 900)


@pytest.mark.parametrize("change, says", [
    ({"predicate.chunks.index.name": "../os.cidx"}, "plain file name"),
    ({"predicate.chunks.index.name": "https://elsewhere.example/os.cidx"}, "plain file name"),
    ({"predicate.chunks.data.sha256": "dd" * 32}, "not among its subjects"),
    ({"predicate.chunks": None}, "no chunks"),
    ({"predicate.image.size": -1}, "image has no size"),
    ({"predicate.chunks.index.sha256": "zz"}, "chunk index has no sha256"),
])
def test_an_adaptive_statement_that_does_not_hold_together_is_refused(keys, change, says):
    body = json.dumps(_adaptive_statement(**change)).encode()
    with pytest.raises(trust.SignatureError, match=says):
        trust.open_envelope(trust.sign_statement(body, _private(keys)), _public(keys))


def test_a_plain_statement_with_more_than_one_subject_is_still_refused(keys):
    body = json.loads(trust.statement("os.img", "aa" * 32, APP, "2.0.0", 900))
    body["subject"].append({"name": "other", "digest": {"sha256": "bb" * 32}})
    with pytest.raises(trust.SignatureError, match="exactly one subject"):
        trust.open_envelope(trust.sign_statement(json.dumps(body).encode(), _private(keys)), _public(keys))
