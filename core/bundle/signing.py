"""Ed25519 signatures over the manifest bytes.

The signature file is a small JSON document naming the key it was made with, so an
agent can trust several keys at once (key rotation) and say which one signed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgefleet.core.errors import SignatureError

ALGORITHM = "ed25519"
SIGNATURE_BYTES = 64  # an Ed25519 signature


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path, name: str = "signing") -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, mode 0600) and ``NAME.pub`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: a chmod afterwards leaves a window.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(data: bytes | str) -> Ed25519PublicKey:
    if isinstance(data, str):
        data = data.encode()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    doc = {
        "alg": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class TrustStore:
    """The public keys an agent accepts bundles from."""

    keys: dict[str, Ed25519PublicKey]
    allow_unsigned: bool = False

    @classmethod
    def from_pem(cls, pems: list[bytes | str], allow_unsigned: bool = False) -> TrustStore:
        keys = [load_public_key(p) for p in pems]
        return cls({key_id(k): k for k in keys}, allow_unsigned)

    @classmethod
    def from_files(cls, paths: list[Path], allow_unsigned: bool = False) -> TrustStore:
        return cls.from_pem([p.read_bytes() for p in paths], allow_unsigned)

    def verify(self, manifest_bytes: bytes, signature: bytes | None) -> str | None:
        """Return the id of the key that signed, or None for an allowed unsigned bundle.

        Raises ``SignatureError`` (a 400) for anything else, whatever ``signature``
        holds: a missing, malformed, untrusted or wrong signature.
        """
        if signature is None:
            if self.allow_unsigned:
                return None
            raise SignatureError("bundle is not signed (manifest.sig missing)")
        alg, kid, sig = parse_signature(signature)
        if alg != ALGORITHM:
            raise SignatureError(f"manifest.sig: unsupported signature algorithm {alg[:40]!r}")
        key = self.keys.get(kid)
        if key is None:
            raise SignatureError(f"manifest.sig: bundle signed by untrusted key {kid[:40]!r}")
        try:
            key.verify(sig, manifest_bytes)
        except InvalidSignature as exc:
            raise SignatureError(f"bad signature from key {kid}: manifest was altered") from exc
        return kid


def parse_signature(signature: bytes) -> tuple[str, str, bytes]:
    """``(alg, key_id, raw signature)`` of a manifest.sig document, checked for form.

    The document is untrusted input: it must be a JSON object whose ``alg``, ``key_id``
    and ``signature`` are strings, the last one standard base64 of 64 bytes. Anything
    else (a list, a number, JSON nested past the parser's depth, bad UTF-8) is a
    ``SignatureError``.
    """

    def malformed(why: str) -> SignatureError:
        return SignatureError(f"manifest.sig is malformed: {why}")

    try:
        doc = json.loads(signature)
    except RecursionError:
        raise malformed("nested too deeply") from None
    except ValueError as exc:  # not JSON, not UTF-8, an integer of 5,000 digits...
        raise malformed(str(exc)[:200]) from None
    if not isinstance(doc, dict):
        raise malformed(f"a JSON object is expected, not {type(doc).__name__}")
    fields = []
    for name in ("alg", "key_id", "signature"):
        value = doc.get(name)
        if not isinstance(value, str):
            what = "missing" if value is None else f"a {type(value).__name__}, not a string"
            raise malformed(f"{name} is {what}")
        fields.append(value)
    alg, kid, encoded = fields
    try:
        sig = base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error
        raise malformed("signature is not base64") from None
    if len(sig) != SIGNATURE_BYTES:
        raise malformed(f"signature is {len(sig)} bytes, not {SIGNATURE_BYTES}")
    return alg, kid, sig
