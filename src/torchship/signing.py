"""Signed bundles: an Ed25519 signature (the ``cryptography`` library) over the exact bytes of ``manifest.json``,
which holds the sha256 of every file, so one signature covers the whole bundle.

    torchship bundle keygen --out release          # release (private, mode 0600) and release.pub
    torchship bundle sign BUNDLE --key release     # BUNDLE/signature.json
    torchship bundle verify BUNDLE --key release.pub
    torchship serve BUNDLE --verify-key release.pub

Nothing here knows what a bundle is: ``torchship.bundle`` reads the manifest, asks this module about its bytes.
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import msgspec

from .errors import BundleError, UsageError

SIGNATURE = "signature.json"


class Signature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    algorithm: str  # "ed25519"
    key: str  # the signing key's id: sha256 of its raw public bytes, first 16 hex digits
    manifest_sha256: str
    signature: str  # base64


def _crypto():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return serialization, ed25519


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(out: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: ``out`` (private, PEM, mode 0600) and ``out.pub`` (public, PEM)."""
    serialization, ed25519 = _crypto()
    out = Path(out)
    pub = out.with_name(out.name + ".pub")
    if out.exists() or pub.exists():
        raise UsageError(f"{out} or {pub} exists; refusing to overwrite a key: choose another --out")
    key = ed25519.Ed25519PrivateKey.generate()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return out, pub


def _load_key(path: Path, private: bool):
    serialization, ed25519 = _crypto()
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as exc:
        kind = "private" if private else "public"
        raise UsageError(f"{path} is not a readable {kind} key in PEM ({str(exc).splitlines()[0][:120]}); make a pair "
                         "with `torchship bundle keygen --out NAME`") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise UsageError(f"{path} is not an Ed25519 key; make one with `torchship bundle keygen --out NAME`")
    return key


def sign(manifest: Path, private_key: Path) -> Signature:
    """Sign the manifest file as it is on disk; writes ``signature.json`` beside it (atomically). ``bundle.sign``
    verifies the bundle first."""
    manifest = Path(manifest)
    bundle_dir = manifest.parent
    key = _load_key(private_key, private=True)
    raw = manifest.read_bytes()
    sig = Signature("ed25519", key_id(key.public_key()), hashlib.sha256(raw).hexdigest(),
                    base64.b64encode(key.sign(raw)).decode())
    tmp = bundle_dir / f".{SIGNATURE}.tmp"
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(sig), indent=2))
    tmp.replace(bundle_dir / SIGNATURE)
    return sig


def check(bundle_dir: Path, raw_manifest: bytes, public_key: Path) -> str:
    """The signer's key id when ``signature.json`` is a valid signature of ``raw_manifest`` by ``public_key``."""
    from cryptography.exceptions import InvalidSignature
    key = _load_key(public_key, private=False)
    path = Path(bundle_dir) / SIGNATURE
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not signed (no {SIGNATURE}); sign it with `torchship bundle sign` "
                          "or serve it without --verify-key")
    try:
        sig = msgspec.json.decode(path.read_bytes(), type=Signature)
        signature = base64.b64decode(sig.signature, validate=True)
    except (msgspec.DecodeError, ValueError) as exc:
        raise BundleError(f"{path} is not a torchship signature ({exc})") from None
    if sig.algorithm != "ed25519":
        raise BundleError(f"{path}: signature algorithm {sig.algorithm!r}; torchship signs with ed25519")
    if sig.key != key_id(key):
        raise BundleError(f"{bundle_dir} was signed by key {sig.key}, not by {public_key} (key {key_id(key)}): refusing it")
    try:
        key.verify(signature, raw_manifest)
    except InvalidSignature:
        raise BundleError(f"{bundle_dir}: the signature does not match manifest.json (changed since it was signed): "
                          "refusing it") from None
    return sig.key
