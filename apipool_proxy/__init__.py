"""apipool-proxy: pool LLM API keys behind one OpenAI-compatible reverse proxy."""

__version__ = "0.1.0"

from .client import APIPoolClient, APIPoolError

__all__ = ["APIPoolClient", "APIPoolError", "__version__"]
