"""The store interface: what the sessions layer (and the server and the CLI above it) may ask of a durable store.

Contract: :class:`SessionStore` lists every method ``SessionManager``, ``Session``, ``server/app.py`` and ``cli.py``
call on a store, nothing more. Two stores implement it: :class:`~.store.Store` (SQLite + one safetensors KV file per
session; one process, one machine) and :class:`~.redis_store.RedisStore` (Redis: replicas share sessions, their turn
log, responses and KV blobs). :func:`open_store` picks one from a spec string (``redis://host:port/db`` or a
directory).

Every write happens before memory adopts it (store first, then memory), so a refused or failed write leaves both as
they were. The writes a turn makes are fenced: ``sync`` (at the start of a turn, under the session's turn lock) brings
a stale in-memory session up to the store's version, and ``turn_completed`` / ``history_changed`` /
``metadata_changed`` raise :class:`~gemma_sessions.errors.StaleSessionError` and change nothing when the store moved
on since (another replica wrote a turn). A store that one process owns (SQLite) never is stale. A store that cannot be
reached raises :class:`~gemma_sessions.errors.StoreUnavailableError` (HTTP 503, retry later) and changes nothing.

Idempotency: a turn carries an idempotency key (``Session.send(..., idempotency_key=...)``; the server passes the
``Idempotency-Key`` header, else a fresh uuid). A store that keeps keys (Redis) commits a key at most once per session:
``sync`` returns the reply recorded under a key already committed, and the session answers with it without generating
(a retried request never appends twice). The SQLite store keeps no keys (one process: a retry that reaches it after a
commit is a new turn).

Sessions' KV is a cache the store may keep (``restore_kv``); losing it costs a recompute, never a turn.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from .conversation import Message

# The one message for an ``after`` cursor that is not one of the caller's sessions, whether it exists for another owner
# or not at all (a listing must not tell another key's session ids from unknown ones).
UNKNOWN_CURSOR = "after must be the id of one of your sessions"


@dataclasses.dataclass(frozen=True, kw_only=True)
class IdPage:
    """One page of a session listing: ``ids`` in listing order; ``has_more``: more follow its last id."""

    ids: tuple[str, ...]
    has_more: bool


@runtime_checkable
class SessionStore(Protocol):
    """A durable store of sessions (see the module docstring). ``s`` is always a :class:`~.session.Session`."""

    path: Path | str          # where it lives, for messages and the CLI (a directory, or a Redis URL without password)
    readonly: bool
    shared: bool              # other processes write to it too (Redis replicas); a directory is one process's (locked)

    # lifecycle
    def attach(self, manager) -> None:
        """Called once by ``SessionManager``: the engine whose KV it snapshots and restores."""

    def close(self, snapshot_all: bool = True, timeout: float = 20.0) -> None:
        """Write what KV is worth keeping (bounded by ``timeout``), then release everything."""

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until queued KV snapshots are written (tests, shutdown)."""

    # writes (store first, then memory; fenced where the store is shared)
    def session_created(self, s) -> None: ...

    def history_changed(self, s, messages: list[Message]) -> None: ...

    def metadata_changed(self, s, metadata: dict) -> None: ...

    def turn_completed(self, s, messages: list[Message], dropped: int, stats, *, idempotency_key: str | None = None,
                       reply: dict | None = None) -> None:
        """Commit a completed turn (``messages``: the whole history after it) before memory adopts it. ``reply``
        (text, token_ids, finish_reason, reasoning, stats as JSON) is what a retry with the same key gets back."""

    def session_deleted(self, s) -> None: ...

    def delete_session(self, sid: str) -> None: ...

    # turns
    def sync(self, s, idempotency_key: str | None = None) -> dict | None:
        """Before a turn or a change (under the turn lock): reload ``s`` in place if the store moved on (history,
        stats, metadata and version from the store; SessionNotFoundError if it was deleted). Returns the reply
        recorded under ``idempotency_key`` if that key was committed already, else None."""

    def restore_kv(self, s) -> str:
        """Give ``s`` its history's KV if memory lacks it; returns memory | snapshot | recompute."""

    # reads
    def session_ids(self, owner: str | None = None) -> list[str]:
        """Every stored session's id, oldest first; only ``owner``'s when given."""

    def session_page(self, owner: str, *, limit: int, after: str | None = None, order: str = "asc") -> IdPage:
        """One page of ``owner``'s session ids without reading the others: at most ``limit``, ordered by
        (created_at, id) ascending (``order="asc"``) or descending (``"desc"``), starting just after the session
        ``after`` (None: from the start). InvalidRequestError(UNKNOWN_CURSOR) when ``after`` is not one of ``owner``'s
        sessions, the same whether it is another owner's or none at all."""

    def load_session(self, manager, sid: str): ...

    def summaries(self) -> list[dict]:
        """One row per stored session without loading it: id, owner, created_at, updated_at, system, messages,
        tokens."""

    def messages(self, sid: str) -> list[Message] | None: ...

    def snapshot_info(self, sid: str) -> dict | None: ...

    def stats(self) -> dict: ...

    # responses (previous_response_id)
    def put_response(self, rid: str, owner: str, sid: str, n_messages: int, body: str) -> None: ...

    def get_response(self, rid: str) -> dict | None: ...

    def delete_response(self, rid: str) -> bool:
        """Remove a kept response (not its session); False when there was none."""


STORE_METHODS = ("attach", "close", "flush", "session_created", "history_changed", "metadata_changed",
                 "turn_completed", "session_deleted", "delete_session", "sync", "restore_kv", "session_ids",
                 "session_page", "load_session", "summaries", "messages", "snapshot_info", "stats", "put_response",
                 "get_response", "delete_response")
"""Every method of :class:`SessionStore`, for tests and readers (the Protocol is the definition)."""


def open_store(spec: str | os.PathLike | None = None, **kw) -> SessionStore:
    """A store from a spec: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``) opens a
    :class:`~.redis_store.RedisStore` (StoreUnavailableError when it cannot be reached); anything else is a directory
    for the SQLite :class:`~.store.Store` (None: the default directory). ``kw`` go to the store's constructor.

    Example::

        store = open_store("redis://127.0.0.1:6379/0", kv_ttl_s=3600)
        manager = SessionManager(engine, store=store)
    """
    text = os.fspath(spec) if spec is not None else None
    if isinstance(text, str) and text.split("://", 1)[0] in ("redis", "rediss", "unix"):
        from .redis_store import RedisStore

        return RedisStore(text, **kw)
    from .store import Store

    return Store(text, **kw)
