"""Secrets at rest and in transit: the master key, upstream key encryption, pool tokens
and password hashes.

- Upstream keys are encrypted with AES-256-GCM under the master key; the key id is bound
  in as associated data so a ciphertext cannot be moved to another row.
- Pool tokens are 256-bit random values; only their SHA-256 is stored or kept in memory.
- Passwords are hashed with bcrypt in a worker thread, so hashing never stalls the loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import bcrypt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TOKEN_PREFIX = "ap-"  # noqa: S105 - a public prefix, not a secret
_NONCE_BYTES = 12
_CIPHER_VERSION = b"\x01"


class MasterKeyError(RuntimeError):
    """The master key is missing, malformed, or cannot decrypt the stored keys."""


def load_master_key(key_file: str, environ: Mapping[str, str]) -> bytes:
    """Return the 32-byte master key from ``APIPOOL_MASTER_KEY`` or the key file.

    The file is created (mode 0600) with a fresh random key on first start.
    """
    configured = environ.get("APIPOOL_MASTER_KEY")
    if configured:
        return _decode_master_key(configured, "APIPOOL_MASTER_KEY")
    path = Path(key_file)
    if path.exists():
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise MasterKeyError(f"cannot read master key file {path}: {exc}") from None
        return _decode_master_key(text.strip(), f"master key file {path}")
    return _create_master_key_file(path)


def _decode_master_key(text: str, source: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        key = b""
    if len(key) != 32:
        raise MasterKeyError(
            f"{source} must be 32 random bytes in URL-safe base64"
            " (make one with: python -c 'import os,base64;"
            "print(base64.urlsafe_b64encode(os.urandom(32)).decode())')"
        )
    return key


def _create_master_key_file(path: Path) -> bytes:
    key = new_master_key()
    write_master_key_file(path, key)
    return key


def new_master_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def write_master_key_file(path: Path, key: bytes) -> None:
    """Write ``key`` to a new file, mode 0600, synced to disk with its directory entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never overwrite a key file that appeared meanwhile; 0600 from the start.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(base64.urlsafe_b64encode(key).decode("ascii") + "\n")
        out.flush()
        os.fsync(out.fileno())
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make a file's creation or renaming in ``directory`` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyCipher:
    """Encrypts and decrypts upstream keys with the master key."""

    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(master_key)

    def encrypt(self, plaintext: str, owner_id: int) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), self._aad(owner_id))
        return _CIPHER_VERSION + nonce + sealed

    def decrypt(self, blob: bytes, owner_id: int) -> str:
        if blob[:1] != _CIPHER_VERSION:
            raise MasterKeyError("stored key has an unknown format")
        nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, sealed, self._aad(owner_id)).decode()
        except InvalidTag:
            raise MasterKeyError(
                "the master key cannot decrypt the stored upstream keys; start with the"
                " master key this database was created with"
            ) from None

    @staticmethod
    def _aad(owner_id: int) -> bytes:
        return b"apipool-upstream-key:" + str(owner_id).encode()


def key_fingerprint(master_key: bytes, plaintext: str) -> bytes:
    """A keyed hash of an upstream key, to spot duplicates without storing the key."""
    return hmac.new(master_key, plaintext.encode(), hashlib.sha256).digest()


def mask_key(plaintext: str) -> str:
    """First 5 and last 4 characters, so owners can tell their keys apart."""
    if len(plaintext) <= 12:
        return plaintext[:2] + "..." if len(plaintext) > 4 else "..."
    return f"{plaintext[:5]}...{plaintext[-4:]}"


def new_token() -> str:
    """A fresh opaque pool token: 256 bits of randomness behind a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


# bcrypt cost 12 takes ~0.25 s; done in a thread, it costs a login latency, not the loop.
DEFAULT_BCRYPT_ROUNDS = 12


# A real hash of a random password, checked when the user does not exist, so unknown
# users and wrong passwords take the same time.
@functools.cache
def _decoy_hash(rounds: int) -> bytes:
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds))


async def hash_password(password: str, rounds: int = DEFAULT_BCRYPT_ROUNDS) -> str:
    hashed = await asyncio.to_thread(bcrypt.hashpw, password.encode(), bcrypt.gensalt(rounds))
    return hashed.decode("ascii")


async def check_password(
    password: str, hashed: str | None, rounds: int = DEFAULT_BCRYPT_ROUNDS
) -> bool:
    """Compare in a thread; with ``hashed=None`` burn the same time and return False."""
    raw = password.encode("utf-8", "surrogatepass")
    if len(raw) > 72:
        # Such a password could never have been registered; spend the time all the same.
        raw, hashed = raw[:72], None
    target = hashed.encode("ascii") if hashed else await asyncio.to_thread(_decoy_hash, rounds)
    matched = await asyncio.to_thread(bcrypt.checkpw, raw, target)
    return matched and hashed is not None
