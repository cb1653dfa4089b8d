"""SessionManager: create, find, list, fork and delete sessions on one engine.

Contract: every method is thread-safe. Sessions share the engine's KV pool and prefix cache (N sessions with the
same system prompt hold its blocks once); a fork shares its parent's blocks and copies on write. ``store=`` (the
durable store) is optional; without it sessions live in memory only.

Ownership (``Session.owner``, e.g. an API key's hash) is its own field: set at create, import or fork by the caller,
never read from metadata or from a session file. Session files from elsewhere are untrusted: fully validated
before anything is created, and their KV stays private to the imported session (never shared through the prefix
cache). Every change is written to the store before memory changes, so both change together or not at all.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading

from ..errors import GemmaSessionsError, InvalidRequestError, SessionFileError, SessionNotFoundError
from ..sampling import SamplingParams
from .conversation import CONTEXT_POLICIES, Message, check_text
from .session import Session, TurnStats, check_metadata
from .store_protocol import UNKNOWN_CURSOR

# Responses kept for previous_response_id when there is no store (the store keeps its own, see Store).
MEMORY_RESPONSES = 10_000
# A kept response's body holds when its context ended, and when its generator last said it was alive, under these
# keys (read back out by ``response()``).
_CONTEXT_KEY = "_context_before"
_ALIVE_KEY = "_alive_at"
# Largest session file import_bytes / import_file accept (decompressed), unless the caller passes another bound.
MAX_IMPORT_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionPage:
    """One page of a listing (``SessionManager.page``): its sessions in order; ``has_more``: more follow its last."""

    sessions: tuple[Session, ...]
    has_more: bool


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
        """``store``: a :class:`~.store_protocol.SessionStore` (``Store``, ``RedisStore``), or a spec for
        :func:`~.store_protocol.open_store` (a directory, or ``redis://host:port/db``); None: memory only."""
        from .store_protocol import open_store

        self.engine = engine
        self.store = open_store(store) if isinstance(store, (str, os.PathLike)) else store
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._responses: collections.OrderedDict[str, dict] = collections.OrderedDict()
        if self.store is not None:
            self.store.attach(self)

    def create(self, *, system: str | None = None, sampling: SamplingParams | None = None,
               context_policy: str = "truncate_oldest", max_context: int | None = None,
               metadata: dict | None = None, session_id: str | None = None, owner: str = "",
               persistent: bool = True, reasoning: bool | None = None) -> Session:
        """A new, empty session (``persistent=False``: never stored nor listed, e.g. a one-off request).
        ``reasoning``: its thinking switch (``sampling.reasoning``; InvalidRequestError on a model without one)."""
        if reasoning is not None:
            sampling = (sampling or SamplingParams()).replace(reasoning=reasoning)
        s = Session(self, system=system, sampling=sampling, context_policy=context_policy,
                    max_context=max_context, metadata=metadata, session_id=session_id, owner=owner,
                    persistent=persistent)
        self._register(s)
        return s

    def _register(self, s: Session) -> None:
        """Make ``s`` known: the store first (one transaction), then memory."""
        with self._lock:
            if s.id in self._sessions:
                raise InvalidRequestError(f"session {s.id} already exists")
            self._sessions[s.id] = s
        try:
            if self.store is not None and s.persistent:
                self.store.session_created(s)
        except BaseException:
            with self._lock:
                self._sessions.pop(s.id, None)
            self.engine.release_kv(s.kv)
            raise

    def get(self, session_id: str) -> Session:
        """The session (loaded from the store when not in memory). With a shared store, a session in memory is
        first brought up to the store's version (``store.sync``: another replica's turns, or its deletion), unless a
        turn runs on it here, whose copy is the current one (it commits or fails on a stale version)."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is not None and self.store is not None and s.persistent and s._turn_lock.acquire(blocking=False):
            try:
                self._sync(s)
            finally:
                s._turn_lock.release()
        if s is None and self.store is not None:
            s = self.store.load_session(self, session_id)
            if s is not None:
                with self._lock:
                    s = self._sessions.setdefault(session_id, s)
        if s is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return s

    def list(self, owner: str | None = None) -> list[Session]:
        """Every persistent session, in memory or in the store, oldest first; only ``owner``'s when given (the others
        are never loaded: one key's listing does not bring every user's sessions into memory)."""
        if self.store is not None:
            ids = self.store.session_ids(owner)  # (the truth: a shared store's sessions include other replicas')
            stored = set(ids)
        with self._lock:
            sessions = [s for s in self._sessions.values() if s.persistent and (owner is None or s.owner == owner)
                        and (self.store is None or s.id in stored)]
        if self.store is not None:
            known = {s.id for s in sessions}
            sessions += [self.get(i) for i in ids if i not in known]
        return sorted(sessions, key=lambda s: s.created_at)

    def page(self, owner: str, *, limit: int = 20, after: str | None = None, order: str = "asc") -> SessionPage:
        """One page of ``owner``'s persistent sessions, ordered by (created_at, id); only that page's sessions are
        loaded (the store pages the ids, see ``SessionStore.session_page``).

        Args:
            owner: whose sessions (the others are never read).
            limit: at most this many (>= 1).
            after: a session id: the page starts just after it (None: from the start). InvalidRequestError with the
                same message whether it is another owner's session or none.
            order: ``asc`` (oldest first) or ``desc`` (newest first).

        Returns:
            The sessions, and whether more follow. A session deleted between paging its id and loading it is left out
            (the page is one shorter).
        """
        if limit < 1 or order not in ("asc", "desc"):
            raise InvalidRequestError("limit must be >= 1 and order asc or desc")
        if self.store is None:
            return self._page_in_memory(owner, limit, after, order)
        ids = self.store.session_page(owner, limit=limit, after=after, order=order)
        with self._lock:
            loaded = {sid: self._sessions.get(sid) for sid in ids.ids}
        sessions = []
        for sid in ids.ids:
            try:
                sessions.append(loaded[sid] or self.get(sid))
            except SessionNotFoundError:
                continue  # deleted since its id was paged
        return SessionPage(sessions=tuple(sessions), has_more=ids.has_more)

    def _page_in_memory(self, owner: str, limit: int, after: str | None, order: str) -> SessionPage:
        """``page`` without a store: every session is in memory already, so sorting them all costs no loading."""
        with self._lock:
            mine = [s for s in self._sessions.values() if s.persistent and s.owner == owner]
        mine.sort(key=lambda s: (s.created_at, s.id), reverse=order == "desc")
        if after is not None:
            ids = [s.id for s in mine]
            if after not in ids:
                raise InvalidRequestError(UNKNOWN_CURSOR)
            mine = mine[ids.index(after) + 1:]
        return SessionPage(sessions=tuple(mine[:limit]), has_more=len(mine) > limit)

    def fork(self, session_id: str, metadata: dict | None = None, *, keep_messages: int | None = None,
             persistent: bool | None = None) -> Session:
        """A new session with the parent's history (its first ``keep_messages`` messages when given), sharing
        its KV blocks (copy on write); the child has the parent's owner."""
        parent = self.get(session_id)
        with parent._turn_lock:
            self._sync(parent)  # another replica's turns are part of what the child inherits
        child = Session(self, system=parent.system, sampling=parent.sampling,
                        context_policy=parent.context_policy, max_context=parent.max_context,
                        metadata={**parent.metadata, **check_metadata(metadata), "forked_from": parent.id},
                        owner=parent.owner, persistent=parent.persistent if persistent is None else persistent)
        with parent._data_lock:
            child.conversation = parent.conversation.copy()
        if keep_messages is not None:
            if not 0 <= keep_messages <= len(child.conversation.messages):
                raise InvalidRequestError(f"keep_messages must be in 0..{len(child.conversation.messages)}")
            del child.conversation.messages[keep_messages:]
        self.engine.release_kv(child.kv)
        child.kv = self.engine.fork_kv(parent.kv)  # a longer KV than the history is trimmed at the next turn
        self._register(child)
        return child

    def update_metadata(self, session_id: str, metadata: dict) -> Session:
        """Merge ``metadata`` into a session's (store first, then memory)."""
        s = self.get(session_id)
        with s._turn_lock:
            self._sync(s)
            merged = {**s.metadata, **check_metadata(metadata)}
            if self.store is not None and s.persistent:
                self.store.metadata_changed(s, merged)
            s.metadata = merged
        return s

    def delete(self, session_id: str) -> None:
        """Remove a session, its history and its KV (waits for a running turn to end)."""
        s = self.get(session_id)
        s._turn_lock.acquire()
        try:
            if self.store is not None and s.persistent:
                self.store.session_deleted(s)  # store first: a failed delete leaves the session as it was (the
                # store removes the session's responses with it)
            else:
                with self._lock:  # its responses go with it, as from a store
                    for rid in [r for r, v in self._responses.items() if v["session"] == s.id]:
                        del self._responses[rid]
            self._forget(s)
        finally:
            s._turn_lock.release()

    def _forget(self, s: Session) -> None:
        """Drop a deleted session from memory (here, or by another replica: ``store.sync`` found it gone)."""
        with self._lock:
            if self._sessions.get(s.id) is s:
                del self._sessions[s.id]
        if not s.deleted:
            s.deleted = True
            self.engine.release_kv(s.kv)

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
        from .sessionfile import write_session_file

        data = self.export_bytes(session_id, quantize=quantize, compress=compress, kv_dtype=kv_dtype)
        return write_session_file(path, data)

    def import_file(self, path, *, history_only: bool = False, new_id: bool = False, owner: str = "",
                    max_bytes: int = MAX_IMPORT_BYTES) -> Session:
        """Create a session from a session file (see :meth:`import_bytes`)."""
        from pathlib import Path

        try:
            with open(Path(path), "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise SessionFileError(f"cannot read the session file ({exc.strerror})") from exc
        return self.import_bytes(data, history_only=history_only, new_id=new_id, owner=owner, max_bytes=max_bytes)

    def import_bytes(self, data: bytes, *, history_only: bool = False, new_id: bool = False, owner: str = "",
                     max_bytes: int = MAX_IMPORT_BYTES) -> Session:
        """Create a session from a session file's bytes.

        Everything is checked before anything is created (format, checksum, model and tokenizer, metadata,
        history, KV shapes and values); a refused file raises SessionFileError and leaves no trace. ``owner``
        is the new session's owner (the file's claims are ignored). ``history_only`` accepts a file from
        another model by dropping its KV (the history is recomputed on the next turn). The KV of an imported
        file stays private to this session: it is never shared with other sessions through the prefix cache.
        """
        from .sessionfile import decode_session, prefix_snapshot

        if len(data) > max_bytes:
            raise SessionFileError(f"the session file is over {max_bytes} bytes")
        model = self.engine.model
        meta, snap = decode_session(data, model_fingerprint=model.fingerprint,
                                    tokenizer_fingerprint=model.tokenizer.fingerprint, history_only=history_only,
                                    max_bytes=max_bytes)
        s = _session_from_dict(self, meta, new_id=new_id, owner=owner)
        if snap is not None:
            self.engine.check_snapshot(snap)
            # KV of other tokens than the history is useless here: keep the part that is history (Gemma 4's KV holds
            # the last turn's thoughts, which its history drops), else recompute
            snap = prefix_snapshot(snap, s.conversation.token_ids)
            if snap is not None:
                try:
                    self.engine.check_snapshot(snap)
                except SessionFileError:  # the cut lacks sliding-window blocks the full file did not need
                    snap = None
        self._register(s)
        try:
            if snap is not None:
                self.engine.import_kv(s.kv, snap)
        except GemmaSessionsError:
            self.delete(s.id)
            raise
        except (ValueError, TypeError) as exc:
            self.delete(s.id)
            raise SessionFileError(f"the session file's KV was refused ({exc})") from exc
        return s

    def export_bytes(self, session_id: str, *, quantize: bool = False, compress: bool = False,
                     kv_dtype: str | None = None) -> bytes:
        """One self-describing session file's bytes (history, settings, stats and KV)."""
        from .sessionfile import encode_session

        s = self.get(session_id)
        s._turn_lock.acquire()
        try:
            self._sync(s)
            self._before_turn(s)
            snap = self.engine.export_kv(s.kv, s.token_ids)  # (Gemma 4: the part of its KV that is history)
            model = self.engine.model
            data = encode_session(snap, model_fingerprint=model.fingerprint,
                                  tokenizer_fingerprint=model.tokenizer.fingerprint, session=_session_dict(s),
                                  kv_dtype=kv_dtype, quantize=quantize)
        finally:
            s._turn_lock.release()
        if compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=3).compress(data)
        return data

    # ------------------------------------------------------------------------------------------ responses
    def remember_response(self, response_id: str, *, owner: str, session_id: str, n_messages: int,
                          body: dict, context_before: float | None = None, alive_at: float | None = None) -> None:
        """Keep a response (OpenAI Responses) so a later ``previous_response_id`` finds it, restarts included
        (kept again under its id: replaced). ``context_before``: its input items are its session's messages made
        before this time (``GET /v1/responses/{id}/input_items``). ``alive_at``: when the process generating a
        response still in progress last said so (a background response's heartbeat)."""
        private = {k: v for k, v in ((_CONTEXT_KEY, context_before), (_ALIVE_KEY, alive_at)) if v is not None}
        if self.store is not None:
            self.store.put_response(response_id, owner, session_id, n_messages, json.dumps({**body, **private}))
            return
        with self._lock:
            self._responses[response_id] = {"owner": owner, "session": session_id, "n": n_messages, "body": body,
                                            "context_before": context_before, "alive_at": alive_at}
            self._responses.move_to_end(response_id)
            while len(self._responses) > MEMORY_RESPONSES:
                self._responses.popitem(last=False)

    def response(self, response_id: str) -> dict | None:
        """{"owner", "session", "n", "body", "context_before", "alive_at"} of a remembered response, or None."""
        if self.store is not None:
            r = self.store.get_response(response_id)
            if r is not None:
                r["context_before"] = r["body"].pop(_CONTEXT_KEY, None)
                r["alive_at"] = r["body"].pop(_ALIVE_KEY, None)
            return r
        with self._lock:
            return self._responses.get(response_id)

    def forget_response(self, response_id: str) -> bool:
        """Remove a remembered response (not its session); False when there was none."""
        if self.store is not None:
            return self.store.delete_response(response_id)
        with self._lock:
            return self._responses.pop(response_id, None) is not None

    # ------------------------------------------------------------------------------------------ hooks
    def _sync(self, session: Session, idempotency_key: str | None = None) -> dict | None:
        """Under the session's turn lock: bring a stale session up to the store's version (another replica wrote to
        it); the reply recorded under ``idempotency_key`` if that key was committed already (see SessionStore)."""
        if self.store is None or not session.persistent:
            return None
        try:
            return self.store.sync(session, idempotency_key)
        except SessionNotFoundError:  # deleted through another replica
            self._forget(session)
            raise

    def _before_turn(self, session: Session) -> str:
        if self.store is not None:
            return self.store.restore_kv(session)
        if not session.conversation.messages:
            return "new"
        return "memory" if self.engine.kv_tokens(session.kv) else "recompute"

    def _history_changed(self, session: Session, messages: list[Message]) -> None:
        if self.store is not None and session.persistent:
            self.store.history_changed(session, messages)

    def _turn_completed(self, session: Session, messages: list[Message], dropped: int, stats: TurnStats,
                        idempotency_key: str | None = None, reply: dict | None = None) -> None:
        if self.store is not None and session.persistent:
            self.store.turn_completed(session, messages, dropped, stats, idempotency_key=idempotency_key, reply=reply)


def _session_dict(s: Session) -> dict:
    with s._data_lock:
        return {"id": s.id, "created_at": s.created_at, "system": s.system, "sampling": s.sampling.to_dict(),
                "context_policy": s.context_policy, "max_context": s.max_context, "metadata": s.metadata,
                "dropped_turns": s.conversation.dropped_turns,
                "messages": [m.to_dict() for m in s.conversation.messages],
                "turn_stats": [t.__dict__ for t in s.turn_stats]}


def _session_from_dict(manager: SessionManager, d: object, new_id: bool, owner: str) -> Session:
    """A Session from a file's session JSON, every field checked (SessionFileError says what is wrong)."""
    vocab = manager.engine.model.config.vocab_size
    try:
        if not isinstance(d, dict):
            raise TypeError("the session is not an object")
        policy = d.get("context_policy", "truncate_oldest")
        if policy not in CONTEXT_POLICIES:
            raise ValueError(f"context_policy {policy!r}")
        max_context = d.get("max_context")
        if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
            raise ValueError("max_context must be a positive integer")
        sid = None if new_id else d["id"]
        if sid is not None and (not isinstance(sid, str) or not sid.isalnum() or len(sid) > 64):
            raise ValueError("the session id must be up to 64 letters and digits")
        metadata = {k: v for k, v in check_metadata(d.get("metadata")).items() if k != "_owner"}
        s = Session(manager, system=d.get("system"), sampling=SamplingParams.from_dict(d.get("sampling") or {}),
                    context_policy=policy, max_context=max_context, session_id=sid, metadata=metadata,
                    created_at=float(d.get("created_at") or 0) or None, owner=owner)
        s.conversation.messages = [_message(m, vocab) for m in d.get("messages", [])]
        s.conversation.dropped_turns = int(d.get("dropped_turns", 0))
        s.turn_stats = [TurnStats(**t) for t in d.get("turn_stats", [])]
    except SessionFileError:
        raise
    except (GemmaSessionsError, KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise SessionFileError(f"session metadata is malformed ({exc})") from exc
    return s


def _message(d: object, vocab: int) -> Message:
    if not isinstance(d, dict) or d.get("role") not in ("user", "model"):
        raise ValueError("a message must be an object with role user or model")
    check_text(d.get("text"))
    ids = d.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
        raise SessionFileError("session history has token ids outside this model's vocabulary")
    mid = d.get("id")
    if mid is not None and (not isinstance(mid, str) or len(mid) > 100):
        raise ValueError("a message id must be a short string")
    return Message.from_dict(d)
