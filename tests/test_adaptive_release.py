"""Signing an adaptive release (``omaha-agent sign --chunks``) and verifying it: the statement names the image and
the chunk files that ``omaha-agent chunk`` wrote, and the device's own envelope parser reads them back."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from agent import trust

from .test_adaptive_cut import image_bytes, write
from .test_trust import openssl_key

pytest.importorskip("pyfastcdc")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = "{e3b0c442-98fc-1c14-9afb-f4c8996fb924}"


def cli(*args):
    done = subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr


def digest(path) -> tuple[str, int]:
    data = open(path, "rb").read()
    return hashlib.sha256(data).hexdigest(), len(data)


@pytest.fixture
def release(tmp_path):
    """A cut image: (image bytes, index path, data path)."""
    data = image_bytes(3 << 20, seed=11)
    img = write(tmp_path / "rootfs.ext4", data)
    rc, out, err = cli("chunk", img, "--level", "3")
    assert rc == 0, err
    return data, img + ".cidx", img + ".czst"


def test_a_release_signed_with_its_chunks_opens_to_the_image_and_chunk_files(tmp_path, release):
    data, cidx, czst = release
    private, public = openssl_key(tmp_path, "ed25519", "rel")
    rc, out, err = cli("sign", "--key", private, "--appid", APP, "--version", "2.0.0", "--chunks", cidx)
    assert rc == 0, err
    assert out.strip().endswith(czst + ".sig")  # the data file is the payload
    envelope = open(czst + ".sig", "rb").read()
    rel = trust.open_envelope(envelope, trust.load_public_keys([public]))
    assert (rel.name, (rel.sha256, rel.size)) == ("rootfs.ext4.czst", digest(czst))
    assert rel.image == trust.Artifact(None, hashlib.sha256(data).hexdigest(), len(data))
    assert rel.chunks.index == trust.Artifact("rootfs.ext4.cidx", *digest(cidx))
    assert rel.chunks.data == trust.Artifact("rootfs.ext4.czst", *digest(czst))
    statement = json.loads(__import__("base64").b64decode(json.loads(envelope)["payload"]))
    assert [s["name"] for s in statement["subject"]] == ["rootfs.ext4.czst", "rootfs.ext4.cidx"]

    rc, out, err = cli("verify", "--key", public, czst)
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["image"] == {"sha256": rel.image.sha256, "size": len(data)}
    assert shown["chunks"]["index"] == {"name": "rootfs.ext4.cidx", "sha256": rel.chunks.index.sha256,
                                        "size": rel.chunks.index.size, "checked": True}
    assert shown["chunks"]["data"]["checked"] is True


def test_verify_refuses_a_chunk_index_beside_the_payload_that_is_not_the_signed_one(tmp_path, release):
    _, cidx, czst = release
    private, public = openssl_key(tmp_path, "p256", "rel")
    assert cli("sign", "--key", private, "--appid", APP, "--version", "2.0.0", "--chunks", cidx)[0] == 0
    raw = bytearray(open(cidx, "rb").read())
    raw[-1] ^= 1
    open(cidx, "wb").write(raw)
    rc, out, err = cli("verify", "--key", public, czst)
    assert rc == 1 and err.count("\n") == 1
    assert "the signed chunk index rootfs.ext4.cidx is not the file beside the payload" in err
    os.unlink(cidx)  # not there at all: verified without it, and said so
    rc, out, err = cli("verify", "--key", public, czst)
    assert rc == 0 and json.loads(out)["chunks"]["index"]["checked"] is False


def test_a_separate_payload_is_signed_as_the_first_subject_beside_both_chunk_files(tmp_path, release):
    data, cidx, czst = release
    import zstandard
    payload = write(tmp_path / "rootfs.ext4.zst", zstandard.ZstdCompressor(level=3).compress(data))
    private, public = openssl_key(tmp_path, "ed25519", "rel")
    rc, out, err = cli("sign", "--key", private, "--appid", APP, "--version", "2.0.0", "--chunks", cidx, payload)
    assert rc == 0, err
    rel = trust.open_envelope(open(payload + ".sig", "rb").read(), trust.load_public_keys([public]))
    assert (rel.sha256, rel.size) == digest(payload)
    assert (rel.chunks.index.name, rel.chunks.data.name) == ("rootfs.ext4.cidx", "rootfs.ext4.czst")


def test_sign_refuses_a_data_file_that_is_not_its_index_image(tmp_path, release):
    data, cidx, czst = release
    private, _ = openssl_key(tmp_path, "ed25519", "rel")
    blob = bytearray(open(czst, "rb").read())
    # the same length, one byte of a frame's compressed body changed: the frame no longer makes its chunk
    blob[len(blob) // 2] ^= 0xFF
    open(czst, "wb").write(blob)
    rc, out, err = cli("sign", "--key", private, "--appid", APP, "--version", "2.0.0", "--chunks", cidx)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "rootfs.ext4.czst: " in err and ("frame" in err or "chunk" in err)
    assert not os.path.exists(czst + ".sig")
    other = write(tmp_path / "other", image_bytes(1 << 20, seed=12))
    assert cli("chunk", other, "--level", "3")[0] == 0
    os.replace(other + ".czst", czst)  # another image's data file under this name
    rc, out, err = cli("sign", "--key", private, "--appid", APP, "--version", "2.0.0", "--chunks", cidx)
    assert rc == 1 and "its index's frames add up to" in err


def test_sign_refuses_an_index_that_is_not_one(tmp_path, release):
    _, cidx, _ = release
    private, _ = openssl_key(tmp_path, "ed25519", "rel")
    open(cidx, "wb").write(b"not an index at all, but long enough to hold a header of seventy-six bytes......")
    rc, out, err = cli("sign", "--key", private, "--appid", APP, "--version", "2.0.0", "--chunks", cidx)
    assert rc == 1 and "does not start with its magic" in err and err.count("\n") == 1
