"""Signed releases: a DSSE envelope holding an in-toto Statement, signed by a key the update server never holds.

The envelope (fetched from the payload URL with ``.sig`` appended) is JSON::

    {"payloadType": "application/vnd.in-toto+json", "payload": "<base64 statement>",
     "signatures": [{"keyid": "<optional>", "sig": "<base64 signature>"}]}

Each signature is over DSSE's pre-authentication encoding, ``PAE = "DSSEv1" SP len(type) SP type SP len(body) SP
body`` (lengths in ASCII decimal; body = the decoded statement bytes), made with an ECDSA P-256 key (SHA-256, DER
signature) or an Ed25519 key. The statement names the payload's SHA-256 and, in its predicate, the appid, version
and size of the release (track and board optional). ``cryptography`` is imported only here, when a signature is
checked or made.
"""
from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import json
from dataclasses import dataclass

from .omaha import versions
from .text import clean

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:omaha-agent:release:v1"
MAX_ENVELOPE = 64 << 10
MAX_KEY_FILE = 16 << 10


class SignatureError(Exception):
    """The release's signature or statement does not hold; the message is the one-line reason."""


class TrustKeyError(Exception):
    """A trusted key file cannot be used; the message names it."""


@dataclass(frozen=True)
class Release:
    """What a verified statement says about a payload."""

    name: str
    sha256: str
    appid: str
    version: str
    size: int
    track: str | None = None
    board: str | None = None
    image: "Artifact | None" = None  # the uncompressed image the payload holds (adaptive releases)
    chunks: "Chunks | None" = None  # the chunk index and chunk data (adaptive releases)
    packages: "tuple[Artifact, ...]" = ()  # a release of several images (slot groups): every package, named


@dataclass(frozen=True)
class Artifact:
    """A file of the release named by the statement: its name relative to the payload URL (None for the image,
    which is not served as a file), SHA-256 (hex, lower case) and size."""

    name: str | None
    sha256: str
    size: int


@dataclass(frozen=True)
class Chunks:
    index: Artifact
    data: Artifact


def pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


# ---------------------------------------------------------------------------------------------- keys
def load_public_keys(patterns) -> list:
    """The public keys in the PEM files ``patterns`` (paths or globs) name. Raises ``TrustKeyError``."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    keys = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]:
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_KEY_FILE + 1)
            except OSError as exc:
                raise TrustKeyError(f"trust key {path}: cannot read: {exc.strerror or exc}") from None
            if len(data) > MAX_KEY_FILE:
                raise TrustKeyError(f"trust key {path}: larger than {MAX_KEY_FILE >> 10} KiB; not a PEM public key")
            try:
                key = load_pem_public_key(data)
            except (ValueError, TypeError) as exc:
                raise TrustKeyError(f"trust key {path}: not a PEM public key ({str(exc)[:80]}); make one with "
                                "'openssl pkey -in PRIVATE.pem -pubout'") from None
            if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
                keys.append(key)
            elif isinstance(key, ed25519.Ed25519PublicKey):
                keys.append(key)
            else:
                raise TrustKeyError(f"trust key {path}: only ECDSA P-256 and Ed25519 keys are accepted")
    return keys


def load_private_key(path: str):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        with open(path, "rb") as f:
            key = load_pem_private_key(f.read(MAX_KEY_FILE), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TrustKeyError(f"signing key {path}: not an unencrypted PEM private key ({str(exc)[:80]})") from None
    if not (isinstance(key, ed25519.Ed25519PrivateKey) or
            (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1))):
        raise TrustKeyError(f"signing key {path}: only ECDSA P-256 and Ed25519 keys are accepted")
    return key


def _verifies(key, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _sign(key, message: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    return key.sign(message)


# ---------------------------------------------------------------------------------------------- envelopes
def _b64(value, what: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"the signature envelope's {what} is not a base64 string")
    text = value.strip()
    padded = text + "=" * (-len(text) % 4)  # DSSE allows standard or URL-safe base64, padded or not
    try:
        return base64.b64decode(padded, altchars=b"-_" if ("-" in text or "_" in text) else None, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"the signature envelope's {what} is not valid base64") from None


def open_envelope(data: bytes, keys: list) -> Release:
    """The release a DSSE envelope vouches for, once one of its signatures verifies under one of ``keys``.
    Raises ``SignatureError``."""
    if len(data) > MAX_ENVELOPE:
        raise SignatureError(f"the signature file is larger than {MAX_ENVELOPE >> 10} KiB")
    try:
        env = json.loads(data)
    except (ValueError, RecursionError):
        raise SignatureError("the signature file is not a JSON DSSE envelope") from None
    if not isinstance(env, dict):
        raise SignatureError("the signature file is not a JSON DSSE envelope")
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"the envelope's payloadType is not {PAYLOAD_TYPE}")
    body = _b64(env.get("payload"), "payload")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not sigs or len(sigs) > 16:
        raise SignatureError("the envelope holds no signatures (or more than 16)")
    if not keys:
        raise SignatureError("no trusted key is installed (trust.keys)")
    message = pae(PAYLOAD_TYPE, body)
    for entry in sigs:
        if not isinstance(entry, dict):
            raise SignatureError("an envelope signature is not an object")
        signature = _b64(entry.get("sig"), "signature")
        if any(_verifies(key, signature, message) for key in keys):
            return _statement(body)
    raise SignatureError("no signature verifies under a trusted key (signed with another key, or altered)")


def _statement(body: bytes) -> Release:
    try:
        st = json.loads(body)
    except (ValueError, RecursionError):
        raise SignatureError("the signed statement is not JSON") from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise SignatureError(f"the signed statement is not an in-toto Statement ({STATEMENT_TYPE})")
    if st.get("predicateType") != PREDICATE_TYPE:
        raise SignatureError(f"the signed statement's predicateType is not {PREDICATE_TYPE}")
    subject = st.get("subject")
    if not isinstance(subject, list) or not subject or not isinstance(subject[0], dict):
        raise SignatureError("the signed statement names no subject (the payload comes first)")
    digest = subject[0].get("digest")
    sha = digest.get("sha256") if isinstance(digest, dict) else None
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
        raise SignatureError("the signed statement has no sha256 digest for its subject")
    pred = st.get("predicate")
    if not isinstance(pred, dict):
        raise SignatureError("the signed statement has no predicate")
    fields = {k: pred.get(k) for k in ("appid", "version", "track", "board")}
    if not isinstance(fields["appid"], str) or not isinstance(fields["version"], str):
        raise SignatureError("the signed statement's predicate lacks appid or version")
    if why := versions.problem(fields["version"]):
        raise SignatureError(f"the signed statement's version {why}")
    size = pred.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SignatureError("the signed statement's predicate lacks a size")
    for k in ("track", "board"):
        if fields[k] is not None and not isinstance(fields[k], str):
            raise SignatureError(f"the signed statement's {k} is not a string")
    name = subject[0].get("name")
    if "packages" in pred:
        packages, image, chunks = _packages(pred, subject, name, sha.lower(), size), None, None
    else:
        packages, (image, chunks) = (), _adaptive(pred, subject)
    return Release(clean(name, 255) if isinstance(name, str) else "", sha.lower(), fields["appid"], fields["version"], size,
                   fields["track"], fields["board"], image, chunks, packages)


MAX_PACKAGES = 8


def _packages(pred: dict, subject: list, name, sha: str, size: int) -> "tuple[Artifact, ...]":
    """``predicate.packages``: every image of a release of several, each also a subject (by name and digest); the
    first is the payload ``subject[0]`` and ``predicate.size`` name. Not with an adaptive release's chunks."""
    if "image" in pred or "chunks" in pred:
        raise SignatureError("the signed statement names several packages and chunks: adaptive releases are of "
                             "one package")
    items = pred.get("packages")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_PACKAGES:
        raise SignatureError(f"the signed statement's packages is not a list of 1 to {MAX_PACKAGES} packages")
    packages = tuple(_artifact(item, f"package {i + 1}", named=True) for i, item in enumerate(items))
    if len({p.name for p in packages}) != len(packages):
        raise SignatureError("the signed statement lists a package twice")
    if (packages[0].name, packages[0].sha256, packages[0].size) != (name, sha, size):
        raise SignatureError("the signed statement's first package is not its first subject (name, digest, size)")
    if len(subject) != len(packages) or not all(isinstance(s, dict) for s in subject):
        raise SignatureError("the signed statement must name every package, and only them, as subjects")
    listed = {(s.get("name"), (s.get("digest") or {}).get("sha256", "").lower() if isinstance(s.get("digest"), dict)
               else None) for s in subject}
    for p in packages:
        if (p.name, p.sha256) not in listed:
            raise SignatureError(f"the signed statement's package {p.name!r} is not among its subjects (name and "
                                 "digest)")
    return packages


def _artifact(value, what: str, named: bool) -> Artifact:
    if not isinstance(value, dict):
        raise SignatureError(f"the signed statement's {what} is not an object")
    sha, size, name = value.get("sha256"), value.get("size"), value.get("name")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
        raise SignatureError(f"the signed statement's {what} has no sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SignatureError(f"the signed statement's {what} has no size")
    if named and (not isinstance(name, str) or not relative_name(name)):
        raise SignatureError(f"the signed statement's {what} needs a plain file name beside the payload "
                             "(letters, digits, '.', '_', '-', '+'; no '/', at most 255)")
    return Artifact(name if named else None, sha.lower(), size)


def relative_name(name: str) -> bool:
    """A file name the agent resolves against the payload URL's directory: one path segment, nothing to decode."""
    return (0 < len(name) <= 255 and name not in (".", "..")
            and all(c.isascii() and (c.isalnum() or c in "._-+") for c in name))


def _adaptive(pred: dict, subject: list) -> "tuple[Artifact | None, Chunks | None]":
    """``predicate.image`` and ``predicate.chunks`` (both or neither); every chunk file is also a subject."""
    if "image" not in pred and "chunks" not in pred:
        if len(subject) != 1:
            raise SignatureError("the signed statement must name exactly one subject")
        return None, None
    image = _artifact(pred.get("image"), "image", named=False)
    chunks = pred.get("chunks")
    if not isinstance(chunks, dict):
        raise SignatureError("the signed statement names an image but no chunks (predicate.chunks)")
    refs = Chunks(_artifact(chunks.get("index"), "chunk index", named=True),
                  _artifact(chunks.get("data"), "chunk data", named=True))
    if not 1 <= len(subject) <= 3 or not all(isinstance(s, dict) for s in subject):
        raise SignatureError("the signed statement must name the payload, then its chunk files, as subjects")
    listed = {(s.get("name"), (s.get("digest") or {}).get("sha256", "").lower() if isinstance(s.get("digest"), dict)
               else None) for s in subject}
    for ref in (refs.index, refs.data):
        if (ref.name, ref.sha256) not in listed:
            raise SignatureError(f"the signed statement's chunk file {ref.name!r} is not among its subjects")
    return image, refs


def check_release(release: Release, *, appid: str, version: str, sha256_hex: str, size: int, track: str,
                  board: str, packages=None) -> None:
    """The signed statement must describe exactly the offer the device is about to install; ``packages`` (the
    offer's, when there are several) each by name, digest and size, and no other."""
    from .omaha import versions
    if packages is not None and (release.packages or len(packages) > 1):
        _check_packages(release, packages)
    if release.sha256 != sha256_hex.lower():
        raise SignatureError(f"the signed digest {release.sha256[:16]}… is not the offered payload's "
                             f"{sha256_hex.lower()[:16]}…")
    if release.size != size:
        raise SignatureError(f"the signed size {release.size} is not the offered {size}")
    if release.appid.lower() != appid.lower():
        raise SignatureError(f"the release is signed for app {release.appid[:60]!r}, not this device's")
    if not versions.same(release.version, version):
        raise SignatureError(f"the release is signed as version {release.version[:40]!r}, offered as {version[:40]!r}")
    if release.track is not None and release.track != track:
        raise SignatureError(f"the release is signed for track {release.track[:40]!r}, this device follows {track!r}")
    if release.board is not None and release.board != board:
        raise SignatureError(f"the release is signed for board {release.board[:40]!r}, this device is {board!r}")


def _check_packages(release: Release, offered) -> None:
    signed = {p.name: p for p in release.packages}
    if not signed:
        raise SignatureError(f"the signed statement lists one payload, the offer has {len(offered)} packages")
    for pkg in offered:
        mine = signed.get(pkg.name)
        if mine is None:
            raise SignatureError(f"the offered package {clean(pkg.name, 80)!r} is not in the signed release")
        if mine.sha256 != pkg.sha256_hex.lower():
            raise SignatureError(f"the signed digest of {mine.name} {mine.sha256[:16]}… is not the offered "
                                 f"{pkg.sha256_hex.lower()[:16]}…")
        if mine.size != pkg.size:
            raise SignatureError(f"the signed size of {mine.name} {mine.size} is not the offered {pkg.size}")
    if len(offered) != len(signed):
        missing = sorted(set(signed) - {p.name for p in offered})
        raise SignatureError(f"the signed release has {len(signed)} packages, the offer {len(offered)}"
                             + (f" (not offered: {', '.join(missing[:3])})" if missing else ""))


# ---------------------------------------------------------------------------------------------- making them
def statement(name: str, sha256_hex: str, appid: str, version: str, size: int, track: str | None = None,
              board: str | None = None, image: Artifact | None = None, chunks: Chunks | None = None,
              more: "tuple[Artifact, ...]" = ()) -> bytes:
    """The statement for a payload; an adaptive release also names its image and chunk files (``image`` and
    ``chunks`` together), each chunk file also a subject (the data file is listed once when it is the payload).
    ``more``: the other packages of a release of several images; then ``predicate.packages`` lists them all
    (the payload first) and each is a subject."""
    predicate = {"appid": appid, "version": version, "size": size}
    subjects = [{"name": name, "digest": {"sha256": sha256_hex}}]
    if more:
        predicate["packages"] = [{"name": a.name, "sha256": a.sha256, "size": a.size}
                                 for a in (Artifact(name, sha256_hex, size), *more)]
        subjects += [{"name": a.name, "digest": {"sha256": a.sha256}} for a in more]
    if track:
        predicate["track"] = track
    if board:
        predicate["board"] = board
    if image is not None and chunks is not None:
        predicate["image"] = {"sha256": image.sha256, "size": image.size}
        predicate["chunks"] = {k: {"name": a.name, "sha256": a.sha256, "size": a.size}
                               for k, a in (("index", chunks.index), ("data", chunks.data))}
        for a in (chunks.index, chunks.data):
            if (a.name, a.sha256) != (name, sha256_hex):
                subjects.append({"name": a.name, "digest": {"sha256": a.sha256}})
    return json.dumps({"_type": STATEMENT_TYPE, "subject": subjects,
                       "predicateType": PREDICATE_TYPE, "predicate": predicate}, sort_keys=True).encode()


def sign_statement(body: bytes, key, keyid: str = "") -> bytes:
    sig = _sign(key, pae(PAYLOAD_TYPE, body))
    entry = {"sig": base64.b64encode(sig).decode()}
    if keyid:
        entry["keyid"] = keyid
    return json.dumps({"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(body).decode(),
                       "signatures": [entry]}, indent=1).encode() + b"\n"


def file_artifact(path: str, name: str | None = None) -> Artifact:
    """The file at ``path`` as a named artifact (hashed in 1 MiB reads)."""
    import os
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return Artifact(name or os.path.basename(path), h.hexdigest(), size)


def sign_file(path: str, key, appid: str, version: str, track: str | None = None, board: str | None = None,
              name: str | None = None, more: "tuple[Artifact, ...]" = ()) -> bytes:
    """The envelope for the payload at ``path``; with ``more`` (the release's other packages, e.g. from
    ``file_artifact``), for the release of all of them."""
    first = file_artifact(path, name)
    if more and len({first.name, *(a.name for a in more)}) != 1 + len(more):
        raise SignatureError("two packages of the release have the same name; each needs its own")
    body = statement(first.name, first.sha256, appid, version, first.size, track, board, more=tuple(more))
    return sign_statement(body, key)
