"""The proxy port: the OpenAI /v1 surface, served from the pool."""

from .app import build_proxy_app

__all__ = ["build_proxy_app"]
