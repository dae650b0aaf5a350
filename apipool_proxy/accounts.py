"""Accounts and pool tokens, served from memory.

The database is the record; this module keeps every live token (by SHA-256) and every
user in memory so that authenticating a proxied request costs one dict lookup, and a
logout, a revoked API token or a disabled user takes effect on the very next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from . import crypto
from .config import AuthSettings
from .errors import ApiError
from .log import admin_log
from .storage import Database, UsernameTaken

USERNAME_RE = re.compile(r"[A-Za-z0-9._-]{3,64}")
MIN_PASSWORD_BYTES = 8
MAX_PASSWORD_BYTES = 72  # bcrypt ignores everything past 72 bytes; refuse rather than truncate
LIMIT_NAMES = ("rpm", "tpm", "daily_tokens", "max_concurrent")


@dataclass(slots=True, eq=False)
class User:
    id: int
    username: str
    is_admin: bool
    disabled: bool
    created_at: float
    limits: dict[str, int | None] = field(default_factory=dict)  # per-user overrides


@dataclass(slots=True, eq=False)
class Token:
    id: int
    user_id: int
    kind: str  # "session" (from login) or "api" (named, long-lived)
    name: str | None
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    token_hash: bytes


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling: the user and the token they presented."""

    user: User
    token: Token


# Subjects (accounts, addresses) a throttle remembers at most: attempts that never reach
# a password check (answered 503 when the checks are busy) must not grow it without end.
MAX_THROTTLE_SUBJECTS = 100_000


class AttemptThrottle:
    """Counts attempts per subject (an account, a client address) in a sliding window:
    failed logins, and sign-ups."""

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, subjects: list[str], now: float) -> int | None:
        waits = []
        for subject in subjects:
            times = self._trim(subject, now)
            if times is not None and len(times) >= self.max_failures:
                waits.append(times[0] + self.window - now)
        return max(1, int(max(waits)) + 1) if waits else None

    def fail(self, subjects: list[str], now: float) -> None:
        for subject in subjects:
            times = self._failures.get(subject)
            if times is None:
                if len(self._failures) >= MAX_THROTTLE_SUBJECTS:
                    self._make_room(now)
                times = self._failures[subject] = deque()
            times.append(now)

    def _make_room(self, now: float) -> None:
        """Forget subjects whose failures are all outside the window; if that is not enough
        for a tenth of the room, the subjects seen first."""
        cutoff = now - self.window
        for subject in [s for s, times in self._failures.items() if times[-1] <= cutoff]:
            del self._failures[subject]
        excess = len(self._failures) - MAX_THROTTLE_SUBJECTS * 9 // 10
        for subject in list(itertools.islice(self._failures, max(0, excess))):
            del self._failures[subject]

    def __len__(self) -> int:
        return len(self._failures)

    def clear(self, subject: str) -> None:
        self._failures.pop(subject, None)

    def forgive(self, subject: str, when: float) -> None:
        """Take back one failure counted at ``when`` (an attempt that turned out right)."""
        times = self._failures.get(subject)
        if times is not None and when in times:
            times.remove(when)

    def _trim(self, subject: str, now: float) -> deque[float] | None:
        times = self._failures.get(subject)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[subject]
            return None
        return times


# Password hashes computed at once. bcrypt is meant to be slow (a quarter second at cost
# 12) and releases the GIL, so a flood of registrations or logins would otherwise take
# every core from the proxy; one at a time leaves the others to serving requests.
PASSWORD_WORKERS = 1
# Password checks allowed to wait for a worker; beyond that the answer is 503 at once.
PASSWORD_QUEUE = 64
# Live login sessions per user: a login beyond them signs out the oldest.
MAX_SESSIONS = 20
# Named API tokens per user.
MAX_API_TOKENS = 100
# The longest lifetime an API token may be given (one without is valid until revoked).
MAX_TOKEN_DAYS = 3650


def _refuse_if_throttled(
    throttle: AttemptThrottle, subjects: list[str], now: float, message: str, code: str
) -> None:
    wait = throttle.retry_after(subjects, now)
    if wait is not None:
        raise ApiError(
            429,
            f"{message}; try again in {wait} s.",
            code=code,
            headers={"Retry-After": str(wait)},
        )


class Accounts:
    def __init__(self, db: Database, settings: AuthSettings) -> None:
        self.db = db
        self.settings = settings
        self.users: dict[int, User] = {}
        self._tokens: dict[bytes, Token] = {}
        self._touched: dict[int, float] = {}
        self.throttle = AttemptThrottle(settings.login_max_failures, settings.login_window_seconds)
        self.registrations = AttemptThrottle(
            settings.registrations_per_address, settings.login_window_seconds
        )
        self._password_workers = asyncio.Semaphore(PASSWORD_WORKERS)
        self._password_waiting = 0

    async def load(self) -> None:
        """Read users and live tokens into memory, and apply ``auth.admins``."""
        now = time.time()
        admins = {name.lower() for name in self.settings.admins}
        for row in await self.db.all_users():
            user = _user_from_row(row)
            if user.username.lower() in admins and not user.is_admin:
                await self.update_user(user, is_admin=True)
            self.users[user.id] = user
        for row in await self.db.live_tokens(now):
            self._tokens[row["token_hash"]] = Token(
                id=row["id"],
                user_id=row["user_id"],
                kind=row["kind"],
                name=row["name"],
                created_at=row["created_at"],
                expires_at=row["expires_at"],
                last_used_at=row["last_used_at"],
                token_hash=row["token_hash"],
            )
        await crypto.check_password("warm-up-the-decoy-hash", None, self.settings.bcrypt_rounds)

    # -- authentication (hot path: memory only) ------------------------------------------

    def authenticate(self, bearer: str | None) -> Principal | None:
        if not bearer or len(bearer) > 512:
            return None
        token = self._tokens.get(crypto.hash_token(bearer))
        if token is None:
            return None
        now = time.time()
        if token.expires_at is not None and now >= token.expires_at:
            self._tokens.pop(token.token_hash, None)
            return None
        user = self.users.get(token.user_id)
        if user is None or user.disabled:
            return None
        self._touched[token.id] = now
        return Principal(user, token)

    def take_touched(self) -> list[tuple[float, int]]:
        """Token last-use times gathered since the previous call, for a batched write."""
        touched, self._touched = self._touched, {}
        return [(when, token_id) for token_id, when in touched.items()]

    # -- registration and sessions ---------------------------------------------------------

    async def register(self, username: Any, password: Any, client: str | None = None) -> User:
        """Create an account; ``client``, the caller's address, when a member signs up (not
        when an admin creates the account), counts against auth.registrations_per_address."""
        username = validate_username(username)
        validate_password(password)
        if client is not None:
            self._count_registration("addr:" + client)
        async with self._password_work():
            hashed = await crypto.hash_password(password, self.settings.bcrypt_rounds)
        is_admin = username.lower() in {n.lower() for n in self.settings.admins}
        now = time.time()
        try:
            user_id = await self.db.create_user(username, hashed, is_admin, now)
        except UsernameTaken:
            raise ApiError(
                409, "That username is already taken.", param="username", code="username_taken"
            ) from None
        user = User(user_id, username, is_admin, False, now)
        self.users[user_id] = user
        admin_log.info("registered user %d (%s)", user_id, username)
        return user

    async def login(self, username: Any, password: Any, client: str) -> tuple[str, Token]:
        if not isinstance(username, str) or not isinstance(password, str):
            raise ApiError(
                400, "Both 'username' and 'password' must be strings.", code="invalid_type"
            )
        subjects = ["user:" + username.lower(), "addr:" + client]
        now = time.time()
        _refuse_if_throttled(
            self.throttle, subjects, now, "Too many failed logins", "too_many_logins"
        )
        # Count the attempt as failed before the slow password check, so that attempts sent
        # in parallel all see each other; a right password takes it back below.
        self.throttle.fail(subjects, now)
        row = await self.db.user_by_name(username) if USERNAME_RE.fullmatch(username) else None
        stored = row["password_hash"] if row else None
        async with self._password_work():
            ok = await crypto.check_password(password[:300], stored, self.settings.bcrypt_rounds)
        user = self.users.get(row["id"]) if (ok and row) else None
        if user is None or user.disabled:
            admin_log.info("failed login from %s", client)
            raise ApiError(401, "Invalid username or password.", code="invalid_credentials")
        self.throttle.clear(subjects[0])
        self.throttle.forgive(subjects[1], now)
        await self._make_room_for_session(user, now)
        ttl = self.settings.session_ttl_hours * 3600
        return await self._issue(user, "session", None, now + ttl)

    async def _make_room_for_session(self, user: User, now: float) -> None:
        """Sign out the oldest sessions beyond MAX_SESSIONS - 1, and forget expired ones, so
        logging in again and again cannot grow the token table without end."""
        sessions = []
        for token in list(self._tokens.values()):
            if token.user_id != user.id or token.kind != "session":
                continue
            if token.expires_at is not None and token.expires_at <= now:
                self._tokens.pop(token.token_hash, None)  # dead already; nothing to write
            else:
                sessions.append(token)
        sessions.sort(key=lambda t: t.created_at)
        for token in sessions[: max(0, len(sessions) - MAX_SESSIONS + 1)]:
            await self.revoke(token)

    def _count_registration(self, subject: str) -> None:
        now = time.time()
        message = "Too many accounts registered from this address"
        _refuse_if_throttled(self.registrations, [subject], now, message, "too_many_registrations")
        self.registrations.fail([subject], now)

    @contextlib.asynccontextmanager
    async def _password_work(self) -> AsyncIterator[None]:
        """A turn at hashing or checking a password (see PASSWORD_WORKERS)."""
        if self._password_waiting >= PASSWORD_QUEUE:
            raise ApiError(
                503,
                "The server is busy checking passwords; try again shortly.",
                code="busy",
                headers={"Retry-After": "1"},
            )
        self._password_waiting += 1
        try:
            await self._password_workers.acquire()
        finally:
            self._password_waiting -= 1
        try:
            yield
        finally:
            self._password_workers.release()

    async def logout(self, principal: Principal) -> None:
        await self.revoke(principal.token)

    async def revoke(self, token: Token) -> None:
        # Drop from memory first: the token is dead for the next request even while the
        # write is in flight.
        self._tokens.pop(token.token_hash, None)
        await self.db.revoke_token(token.id, time.time())

    async def create_api_token(
        self, user: User, name: Any, expires_in_days: Any = None
    ) -> tuple[str, Token]:
        """A long-lived token for an application; it expires after ``expires_in_days``
        when given (a number of days, fractions allowed, up to ten years)."""
        if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
            raise ApiError(
                400, "'name' must be 1-64 printable characters.", param="name", code="invalid_value"
            )
        expires_at = None
        if expires_in_days is not None:
            if (
                not isinstance(expires_in_days, int | float)
                or isinstance(expires_in_days, bool)
                or not 0 < expires_in_days <= MAX_TOKEN_DAYS
            ):
                raise ApiError(
                    400,
                    f"'expires_in_days' must be a number of days above 0, at most"
                    f" {MAX_TOKEN_DAYS}.",
                    param="expires_in_days",
                    code="invalid_value",
                )
            expires_at = time.time() + expires_in_days * 86400
        if len(self.api_tokens(user)) >= MAX_API_TOKENS:
            raise ApiError(
                403,
                f"You already have {MAX_API_TOKENS} API tokens; revoke one first.",
                code="too_many_tokens",
            )
        return await self._issue(user, "api", name, expires_at)

    def api_tokens(self, user: User) -> list[Token]:
        """The user's API tokens that still work (expired ones are forgotten here)."""
        now = time.time()
        found = []
        for token in list(self._tokens.values()):
            if token.user_id != user.id or token.kind != "api":
                continue
            if token.expires_at is not None and now >= token.expires_at:
                self._tokens.pop(token.token_hash, None)
                continue
            found.append(token)
        return sorted(found, key=lambda t: t.id)

    def find_token(self, user: User, token_id: int) -> Token | None:
        for token in self._tokens.values():
            if token.id == token_id and token.user_id == user.id:
                return token
        return None

    async def _issue(
        self, user: User, kind: str, name: str | None, expires_at: float | None
    ) -> tuple[str, Token]:
        secret = crypto.new_token()
        token_hash = crypto.hash_token(secret)
        now = time.time()
        token_id = await self.db.create_token(user.id, token_hash, kind, name, now, expires_at)
        token = Token(token_id, user.id, kind, name, now, expires_at, None, token_hash)
        self._tokens[token_hash] = token
        return secret, token

    # -- administration ---------------------------------------------------------------------

    async def update_user(
        self,
        user: User,
        *,
        disabled: bool | None = None,
        is_admin: bool | None = None,
        limits: dict[str, int | None] | None = None,
    ) -> User:
        disabled = user.disabled if disabled is None else disabled
        is_admin = user.is_admin if is_admin is None else is_admin
        limits = user.limits if limits is None else limits
        # Written first: a failed write must not leave the account changed in memory only
        # (a disabled account would come back at the next restart).
        await self.db.save_user_flags(
            user.id, is_admin, disabled, json.dumps(limits) if limits else None
        )
        user.disabled, user.is_admin, user.limits = disabled, is_admin, limits
        return user


def _user_from_row(row: Any) -> User:
    limits = json.loads(row["limits"]) if row["limits"] else {}
    return User(
        id=row["id"],
        username=row["username"],
        is_admin=bool(row["is_admin"]),
        disabled=bool(row["disabled"]),
        created_at=row["created_at"],
        limits=limits,
    )


def validate_username(username: Any) -> str:
    if not isinstance(username, str):
        raise ApiError(400, "'username' must be a string.", param="username", code="invalid_type")
    if not USERNAME_RE.fullmatch(username):
        raise ApiError(
            400,
            "'username' must be 3-64 characters: letters, digits, '.', '_' or '-'.",
            param="username",
            code="invalid_value",
        )
    return username


def validate_password(password: Any) -> str:
    if not isinstance(password, str):
        raise ApiError(400, "'password' must be a string.", param="password", code="invalid_type")
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError:
        raise ApiError(
            400, "'password' is not valid Unicode text.", param="password", code="invalid_value"
        ) from None
    if not MIN_PASSWORD_BYTES <= size <= MAX_PASSWORD_BYTES:
        raise ApiError(
            400,
            f"'password' must be {MIN_PASSWORD_BYTES}-{MAX_PASSWORD_BYTES} bytes long"
            f" (UTF-8); got {size}.",
            param="password",
            code="invalid_value",
        )
    if "\x00" in password:
        raise ApiError(
            400,
            "'password' must not contain NUL characters.",
            param="password",
            code="invalid_value",
        )
    return password
