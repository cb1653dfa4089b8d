"""SessionManager: create, find, list, fork and delete sessions on one engine.

Contract: every method is thread-safe. Sessions share the engine's KV pool and prefix cache (N sessions with the
same system prompt hold its blocks once); a fork shares its parent's blocks and copies on write. ``store=`` (the
durable store) is optional; without it sessions live in memory only.
"""

from __future__ import annotations

import threading

from ..errors import SessionNotFoundError
from ..sampling import SamplingParams
from .conversation import Conversation, Message
from .session import Session, TurnStats


class SessionManager:
    """Owns the sessions of one engine.

    Example::

        manager = gs.SessionManager(engine)
        s = manager.create(system="You are terse.")
        s.send("Hello").text
        child = manager.fork(s.id)
        manager.delete(s.id)
    """

    def __init__(self, engine, store=None):
        self.engine = engine
        self.store = store
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        if store is not None:
            store.attach(self)

    def create(self, *, system: str | None = None, sampling: SamplingParams | None = None,
               context_policy: str = "truncate_oldest", max_context: int | None = None,
               metadata: dict | None = None, session_id: str | None = None) -> Session:
        """A new, empty session."""
        s = Session(self, system=system, sampling=sampling, context_policy=context_policy,
                    max_context=max_context, metadata=metadata, session_id=session_id)
        with self._lock:
            if s.id in self._sessions:
                from ..errors import InvalidRequestError

                raise InvalidRequestError(f"session {s.id} already exists")
            self._sessions[s.id] = s
        if self.store is not None:
            self.store.session_created(s)
        return s

    def get(self, session_id: str) -> Session:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None and self.store is not None:
            s = self.store.load_session(self, session_id)
            if s is not None:
                with self._lock:
                    s = self._sessions.setdefault(session_id, s)
        if s is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return s

    def list(self) -> list[Session]:
        with self._lock:
            sessions = list(self._sessions.values())
        if self.store is not None:
            known = {s.id for s in sessions}
            sessions += [self.get(i) for i in self.store.session_ids() if i not in known]
        return sorted(sessions, key=lambda s: s.created_at)

    def fork(self, session_id: str, metadata: dict | None = None) -> Session:
        """A new session with the parent's history, sharing its KV blocks (copy on write)."""
        parent = self.get(session_id)
        child = Session(self, system=parent.system, sampling=parent.sampling,
                        context_policy=parent.context_policy, max_context=parent.max_context,
                        metadata={**parent.metadata, **(metadata or {}), "forked_from": parent.id})
        with parent._data_lock:
            child.conversation = _copy_conversation(parent.conversation)
            child.turn_stats = []
        self.engine.release_kv(child.kv)
        child.kv = self.engine.fork_kv(parent.kv)
        with self._lock:
            self._sessions[child.id] = child
        if self.store is not None:
            self.store.session_created(child)
        return child

    def delete(self, session_id: str) -> None:
        """Remove a session, its history and its KV (waits for a running turn to end)."""
        s = self.get(session_id)
        s._turn_lock.acquire()
        try:
            with self._lock:
                self._sessions.pop(session_id, None)
            s.deleted = True
            self.engine.release_kv(s.kv)
            if self.store is not None:
                self.store.session_deleted(s)
        finally:
            s._turn_lock.release()

    @property
    def stats(self) -> dict:
        with self._lock:
            sessions = list(self._sessions.values())
        return {"sessions": len(sessions), "busy_sessions": sum(1 for s in sessions if s.busy),
                "engine": self.engine.stats()}

    # ------------------------------------------------------------------------------------------ hooks
    def _turn_completed(self, session: Session, user: Message, stats: TurnStats) -> None:
        if self.store is not None:
            self.store.turn_completed(session, stats)


def _copy_conversation(conv: Conversation) -> Conversation:
    copy = Conversation(conv.tokenizer, conv.system)
    copy.messages = list(conv.messages)
    copy.dropped_turns = conv.dropped_turns
    return copy
