"""The admin port: the account side of the pool, as a JSON API."""

from .app import build_admin_app

__all__ = ["build_admin_app"]
