"""CUP-ECDSA (Omaha's Client Update Protocol v2): a fresh nonce on every request, and a response trusted only
with the server's ECDSA P-256 proof over (request hash, response hash, key version and nonce).

Request: ``cup2key=<key version>:<nonce>`` and ``cup2hreq=<hex SHA-256 of the body>`` appended to the URL.
Response: ``X-Cup-Server-Proof: <DER signature hex>:<request hash hex>`` (older servers: the same in ``ETag``,
maybe quoted, maybe ``W/``). The signature is ECDSA-with-SHA-256 over
``m = SHA-256(SHA-256(request) || SHA-256(response) || cup2key value)``. ``cryptography`` is imported only here.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import quote


class CupError(Exception):
    """A response that CUP does not vouch for; the message is the one-line reason."""


@dataclass(frozen=True)
class Challenge:
    """What one request carries: the ``cup2key`` value and the request body's hash."""

    cup2key: str
    request_hash: str

    def url(self, url: str) -> str:
        """``url`` with ``cup2key`` and ``cup2hreq`` appended after any query it already has."""
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}cup2key={quote(self.cup2key, safe=':')}&cup2hreq={self.request_hash}"


def challenge(key_version: int, body: bytes, nonce: str | None = None) -> Challenge:
    """A fresh challenge for a request with ``body`` (256 random bits of nonce unless given)."""
    return Challenge(f"{key_version}:{nonce or secrets.token_hex(32)}", hashlib.sha256(body).hexdigest())


def message(request_hash: str, response: bytes, cup2key: str) -> bytes:
    return hashlib.sha256(bytes.fromhex(request_hash) + hashlib.sha256(response).digest() + cup2key.encode()).digest()


def proof_from(headers) -> str | None:
    """The proof of a response: ``X-Cup-Server-Proof``, else an ``ETag`` in the same form."""
    value = headers.get("X-Cup-Server-Proof")
    if value is None:
        value = headers.get("ETag")
        if value is None:
            return None
        value = value.strip()
        if value.startswith("W/"):
            value = value[2:]
        value = value.strip('"')
    return value.strip()


def load_key(path: str):
    """The server's P-256 public key from a PEM (or DER) file. Raises ``CupError``."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key
    try:
        with open(path, "rb") as f:
            data = f.read(16 << 10)
        key = load_pem_public_key(data) if b"-----BEGIN" in data else load_der_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        raise CupError(f"CUP key {path}: not a public key ({str(exc)[:80]})") from None
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise CupError(f"CUP key {path}: CUP-ECDSA needs an ECDSA P-256 key")
    return key


def verify(key, ch: Challenge, response: bytes, proof: str | None) -> None:
    """Raises ``CupError`` unless ``proof`` is the server's signature for this request and this response."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    if not proof:
        raise CupError("the response carries no CUP proof (X-Cup-Server-Proof)")
    sig_hex, sep, req_hash = proof.rpartition(":")
    if not sep or not sig_hex:
        raise CupError("the response's CUP proof is malformed")
    if req_hash.lower() != ch.request_hash:
        raise CupError("the response's CUP proof is for another request")
    try:
        signature = bytes.fromhex(sig_hex)
        key.verify(signature, message(ch.request_hash, response, ch.cup2key), ec.ECDSA(hashes.SHA256()))
    except ValueError:
        raise CupError("the response's CUP proof is malformed") from None
    except InvalidSignature:
        raise CupError("the response's CUP proof does not verify (altered, replayed, or another key)") from None


def sign(private_key, ch: Challenge, response: bytes) -> str:
    """The proof a server sends (the development server uses it)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    sig = private_key.sign(message(ch.request_hash, response, ch.cup2key), ec.ECDSA(hashes.SHA256()))
    return f"{sig.hex()}:{ch.request_hash}"
