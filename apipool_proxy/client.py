"""Python client for apipool-proxy: the admin API and the OpenAI-compatible proxy.

Standard library only, so a script can use it without the server's dependencies::

    client = APIPoolClient("http://localhost:8081")
    client.login("alice", "correct horse")
    client.add_key("sk-...", models=["gpt-4o-mini"])
    messages = [{"role": "user", "content": "Hello"}]
    reply = client.chat_completions("gpt-4o-mini", messages)
    for chunk in client.chat_completions("gpt-4o-mini", messages, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

Every failure raises APIPoolError.
"""

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from datetime import date
from typing import IO, Any, Literal, overload

__all__ = ["APIPoolClient", "APIPoolError"]

DEFAULT_SERVER_URL = "http://localhost:8081"
DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"

_USER_AGENT = "apipool-proxy-client"


class APIPoolError(RuntimeError):
    """A call failed: the server answered with an error, or could not be reached.

    ``status`` is the HTTP status of the failed response, or None when there is none: the server
    was unreachable, the connection broke, or an error frame arrived inside a stream that had
    already started. ``message``, ``code``, ``type`` and ``param`` come from the server's error
    envelope ``{"error": {...}}``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        code = f", code {self.code}" if self.code else ""
        return f"{self.message} (HTTP {self.status}{code})"


class APIPoolClient:
    """A session with one apipool-proxy server.

    server_url is the admin port; proxy_url is the proxy's ``/v1`` base and, when left out, is
    asked from the server (``GET /api/info``) on first use. token is a login token or a pool
    token from create_token(); login() sets it and logout() forgets it.
    """

    def __init__(
        self,
        server_url: str = DEFAULT_SERVER_URL,
        token: str | None = None,
        proxy_url: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.server_url = _base_url(server_url)
        self.proxy_url = _base_url(proxy_url) if proxy_url is not None else None
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_RefuseRedirects)

    def __repr__(self) -> str:
        state = "with token" if self.token else "no token"
        return f"<APIPoolClient {self.server_url} ({state})>"

    # Account

    def register(self, username: str, password: str) -> int:
        """Create an account and return its user id. It does not log in: call login() next.

        From a client logged in as an admin this creates the account for someone else, also
        while registration is closed.
        """
        body = {"username": username, "password": password}
        reply = self._admin("POST", "/api/register", body, need_token=False)
        return int(_field(reply, "user_id"))

    def login(self, username: str, password: str) -> str:
        """Log in, keep the token on the client (``.token``) and return it."""
        body = {"username": username, "password": password}
        reply = self._admin("POST", "/api/login", body, need_token=False)
        self.token = str(_field(reply, "token"))
        return self.token

    def logout(self) -> None:
        """Revoke the token on the server, then forget it.

        If the server cannot be reached the token is kept, so the call can be retried; if the
        server says the token is already invalid (401) it is forgotten and the error raised.
        """
        try:
            self._admin("POST", "/api/logout")
        except APIPoolError as exc:
            if exc.status == 401:
                self.token = None
            raise
        self.token = None

    def me(self) -> dict[str, Any]:
        """Return the logged-in account: ``{user_id, username, is_admin}``."""
        return self._admin("GET", "/api/me")

    # Upstream keys

    def add_key(
        self,
        key: str,
        base_url: str = DEFAULT_UPSTREAM_URL,
        models: Sequence[str] | None = None,
        label: str | None = None,
        max_concurrent: int | None = None,
        rpm: int | None = None,
        daily_tokens: int | None = None,
    ) -> dict[str, Any]:
        """Contribute an upstream API key to the pool and return it, with the key masked.

        models limits the key to those model names (None: any model); max_concurrent and rpm
        cap the parallel requests and requests per minute the pool sends through it, and
        daily_tokens the tokens it serves per UTC day, all members together.
        """
        body: dict[str, Any] = {"key": key, "base_url": base_url}
        body.update(
            _given(
                models=list(models) if models is not None else None,
                label=label,
                max_concurrent=max_concurrent,
                rpm=rpm,
                daily_tokens=daily_tokens,
            )
        )
        return self._admin("POST", "/api/keys", body)

    def list_keys(self) -> list[dict[str, Any]]:
        """Return your upstream keys (masked), with their status and limits."""
        return _field(self._admin("GET", "/api/keys"), "keys")

    def update_key(self, key_id: int | str, **fields: Any) -> dict[str, Any]:
        """Change a key and return it. Fields: label, models, enabled, max_concurrent, rpm,
        daily_tokens (None removes a cap).

        Example: ``client.update_key(3, enabled=False)``. Fields are sent as given.
        """
        return self._admin("PATCH", f"/api/keys/{_segment(key_id)}", fields)

    def check_key(self, key_id: int | str) -> dict[str, Any]:
        """Ask the server to test a key against its upstream now; return it with a fresh status."""
        return self._admin("POST", f"/api/keys/{_segment(key_id)}/check")

    def delete_key(self, key_id: int | str) -> None:
        """Withdraw a key from the pool and delete it."""
        self._admin("DELETE", f"/api/keys/{_segment(key_id)}")

    # Pool tokens

    def create_token(self, name: str, expires_in_days: float | None = None) -> dict[str, Any]:
        """Create a pool token for the proxy, valid until revoked or, when given, for
        ``expires_in_days``. The secret is in ``["token"]``, returned only once."""
        return self._admin(
            "POST", "/api/tokens", {"name": name, **_given(expires_in_days=expires_in_days)}
        )

    def list_tokens(self) -> list[dict[str, Any]]:
        """Return your pool tokens (without their secrets)."""
        return _field(self._admin("GET", "/api/tokens"), "tokens")

    def revoke_token(self, token_id: int | str) -> None:
        """Revoke a pool token; the proxy refuses it from then on."""
        self._admin("DELETE", f"/api/tokens/{_segment(token_id)}")

    # Administration (admins only)

    def list_users(self) -> list[dict[str, Any]]:
        """Return every account with its effective limits and overrides."""
        return _field(self._admin("GET", "/api/admin/users"), "users")

    def update_user(self, user_id: int | str, **fields: Any) -> dict[str, Any]:
        """Change an account and return it. Fields: disabled, is_admin, and limits (the
        account's overrides, replacing the ones it had: ``{"rpm": 20}``, None for unlimited,
        ``{}`` for the defaults)."""
        return self._admin("PATCH", f"/api/admin/users/{_segment(user_id)}", fields)

    def pool(self) -> list[dict[str, Any]]:
        """Return every key in the pool (masked) with its owner, state and use today."""
        return _field(self._admin("GET", "/api/admin/pool"), "keys")

    def approve_key(self, key_id: int | str) -> dict[str, Any]:
        """Let a key on a host outside the shared hosts serve every member."""
        return self._admin("POST", f"/api/admin/keys/{_segment(key_id)}/approve")

    # Usage and server

    def usage(
        self,
        since: str | date | None = None,
        until: str | date | None = None,
        group_by: str = "day",
        everyone: bool = False,
    ) -> dict[str, Any]:
        """Return your usage grouped by "day", "model" or "key" ("user" too, for admins).

        The reply holds ``rows`` (your requests) and ``contributed`` (others' requests served
        by your keys), each row ``{group, requests, prompt_tokens, completion_tokens,
        total_tokens}``. since and until are ISO 8601 dates or times, or date objects.
        everyone (admins only) makes ``rows`` cover every member's requests.
        """
        query = _given(since=_iso(since), until=_iso(until), group_by=group_by)
        if everyone:
            query["all"] = "true"
        return self._admin("GET", "/api/usage?" + urllib.parse.urlencode(query))

    def info(self) -> dict[str, Any]:
        """Return the server's ``{version, proxy_url}``; needs no login."""
        return self._admin("GET", "/api/info", need_token=False)

    # Proxy

    def models(self) -> list[dict[str, Any]]:
        """Return the models the pool can serve, as OpenAI model objects."""
        token = self._require_token()
        return _field(self._call("GET", self._proxy_endpoint("/models"), None, token), "data")

    @overload
    def chat_completions(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        *,
        stream: Literal[False] = False,
        **params: Any,
    ) -> dict[str, Any]: ...

    @overload
    def chat_completions(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        *,
        stream: Literal[True],
        **params: Any,
    ) -> Iterator[dict[str, Any]]: ...

    @overload
    def chat_completions(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        *,
        stream: bool,
        **params: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]: ...

    def chat_completions(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        *,
        stream: bool = False,
        **params: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Send a chat completion through the proxy; other OpenAI parameters go in params.

        Returns the completion as a dict; with ``stream=True``, an iterator of chunk dicts
        yielded as they arrive. An HTTP error raises here, before any chunk; an error frame
        inside the stream raises when it is reached. Stopping early: call ``.close()`` on it.
        """
        token = self._require_token()
        url = self._proxy_endpoint("/chat/completions")
        body = {"model": model, "messages": list(messages), **params}
        if not stream:
            return self._call("POST", url, body, token)

        body["stream"] = True
        response = self._open("POST", url, body, token, accept="text/event-stream")
        return _stream_chunks(response, url, self.timeout)

    # HTTP

    def _require_token(self) -> str:
        # Checked before sending, so a call after logout() fails the same way as a rejected token.
        if self.token is None:
            raise APIPoolError("not logged in: call login() first or pass token=", status=401)
        return self.token

    def _admin(self, method: str, path: str, body: Any = None, *, need_token: bool = True) -> Any:
        # Sent when the client has one even where none is needed: an admin's token makes a
        # registration the admin's, which closed registration allows.
        token = self._require_token() if need_token else (self.token or None)
        return self._call(method, self.server_url + path, body, token)

    def _proxy_endpoint(self, path: str) -> str:
        if self.proxy_url is None:
            # The admin server knows the address its proxy port is published at; ask once.
            advertised = str(_field(self.info(), "proxy_url"))
            try:
                self.proxy_url = _base_url(advertised)
            except ValueError:
                raise APIPoolError("the server reported an unusable proxy_url") from None
        return self.proxy_url + path

    def _call(self, method: str, url: str, body: Any, token: str | None) -> Any:
        response = self._open(method, url, body, token)
        try:
            with response:
                raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _transport_error(url, exc, self.timeout) from exc
        # 204 No Content (deletions) has no body to parse.
        return _parse_json(raw, response.status) if raw else None

    def _open(
        self,
        method: str,
        url: str,
        body: Any,
        token: str | None,
        accept: str = "application/json",
    ) -> http.client.HTTPResponse:
        headers = {"Accept": accept, "User-Agent": _USER_AGENT}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # S310: urllib also opens file:// URLs, but _base_url lets only http(s) ones in.
        request = urllib.request.Request(  # noqa: S310
            url, data=data, headers=headers, method=method
        )

        try:
            return self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise _status_error(exc) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _transport_error(url, exc, self.timeout) from exc


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turn a redirect into an error instead of following it.

    urllib would re-send the Authorization header to the new location, whatever its host, and
    turn a POST into a GET. The API never redirects, so a redirect means a wrong URL.
    """

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


def _stream_chunks(
    response: http.client.HTTPResponse, url: str, timeout: float
) -> Iterator[dict[str, Any]]:
    """Yield each chunk of an OpenAI-style event stream as it arrives, until ``data: [DONE]``.

    See https://platform.openai.com/docs/api-reference/chat-streaming
    """
    with response:
        try:
            for data in _sse_data(response):
                if data == "[DONE]":
                    return
                chunk = _parse_json(data, response.status)
                if isinstance(chunk, dict) and "error" in chunk:
                    raise _envelope_error(chunk["error"], None, "the stream reported an error")
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            raise _transport_error(url, exc, timeout) from exc

    # http.client reads a chunked body cut short as a clean end, and OpenAI-style streams always
    # close with [DONE]; without this the caller would take a truncated answer for a whole one.
    raise APIPoolError("the stream ended before data: [DONE] (connection lost?)")


def _sse_data(lines: Iterable[bytes]) -> Iterator[str]:
    """Yield the data of each server-sent event; a blank line ends an event.

    See https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
    Iterating an HTTPResponse reads line by line from the socket, so each event comes out as
    soon as its blank line has arrived rather than when the body ends.
    """
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
            data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
        # Other fields (event, id, retry) and ":" comment lines carry nothing we use.
    if data:
        yield "\n".join(data)


def _status_error(exc: urllib.error.HTTPError) -> APIPoolError:
    try:
        raw = exc.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    finally:
        exc.close()

    if 300 <= exc.code < 400:
        fallback = "unexpected redirect (check the server URL)"
    else:
        fallback = f"the server answered {exc.code} {exc.reason or ''}".rstrip()
    return _envelope_error(_error_object(raw), exc.code, fallback)


def _error_object(raw: bytes) -> Any:
    try:
        return json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return None


def _envelope_error(error: Any, status: int | None, fallback: str) -> APIPoolError:
    """Build the exception from an error envelope's inner object, tolerating a bare string."""
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        error = {}
    return APIPoolError(
        str(error.get("message") or fallback),
        status=status,
        code=_optional_str(error.get("code")),
        type=_optional_str(error.get("type")),
        param=_optional_str(error.get("param")),
    )


def _transport_error(url: str, exc: Exception, timeout: float) -> APIPoolError:
    parts = urllib.parse.urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    # urllib wraps failures to connect and send in URLError; later ones arrive bare.
    if isinstance(exc, urllib.error.URLError):
        return APIPoolError(f"cannot reach the server at {origin}: {_reason(exc.reason)}")
    if isinstance(exc, TimeoutError):
        return APIPoolError(f"no answer from the server at {origin} within {timeout:g} seconds")
    return APIPoolError(f"connection to the server at {origin} failed: {_reason(exc)}")


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _parse_json(raw: bytes | str, status: int) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise APIPoolError("the server sent a reply that is not JSON", status=status) from None


def _field(reply: Any, name: str) -> Any:
    if not isinstance(reply, dict) or name not in reply:
        raise APIPoolError(f"the server's reply has no {name!r}")
    return reply[name]


def _base_url(url: str) -> str:
    """Return url without its trailing slash, after checking it is a usable http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    # urllib also opens file:// and ftp:// URLs, and would send credentials in the URL.
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the URL must start with http:// or https:// and name a host")
    if "@" in parts.netloc:
        raise ValueError("the URL must not contain credentials")
    return url.rstrip("/")


def _segment(value: int | str) -> str:
    return urllib.parse.quote(str(value), safe="")


def _iso(value: str | date | None) -> str | None:
    return value.isoformat() if isinstance(value, date) else value


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _given(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}
