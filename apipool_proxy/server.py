"""Starting and stopping one apipool-proxy process: both ports, the shared services, and
their background tasks.

The proxy port and the admin port are two aiohttp applications on two runners, sharing
one :class:`~apipool_proxy.state.Services`. Keeping them apart means no admin route can
ever be reached through the proxy port, whatever path a caller sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from aiohttp import web

from . import netguard
from .accounts import Accounts
from .admin import build_admin_app
from .config import ConfigError, Settings, load_settings
from .crypto import MasterKeyError, load_master_key
from .errors import EnvelopeAppRunner
from .limits import Limiter, today_start
from .log import BufferedLineHandler, server_log, setup_logging
from .metrics import Metrics
from .objects import ObjectRegistry, expire_stored_outputs, saver
from .pool import KeyPool, KeyStatus
from .proxy import build_proxy_server
from .rotation import pending_key_path
from .state import Services
from .storage import Database, StorageError
from .tasks import BackgroundTasks
from .upstream import ForwardProxy, UpstreamClient, WebSocketDialer
from .upstream_keys import UpstreamKeys
from .usage import WriteBehind

# How long an access line may wait in memory before it is written.
LOG_FLUSH_INTERVAL = 0.2


class StartupError(RuntimeError):
    """The server cannot start; the message is meant for the operator, one line."""


@dataclass
class RunningServer:
    services: Services
    proxy_port: int
    admin_port: int

    @property
    def proxy_url(self) -> str:
        return f"http://{_display_host(self.services.settings.proxy.host)}:{self.proxy_port}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://{_display_host(self.services.settings.admin.host)}:{self.admin_port}"


def _display_host(host: str) -> str:
    if host in ("", "0.0.0.0"):  # noqa: S104 - display only
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def open_services(settings: Settings, environ: Mapping[str, str]) -> Services:
    """Open the database, load accounts and keys into memory, create the upstream clients."""
    try:
        master_key = load_master_key(settings.security.master_key_file, environ)
    except OSError as exc:
        raise StartupError(f"cannot create the master key file: {exc.strerror}") from None
    except MasterKeyError as exc:
        raise StartupError(str(exc)) from None
    try:
        db = await Database.open(settings.database.path)
    except StorageError as exc:
        raise StartupError(str(exc)) from None
    try:
        return await _load(settings, db, master_key, environ)
    except BaseException:
        await db.close()
        raise


async def _load(
    settings: Settings, db: Database, master_key: bytes, environ: Mapping[str, str]
) -> Services:
    accounts = Accounts(db, settings.auth)
    await accounts.load()
    pool = KeyPool(settings.pool.strategy, settings.pool.prefer_own_keys)
    forbidden_ports = {settings.proxy.port, settings.admin.port} - {0}
    keys = UpstreamKeys(db, master_key, pool, settings, forbidden_ports)
    try:
        await keys.load()
    except MasterKeyError as exc:
        message = str(exc)
        if pending_key_path(settings.security.master_key_file).exists():
            message += (
                "; a master key rotation was interrupted: run 'apipool rotate-master-key'"
                " to finish it"
            )
        raise StartupError(message) from None
    limiter = Limiter(settings.limits)
    now = time.time()
    await keys.seed_budgets(now)
    for row in await db.tokens_since(today_start(now)):
        limiter.seed_today(row["user_id"], row["tokens"] or 0, now)
    objects = ObjectRegistry()
    objects.load(await db.all_objects())
    writer = WriteBehind(db)
    upstream = _upstream_client(settings, forbidden_ports, environ)
    services = Services(
        settings=settings,
        db=db,
        accounts=accounts,
        pool=pool,
        keys=keys,
        writer=writer,
        limiter=limiter,
        metrics=Metrics(),
        tasks=BackgroundTasks(),
        upstream=upstream,
        websockets=_websocket_dialer(settings, forbidden_ports, upstream),
        objects=objects,
    )
    keys.upstream = services.upstream
    writer.add_source(keys.save_health)
    writer.add_source(saver(objects, db))
    writer.add_source(lambda: _touch_tokens(services))
    _watch_gauges(services)
    return services


def _upstream_client(
    settings: Settings, forbidden_ports: set[int], environ: Mapping[str, str]
) -> UpstreamClient:
    """The one client every plain upstream request goes through (see ``upstream/``)."""
    upstream = settings.upstream
    policy = netguard.AddressPolicy(upstream.allow_private_networks, forbidden_ports)
    proxy = ForwardProxy.from_url(upstream.http_proxy) if upstream.http_proxy else None
    if proxy is None and _proxy_in_environment(environ):
        server_log.warning(
            "a proxy is set in the environment (HTTPS_PROXY or ALL_PROXY) but upstream"
            " requests do not use it; set upstream.http_proxy to send them through one"
        )
    return UpstreamClient(
        policy,
        connect_timeout=upstream.connect_timeout,
        read_timeout=upstream.read_timeout,
        proxy=proxy,
    )


def _proxy_in_environment(environ: Mapping[str, str]) -> bool:
    names = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    return any(environ.get(name) for name in names)


def _websocket_dialer(
    settings: Settings, forbidden_ports: set[int], upstream: UpstreamClient
) -> WebSocketDialer:
    """How WebSocket upgrades (the Realtime API) reach upstreams; see ``upstream/``."""
    config = settings.upstream
    return WebSocketDialer(
        upstream,
        allow_private_networks=config.allow_private_networks,
        forbidden_ports=forbidden_ports,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
    )


def _touch_tokens(services: Services) -> object:
    touched = services.accounts.take_touched()
    return services.db.touch_tokens(touched) if touched else None


def _watch_gauges(services: Services) -> None:
    def keys_by_status() -> dict[str, float]:
        now = time.time()
        # Every status, zeros included, so an alert on "invalid > 0" sees the series exist.
        counts = {status.value: 0.0 for status in KeyStatus}
        for key in services.pool:
            counts[key.effective_status(now).value] += 1
        return counts

    services.metrics.watch(
        "apipool_keys", "Upstream keys in the pool by status.", "status", keys_by_status
    )
    services.metrics.watch(
        "apipool_usage_rows_pending",
        "Usage rows waiting to be written.",
        "",
        lambda: {"": float(services.writer.pending)},
    )


async def close_services(services: Services) -> None:
    """Stop background work, write what is pending, close upstream connections and the database."""
    await services.tasks.close()
    services.answered.drain(services)  # the requests answered since the last round
    try:
        await services.writer.flush()
    except Exception:
        server_log.exception("final write of usage failed")
    await services.websockets.close()
    await services.upstream.close()
    await services.db.close()


@contextlib.asynccontextmanager
async def serve(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> AsyncIterator[RunningServer]:
    """Run both ports until the block exits, then shut down gracefully."""
    environ = os.environ if environ is None else environ
    services = await open_services(settings, environ)
    runners: list[web.BaseRunner] = []
    grace = settings.proxy.shutdown_grace
    try:
        # On the proxy port a caller that hangs up cancels its handler, which closes the
        # upstream request at once instead of at the next chunk.
        proxy_server = build_proxy_server(
            services,
            access_log=None,
            handler_cancellation=True,
            # Also bounds a connection that never completes its request (slowloris).
            keepalive_timeout=settings.proxy.idle_timeout,
        )
        proxy_port = await _start(
            runners,
            web.ServerRunner(proxy_server, shutdown_timeout=grace),
            settings.proxy.host,
            settings.proxy.port,
        )
        admin_port = await _start(
            runners,
            EnvelopeAppRunner(
                build_admin_app(services),
                access_log=None,
                shutdown_timeout=grace,
                keepalive_timeout=settings.proxy.idle_timeout,
            ),
            settings.admin.host,
            settings.admin.port,
        )
        services.keys.forbidden_ports.update({proxy_port, admin_port})
        if settings.auth.open_registration and not _is_loopback(settings.admin.host):
            server_log.warning(
                "the admin port listens on %s with open registration: anyone who reaches it"
                " can join the pool and use its shared keys (auth.open_registration: false"
                " closes it)",
                settings.admin.host,
            )
        running = RunningServer(services, proxy_port, admin_port)
        services.proxy_url = settings.proxy.public_url or running.proxy_url
        services.tasks.spawn("write-behind", services.writer.run())
        services.tasks.spawn("refresh-models", services.keys.refresh_models())
        services.tasks.spawn("sweep-idle-connections", services.upstream.sweep_idle())
        services.tasks.spawn("account-answered", services.answered.run(services))
        days = services.settings.pool.stored_response_days
        if days is not None:
            expiry = expire_stored_outputs(services.objects, days)
            services.tasks.spawn("expire-stored-responses", expiry)
        yield running
    finally:
        services.draining = True
        for runner in runners:
            await runner.cleanup()
        await close_services(services)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, assume others can reach it


# Connections the kernel may hold for the server to accept. aiohttp's default (128) can be
# overrun when hundreds of clients connect at once while the loop is busy; the kernel then
# drops their handshakes, and each dropped one costs its client a second of retransmission.
# The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 2048


async def _start(
    runners: list[web.BaseRunner], runner: web.BaseRunner, host: str, port: int
) -> int:
    await runner.setup()
    runners.append(runner)
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=LISTEN_BACKLOG)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return sockets[0].getsockname()[1] if sockets else port


async def _flush_logs(handler: BufferedLineHandler) -> None:
    while True:
        await asyncio.sleep(LOG_FLUSH_INTERVAL)
        handler.flush()


async def _main(settings: Settings, log_handler: BufferedLineHandler) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(settings) as running:
        running.services.tasks.spawn("flush-logs", _flush_logs(log_handler))
        _tune_garbage_collector()
        server_log.info("proxy port listening on %s", running.proxy_url)
        server_log.info("admin port listening on %s", running.admin_url)
        await stop.wait()
        server_log.info("shutting down: finishing in-flight requests")
    server_log.info("stopped")


def _tune_garbage_collector() -> None:
    """Keep the collector's pauses short while streams are being relayed.

    Everything loaded at startup is moved out of the collector's view (``gc.freeze``). The
    young generation is collected after 50,000 allocations instead of 700, and a full
    collection, which walks every object of every open stream (measured: pauses of 100 ms
    and more with 1,000 streams open), comes only after 1,000 middle-generation ones. A
    request makes many short-lived objects but almost no reference cycles: under 200,000
    requests the resident memory stayed flat (``make bench``, leak check).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1_000)


def run(config_path: str | None) -> int:
    """Entry point of ``apipool serve``: returns the process exit code."""
    path = config_path or os.environ.get("APIPOOL_CONFIG")
    try:
        settings = load_settings(path, os.environ)
    except ConfigError as exc:
        print(f"Error: configuration: {exc}", file=sys.stderr)
        return 2
    log_handler = setup_logging(settings.log.level, settings.log.format)
    _raise_open_file_limit()
    try:
        _run_loop(_main(settings, log_handler))
    except StartupError as exc:
        log_handler.flush()
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    log_handler.flush()
    return 0


def _raise_open_file_limit() -> None:
    """Let the process hold as many sockets as the system allows it.

    Each proxied request holds two (the caller's and the upstream's) and idle upstream
    connections are kept for reuse, so the usual soft limit of 1,024 open files would cap
    the proxy near 500 concurrent requests. The soft limit goes up to the hard limit, which
    only the administrator sets.
    """
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:  # macOS refuses more than its own maximum
        server_log.info("open-file limit stays at %d: %s", soft, exc)
        return
    server_log.info("open-file limit raised from %d to %d", soft, wanted)


def _run_loop(main: object) -> None:
    try:
        import uvloop
    except ImportError:  # not on every platform; the standard loop works, slower
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]
