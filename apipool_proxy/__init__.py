"""apipool-proxy: pool LLM API keys behind one OpenAI-compatible reverse proxy."""

__version__ = "0.1.0"

from .client import APIPoolClient, APIPoolError

# The Server header of every answer on both ports: no versions for scanners to match.
SERVER_NAME = "apipool-proxy"

__all__ = ["APIPoolClient", "APIPoolError", "__version__"]
