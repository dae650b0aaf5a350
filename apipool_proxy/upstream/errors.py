"""What can go wrong between the proxy and an upstream, in words safe to show a caller."""

from __future__ import annotations


class UpstreamError(Exception):
    """An upstream request failed before or while its answer arrived.

    ``describe`` is a short phrase for logs, key health and error messages. It never holds
    a URL, a header or a byte of the answer, so no secret can leak through it.
    """

    describe = "upstream request failed"


class UpstreamConnectError(UpstreamError):
    """No connection: DNS failed, every address refused or unreachable, or the guard said no."""

    describe = "cannot connect to upstream"


class UpstreamTimeout(UpstreamError):
    """Connecting took longer than the connect timeout, or the upstream fell silent."""

    describe = "upstream timed out"


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection before the answer was complete."""

    describe = "upstream closed the connection"


class UpstreamProtocolError(UpstreamError):
    """The upstream's bytes were not valid HTTP/1.1."""

    describe = "upstream sent an invalid HTTP answer"


class StaleConnection(UpstreamClosed):
    """A kept-alive connection turned out closed before a byte of the answer came back.

    Servers close idle connections whenever they like, so this says nothing about the key:
    the request is sent again on a new connection.
    """
