"""The sessions layer: conversations as exact token ids on a shared engine."""

from .conversation import Message
from .manager import SessionManager
from .session import Reply, Session, TurnStats
from .store_protocol import SessionStore, open_store

__all__ = ["Message", "Reply", "Session", "SessionManager", "SessionStore", "TurnStats", "open_store"]
