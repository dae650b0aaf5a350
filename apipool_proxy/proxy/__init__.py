"""The proxy port: the OpenAI /v1 surface in front of the pool."""

from .app import build_proxy_server

__all__ = ["build_proxy_server"]
