"""The shared pool of upstream keys: who may use which key, which key serves a model,
and how a key's health changes with what its upstream answers.

Nothing here knows about HTTP servers or the database; callers persist what the pool
marks as changed.
"""

from .health import Outcome, classify_response
from .keys import KeyStatus, PooledKey
from .pool import KeyPool, NoKeyAvailable

__all__ = ["KeyPool", "KeyStatus", "NoKeyAvailable", "Outcome", "PooledKey", "classify_response"]
