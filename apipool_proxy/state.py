"""The services one server process holds, shared by the proxy and the admin app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from .accounts import Accounts
from .config import Settings
from .limits import Limiter
from .metrics import Metrics
from .objects import ObjectRegistry
from .pool import KeyPool
from .storage import Database
from .tasks import BackgroundTasks
from .upstream import UpstreamClient, WebSocketDialer
from .upstream_keys import UpstreamKeys
from .usage import WriteBehind

if TYPE_CHECKING:
    from .proxy.access import AnsweredRequests


def _answered_requests() -> AnsweredRequests:
    from .proxy.access import AnsweredRequests  # the proxy package imports this module

    return AnsweredRequests()


@dataclass(eq=False)
class Services:
    settings: Settings
    db: Database
    accounts: Accounts
    pool: KeyPool
    keys: UpstreamKeys
    writer: WriteBehind
    limiter: Limiter
    metrics: Metrics
    tasks: BackgroundTasks
    upstream: UpstreamClient
    websockets: WebSocketDialer
    # Which key and member hold each object created through the pool (files, batches...).
    objects: ObjectRegistry = field(default_factory=ObjectRegistry)
    # Proxied requests answered but not yet counted and logged (written behind).
    answered: AnsweredRequests = field(default_factory=lambda: _answered_requests())
    # The URL callers use for /v1 (public_url, or the address actually bound).
    proxy_url: str = ""
    # Set when shutdown begins: new proxied requests are refused while in-flight ones finish.
    draining: bool = False
    in_flight: set[object] = field(default_factory=set)


SERVICES = web.AppKey("services", Services)
