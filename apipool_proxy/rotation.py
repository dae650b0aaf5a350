"""Rotating the master key: every stored upstream key re-encrypted under a new one.

``apipool rotate-master-key`` runs with the server stopped. The steps are ordered so that
a crash at any point loses nothing:

1. the new key is written next to the old one (``<key file>.new``, mode 0600, synced);
2. the database is rewritten in one transaction: each upstream key decrypted with the old
   key and encrypted, and fingerprinted, with the new one;
3. the new key file replaces the old one.

A rotation cut short between steps 2 and 3 leaves a database the old key cannot open; the
server then refuses to start and says so, and running the command again finishes it. When
the master key comes from ``APIPOOL_MASTER_KEY`` the new key is written to a file the
operator names, to be put in the secret store in place of the old one.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from .config import Settings
from .crypto import (
    KeyCipher,
    MasterKeyError,
    key_fingerprint,
    load_master_key,
    new_master_key,
    sync_directory,
    write_master_key_file,
)


class RotationError(RuntimeError):
    """The rotation cannot go ahead; nothing was changed (or it is safe to run again)."""


def pending_key_path(key_file: str) -> Path:
    """Where a rotation keeps the new master key until the database uses it."""
    return Path(key_file + ".new")


def rotate_master_key(
    settings: Settings, environ: Mapping[str, str], new_key_file: str | None = None
) -> str:
    """Re-encrypt every stored upstream key under a new master key; return what was done."""
    _refuse_if_serving(settings)
    database = Path(settings.database.path)
    if not database.exists():
        raise RotationError(f"no database at {database}")
    from_environment = bool(environ.get("APIPOOL_MASTER_KEY"))
    if from_environment and not new_key_file:
        raise RotationError(
            "the master key comes from APIPOOL_MASTER_KEY: name a file for the new one with"
            " --new-key-file"
        )
    if new_key_file and not from_environment:
        raise RotationError(
            "--new-key-file is for a master key given in APIPOOL_MASTER_KEY; the key file"
            " is rotated in place"
        )
    key_file = settings.security.master_key_file
    if not from_environment and not Path(key_file).exists():
        raise RotationError(f"no master key file at {key_file}")
    old_key = load_master_key(key_file, environ)

    pending = Path(new_key_file) if new_key_file else pending_key_path(key_file)
    if pending.exists():
        finished = _resume(database, old_key, pending, key_file, from_environment)
        if finished is not None:
            return finished

    new_key = new_master_key()
    write_master_key_file(pending, new_key)
    count = _reencrypt(database, old_key, new_key)
    if from_environment:
        return (
            f"Re-encrypted {count} upstream key(s). Set APIPOOL_MASTER_KEY to the contents of"
            f" {pending} before starting the server; the old key no longer opens them."
        )
    _replace(pending, Path(key_file))
    return f"Re-encrypted {count} upstream key(s) under a new master key in {key_file}."


_EVERY_INTERFACE = frozenset(("", "0.0.0.0", "::"))  # noqa: S104 (read, not bound)


def _refuse_if_serving(settings: Settings) -> None:
    # A running server keeps the old key in memory and would store new keys under it.
    for name, host, port in (
        ("admin", settings.admin.host, settings.admin.port),
        ("proxy", settings.proxy.host, settings.proxy.port),
    ):
        # A server listening on every interface answers on loopback too.
        address = "127.0.0.1" if host in _EVERY_INTERFACE else host
        try:
            with socket.create_connection((address, port), timeout=1):
                pass
        except OSError:
            continue
        raise RotationError(
            f"something listens on the {name} port ({address}:{port}): stop the server first"
        )


def _resume(
    database: Path, old_key: bytes, pending: Path, key_file: str, from_environment: bool
) -> str | None:
    """A new key left by an earlier rotation: finish that rotation if the database already
    uses it; drop it if the database still uses the old key (return None to go on)."""
    try:
        new_key = _read_key_file(pending)
    except MasterKeyError as exc:
        raise RotationError(str(exc)) from None
    if _opens(database, new_key):
        if from_environment:
            return (
                f"The database already uses the key in {pending}: set APIPOOL_MASTER_KEY to"
                " its contents."
            )
        _replace(pending, Path(key_file))
        return f"Finished an interrupted rotation: {key_file} now holds the new master key."
    if not _opens(database, old_key):
        raise RotationError("neither the current nor the pending master key opens the database")
    if from_environment:
        raise RotationError(f"{pending} already exists; name a new file for the new key")
    pending.unlink()  # written before a rotation that never reached the database
    return None


def _reencrypt(database: Path, old_key: bytes, new_key: bytes) -> int:
    old, new = KeyCipher(old_key), KeyCipher(new_key)
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        # FULL: the transaction is on disk before the new key file replaces the old one.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute("SELECT id, user_id, base_url, secret FROM upstream_keys").fetchall()
        try:
            for key_id, owner_id, base_url, blob in rows:
                secret = old.decrypt(blob, owner_id)
                conn.execute(
                    "UPDATE upstream_keys SET secret = ?, fingerprint = ? WHERE id = ?",
                    (
                        new.encrypt(secret, owner_id),
                        key_fingerprint(new_key, base_url + "\n" + secret),
                        key_id,
                    ),
                )
        except MasterKeyError as exc:
            conn.execute("ROLLBACK")
            raise RotationError(str(exc)) from None
        conn.execute("COMMIT")
        return len(rows)
    finally:
        conn.close()


def _opens(database: Path, key: bytes) -> bool:
    """True when ``key`` decrypts the stored upstream keys (or there are none)."""
    cipher = KeyCipher(key)
    conn = sqlite3.connect(database)
    try:
        row = conn.execute("SELECT user_id, secret FROM upstream_keys LIMIT 1").fetchone()
    finally:
        conn.close()
    if row is None:
        return True
    try:
        cipher.decrypt(row[1], row[0])
    except MasterKeyError:
        return False
    return True


def _read_key_file(path: Path) -> bytes:
    return load_master_key(str(path), {})


def _replace(pending: Path, key_file: Path) -> None:
    os.replace(pending, key_file)  # atomic: the old key or the new one, never neither
    sync_directory(key_file.parent)
