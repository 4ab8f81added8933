"""CUP-ECDSA against Google's own signed responses (shared/reference/cup-ecdsa.md: Chromium's network-time test
vectors, key version 7): each verifies, and no one-byte change of a body, of the proof or of the nonce does."""
import random

import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key

from agent import cup

KEY = load_der_public_key(bytes.fromhex(
    "3059301306072a8648ce3d020106082a8648ce3d030107034200049fb4827eae02a2f29c328ef800fc7545cf453601719357541ca7c509"
    "dab1bc36b1441c2e12582fe227404042ee957aace433acaa096f5c0f94a7b4b5e26bb6c4"))
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
VECTORS = [
    (b')]}\'\n{"current_time_millis":1676407030473,"server_nonce":-7.963518832647831E9}',
     "304402200b875bcd9391c08c319504ea4cac3703b58f50797c99ed008068d232c62f086802207babace8807a911ef7af424abdadac5b"
     "a118b06d1c68ddbe6c79e0f36da97218"),
    (b')]}\'\n{"current_time_millis":1676407054804,"server_nonce":2.660379914224199E64}',
     "30450220600b8b15525d52aa939f8174a24b63d3eb2b7543cf1d3a36eabd572518ec5118022100d6e79c05701e981308d22e95f945a4"
     "a1b7cc2b2ce9c67b87fbec44e3d4b2c4a5"),
    (b')]}\'\n{"current_time_millis":1676407071199,"server_nonce":5.150419571081495E-301}',
     "3045022100f78429f21c9b5e4db283b7b4a81d2f91f51969aae4e9960edf0b82f21c37c84a02200aa5e9e56bbf3cb16441355759425a"
     "31b0052fb371dfcb972d127cf185fe5424"),
    (b')]}\'\n{"current_time_millis":1676407085288,"server_nonce":-2.3616379802443122E-151}',
     "3045022015af65192d3f5024e068cee411b29c6c9093c159a6f5b7e7e8b9726a7eca3fa30221008dd1d69dc5e3cf364bb69366b3cc43"
     "4a057fdf2c52475d92492eaca45f4b2ecf"),
    (b')]}\'\n{"current_time_millis":1676407147062,"server_nonce":2.848761209101163E-158}',
     "3045022100ca8b4a4af0bfacdcbb589ee8d0a7fb0e20e618bcf380c775e0aa573ef9d12f300220367ac76938af4b630d8c8ddef72b0c"
     "1e59630f505b110a1f3b18cd42229e4035"),
]
CHALLENGE = cup.challenge(7, b"", nonce="123123123")


def test_the_challenge_is_the_one_chromium_sends():
    assert CHALLENGE == cup.Challenge("7:123123123", EMPTY)
    assert CHALLENGE.url("https://h/v1/update/") == f"https://h/v1/update/?cup2key=7:123123123&cup2hreq={EMPTY}"
    assert CHALLENGE.url("https://h/u?x=1").startswith("https://h/u?x=1&cup2key=")
    a, b = cup.challenge(7, b"{}"), cup.challenge(7, b"{}")
    assert a.cup2key != b.cup2key and len(a.cup2key.split(":")[1]) == 64  # a fresh 256-bit nonce each time


@pytest.mark.parametrize("n", range(len(VECTORS)))
def test_googles_signed_responses_verify_and_no_one_byte_mutation_does(n):
    body, sig = VECTORS[n]
    cup.verify(KEY, CHALLENGE, body, f"{sig}:{EMPTY}")
    cup.verify(KEY, CHALLENGE, body, cup.proof_from({"ETag": f'W/"{sig}:{EMPTY}"'}))  # the older header form
    rng = random.Random(n)
    for i in range(len(body)):  # every byte of the body
        mutated = bytearray(body)
        mutated[i] ^= 1 << rng.randrange(8)
        with pytest.raises(cup.CupError, match="does not verify"):
            cup.verify(KEY, CHALLENGE, bytes(mutated), f"{sig}:{EMPTY}")
    raw = bytes.fromhex(sig)
    for i in range(len(raw)):  # every byte of the signature
        mutated = bytearray(raw)
        mutated[i] ^= 0x01
        with pytest.raises(cup.CupError):
            cup.verify(KEY, CHALLENGE, body, f"{mutated.hex()}:{EMPTY}")
    with pytest.raises(cup.CupError, match="does not verify"):  # replayed against another nonce
        cup.verify(KEY, cup.Challenge("7:123123124", EMPTY), body, f"{sig}:{EMPTY}")
    with pytest.raises(cup.CupError, match="another request"):
        cup.verify(KEY, cup.Challenge("7:123123123", "00" * 32), body, f"{sig}:{EMPTY}")
    with pytest.raises(cup.CupError, match="no CUP proof"):
        cup.verify(KEY, CHALLENGE, body, cup.proof_from({}))
    with pytest.raises(cup.CupError, match="malformed"):
        cup.verify(KEY, CHALLENGE, body, f"zz:{EMPTY}")


# ---------------------------------------------------------------------------------------------- through the daemon
def cup_key(tmp_path):
    from .test_trust import openssl_key
    return openssl_key(tmp_path, "p256", "cup")


def cup_device(tmp_path, srv, public: str, version: int = 3):
    """A device that speaks plain http to the server, allowed because CUP vouches for every answer."""
    from .simdevice import Device
    dev = Device(tmp_path, srv.url)
    text = open(dev.config).read().replace("insecure_http: true", f"cup: {{key_version: {version}, "
                                                                  f"public_key: {public}}}")
    with open(dev.config, "w") as f:
        f.write(text)
    return dev


async def test_cup_answers_signed_by_the_server_are_trusted_and_plain_http_is_allowed(tmp_path):
    from agent.tools.devserver import DevServer

    from .simdevice import image
    private, public = cup_key(tmp_path)
    srv = DevServer([image(tmp_path, "2.0.0")], cup_key=private, cup_key_version=3)
    await srv.start()
    try:
        dev = cup_device(tmp_path, srv, public)
        rc, out, err = await dev.once()
        assert rc == 0 and "installed 2.0.0 on slot b" in out, err
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]  # the event acknowledgements were verified too
        assert all(r["cup2key"].startswith("3:") for r in srv.requests)
        assert len({r["cup2key"] for r in srv.requests}) == len(srv.requests)  # a fresh nonce every time
    finally:
        await srv.stop()


@pytest.mark.parametrize("fault,says", [("missing", "no CUP proof"), ("tampered", "does not verify"),
                                        ("other-request", "for another request")])
async def test_an_answer_without_a_valid_proof_is_refused_and_nothing_installs(tmp_path, fault, says):
    from agent.tools.devserver import DevServer, Faults

    from .simdevice import image
    private, public = cup_key(tmp_path)
    srv = DevServer([image(tmp_path, "2.0.0")], cup_key=private, cup_key_version=3,
                    faults=Faults(cup=fault, retry_after="7200"))
    await srv.start()
    try:
        dev = cup_device(tmp_path, srv, public)
        before = open(dev.slots["b"], "rb").read()
        rc, out, err = await dev.once()
        assert rc == 1 and says in err and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("omaha-agent: unusable answer from the update server:")
        assert open(dev.slots["b"], "rb").read() == before and srv.event_codes() == []
        assert dev.state()["retry_after_until"] is None  # the headers of an untrusted answer count for nothing
    finally:
        await srv.stop()


async def test_x_retry_after_is_not_trusted_over_plain_http_even_with_a_valid_cup_proof(tmp_path):
    """issue 25 row 10: a CUP proof covers the request and the body, never a header, so an X-Retry-After added on
    the way to a validly proven plain-http answer silenced background checks; now it binds only over verified
    TLS, and under CUP over plain http it is ignored and logged."""
    from agent.tools.devserver import DevServer, Faults

    from .simdevice import Device, image
    private, public = cup_key(tmp_path)
    srv = DevServer([image(tmp_path, "1.0.0")], cup_key=private, cup_key_version=3, faults=Faults(retry_after="7200"))
    await srv.start()
    try:
        (tmp_path / "plain").mkdir()
        plain = Device(tmp_path / "plain", srv.url)
        rc, out, err = await plain.cli("daemon", "--once", "-v")
        assert rc == 0 and "X-Retry-After ignored" in err, err
        assert plain.state()["retry_after_until"] is None
        (tmp_path / "cup").mkdir()
        signed = cup_device(tmp_path / "cup", srv, public)
        rc, out, err = await signed.cli("daemon", "--once", "-v")
        assert rc == 0 and "X-Retry-After ignored" in err, err
        assert signed.state()["retry_after_until"] is None
    finally:
        await srv.stop()


async def test_a_20_kib_cup_header_is_a_clear_error_not_cannot_reach_400(tmp_path):
    """issue 25 minor: a 20 KiB X-Cup-Server-Proof ended as a misleading "cannot reach the update server: 400"."""
    from agent.tools.devserver import DevServer, Faults

    from .simdevice import image
    private, public = cup_key(tmp_path)
    srv = DevServer([image(tmp_path, "2.0.0")], cup_key=private, cup_key_version=3, faults=Faults(cup="huge"))
    await srv.start()
    try:
        dev = cup_device(tmp_path, srv, public)
        rc, out, err = await dev.once()
        last = err.strip().splitlines()[-1]
        assert rc == 1 and "Traceback" not in err, err
        assert last.startswith("omaha-agent: unusable answer from the update server: its answer has a header"), last
        assert "over 8190 bytes" in last and "cannot reach" not in last and "400" not in last, last
    finally:
        await srv.stop()
