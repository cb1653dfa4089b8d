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
        from .store import Store

        self.engine = engine
        self.store = Store(store) if store is not None and not isinstance(store, Store) else store
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        if self.store is not None:
            self.store.attach(self)

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

    def loaded_sessions(self) -> list[Session]:
        """Sessions currently in memory (a store may hold more)."""
        with self._lock:
            return list(self._sessions.values())

    def close(self) -> None:
        """Snapshot what is in memory and close the store (the engine is closed by its owner)."""
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> SessionManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ session files
    def export(self, session_id: str, path, *, quantize: bool = False, compress: bool = False,
               kv_dtype: str | None = None) -> int:
        """Write one self-describing session file (history, settings, stats and KV); returns its size."""
        from .sessionfile import encode_session, write_session_file

        s = self.get(session_id)
        s._turn_lock.acquire()
        try:
            self._before_turn(s)
            snap = self.engine.export_kv(s.kv)
            model = self.engine.model
            data = encode_session(snap, model_fingerprint=model.fingerprint,
                                  tokenizer_fingerprint=model.tokenizer.fingerprint, session=_session_dict(s),
                                  kv_dtype=kv_dtype, quantize=quantize)
        finally:
            s._turn_lock.release()
        return write_session_file(path, data, compress=compress)

    def import_file(self, path, *, history_only: bool = False, new_id: bool = False) -> Session:
        """Create a session from a session file (verified; see sessionfile.py). ``history_only`` accepts a file
        from another model by dropping its KV (the history is recomputed on the next turn)."""
        from .sessionfile import read_session_file

        model = self.engine.model
        meta, snap = read_session_file(path, model_fingerprint=model.fingerprint,
                                       tokenizer_fingerprint=model.tokenizer.fingerprint, history_only=history_only)
        s = _session_from_dict(self, meta, new_id=new_id)
        with self._lock:
            if s.id in self._sessions:
                from ..errors import InvalidRequestError

                raise InvalidRequestError(f"session {s.id} already exists (import with new_id=True)")
            self._sessions[s.id] = s
        if self.store is not None:
            self.store.session_created(s)
        if snap is not None and list(snap.tokens) == s.token_ids[:len(snap.tokens)]:
            self.engine.import_kv(s.kv, snap)
        return s

    # ------------------------------------------------------------------------------------------ hooks
    def _before_turn(self, session: Session) -> str:
        if self.store is not None:
            return self.store.restore_kv(session)
        if not session.conversation.messages:
            return "new"
        return "memory" if self.engine.kv_tokens(session.kv) else "recompute"

    def _history_changed(self, session: Session) -> None:
        if self.store is not None:
            self.store.history_changed(session)

    def _turn_completed(self, session: Session, user: Message, stats: TurnStats) -> None:
        if self.store is not None:
            self.store.turn_completed(session, stats)


def _copy_conversation(conv: Conversation) -> Conversation:
    copy = Conversation(conv.tokenizer, conv.system)
    copy.messages = list(conv.messages)
    copy.dropped_turns = conv.dropped_turns
    return copy


def _session_dict(s: Session) -> dict:
    with s._data_lock:
        return {"id": s.id, "created_at": s.created_at, "system": s.system, "sampling": s.sampling.to_dict(),
                "context_policy": s.context_policy, "max_context": s.max_context, "metadata": s.metadata,
                "dropped_turns": s.conversation.dropped_turns,
                "messages": [m.to_dict() for m in s.conversation.messages],
                "turn_stats": [t.__dict__ for t in s.turn_stats]}


def _session_from_dict(manager: SessionManager, d: dict, new_id: bool) -> Session:
    from ..errors import SessionFileError

    try:
        s = Session(manager, system=d.get("system"), sampling=SamplingParams.from_dict(d.get("sampling") or {}),
                    context_policy=d.get("context_policy", "truncate_oldest"), max_context=d.get("max_context"),
                    session_id=None if new_id else d["id"], metadata=d.get("metadata"),
                    created_at=d.get("created_at"))
        s.conversation.messages = [Message.from_dict(m) for m in d.get("messages", [])]
        s.conversation.dropped_turns = int(d.get("dropped_turns", 0))
        s.turn_stats = [TurnStats(**t) for t in d.get("turn_stats", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise SessionFileError(f"session metadata is malformed ({exc})") from exc
    vocab = manager.engine.model.config.vocab_size
    if any(not 0 <= t < vocab for m in s.conversation.messages for t in m.token_ids):
        raise SessionFileError("session history has token ids outside this model's vocabulary")
    return s
