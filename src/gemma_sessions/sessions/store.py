"""The durable session store: SQLite (WAL) for sessions, messages, token ids, settings and stats, plus one
safetensors KV snapshot per session. It implements ``store_protocol.SessionStore`` for one process on one machine
(``redis_store.RedisStore`` is the one replicas share); both write KV in the background with ``SnapshotWriter``.

Contract:
- Durable by default: ``turn_completed`` commits the turn's messages and token ids (synchronous=FULL) before the
  turn is reported complete. KV snapshots are written later by a background thread (at turn end, when an idle
  session's KV is spilled under memory pressure, and at shutdown), atomically (tmp + fsync + rename). A stale,
  missing or refused snapshot is never an error, only a slower next turn (recomputed from token ids).
- Restart: a new process on the same directory lists every session with its full history; a session's next turn
  restores its KV from the snapshot when it is valid for this model and a prefix of the history.
- One process serves a store (an exclusive lock file); others may open it ``readonly=True`` to list and read.
- A session's owner is its own column, never part of its metadata. Responses (for ``previous_response_id``) are
  kept with their owner and the session and message count they point at, the newest ``MAX_RESPONSES``.
- ``session_deleted`` removes the rows, its responses and the snapshot file: nothing is orphaned. Stray temporary files and
  snapshots without a session (a crash between two steps) are cleaned up on open.

Layout::

    DIR/sessions.db        SQLite: sessions, messages, turns, snapshots
    DIR/kv/<id>.safetensors KV snapshot (see sessionfile.py)
    DIR/.lock               held by the serving process
"""

from __future__ import annotations

import array
import fcntl
import itertools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path

from ..errors import GemmaSessionsError, InvalidRequestError, SessionFileError, StoreError
from ..sampling import SamplingParams
from .conversation import Message
from .sessionfile import encode_session, prefix_snapshot, read_session_file, write_session_file
from .store_protocol import UNKNOWN_CURSOR, IdPage

log = logging.getLogger("gemma_sessions.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions(id TEXT PRIMARY KEY, created_at REAL, updated_at REAL, system TEXT,
    sampling TEXT, context_policy TEXT, max_context INTEGER, metadata TEXT, dropped_turns INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS messages(session_id TEXT, idx INTEGER, role TEXT, text TEXT, created_at REAL,
    token_ids BLOB, msg_id TEXT, PRIMARY KEY(session_id, idx));
CREATE TABLE IF NOT EXISTS turns(session_id TEXT, idx INTEGER, stats TEXT, PRIMARY KEY(session_id, idx));
CREATE TABLE IF NOT EXISTS snapshots(session_id TEXT PRIMARY KEY, tokens INTEGER, bytes INTEGER,
    model_fingerprint TEXT, created_at REAL);
CREATE TABLE IF NOT EXISTS responses(id TEXT PRIMARY KEY, owner TEXT, session_id TEXT, n_messages INTEGER,
    body TEXT, created_at REAL);
CREATE INDEX IF NOT EXISTS responses_by_session ON responses(session_id);
"""
# Spilled KV snapshots held in memory while they wait for the writer; a spill beyond it is dropped (a recompute
# later), so a writer slower than the spills costs time, never unbounded memory.
MAX_PENDING_BYTES = 64 << 20
# Seconds close() may spend writing KV snapshots (a shutdown must end in bounded time).
CLOSE_SNAPSHOT_S = 20.0
# Responses kept for previous_response_id; the oldest go first beyond this (a session's history is never pruned).
MAX_RESPONSES = 100_000


def default_store_dir() -> Path:
    env = os.environ.get("GEMMA_SESSIONS_STORE")
    if env:
        return Path(env)
    from platformdirs import user_data_dir

    return Path(user_data_dir("gemma-sessions")) / "store"


def _ids_blob(ids) -> bytes:
    return array.array("i", ids).tobytes()


def _blob_ids(blob: bytes) -> tuple[int, ...]:
    a = array.array("i")
    a.frombytes(blob)
    return tuple(a)


class SnapshotWriter:
    """The background KV writer both stores share: turn-end exports and spills under memory pressure, written by one
    thread so that a turn never waits for KV bytes. A subclass writes one snapshot (``_write_snapshot``, which records
    ``_written[sid] = (tokens, hash of tokens)`` for what it wrote) and may veto a write (``_session_exists``)."""

    def __init__(self) -> None:
        self.manager = None
        self._handles: dict[int, object] = {}   # KV handle id -> its Session (for spills)
        self._pending: dict[str, object] = {}   # session id -> KVSnapshot waiting to be written
        # The writer's work, most urgent first: spills (their KV is gone from memory once dropped), then turn-end
        # exports (insurance against a crash), then flush markers, then the stop marker.
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._writer: threading.Thread | None = None
        self.snapshots_written = 0
        self.restored = 0
        self._pending_lock = threading.Lock()
        self._pending_bytes = 0
        self._queued: set[str] = set()  # sessions with an export queued (one each: later turns coalesce)
        self.spills_dropped = 0
        self._written: dict[str, tuple[int, int]] = {}  # session id -> (tokens, their hash) of what is written
        self._deadline: float | None = None  # set by close: snapshots still queued after it are skipped

    def _start_writer(self, engine) -> None:
        engine.on_spill = self._on_spill
        engine.spill_history = self._spill_history
        self._writer = threading.Thread(target=self._write_loop, name="gemma-store-writer", daemon=True)
        self._writer.start()

    def _stop_writer(self, snapshot_all: bool, timeout: float) -> None:
        """Queue a snapshot of every persistent session in memory (``snapshot_all``), write for at most ``timeout``
        seconds, stop the thread."""
        self._deadline = time.monotonic() + timeout
        if self.manager is not None and snapshot_all:
            for s in self.manager.loaded_sessions():
                if s.persistent:
                    self.schedule_snapshot(s)
        if self._writer is not None:
            self._put(3, None)
            self._writer.join(timeout=timeout + 30)
            self._writer = None

    def _write_snapshot(self, sid: str, snap) -> None:
        raise NotImplementedError

    def schedule_snapshot(self, s) -> None:
        with self._pending_lock:
            if s.id in self._queued:
                return  # an export of this session is queued already: it will take the newest KV
            self._queued.add(s.id)
        self._put(1, ("export", s))

    def _on_spill(self, handle, snapshot) -> None:
        """Engine loop thread: an idle session's KV is about to be dropped; keep it and write it to disk (unless
        MAX_PENDING_BYTES of spills already wait: then it is dropped and recomputed when needed)."""
        s = self._handles.get(handle.id)
        if s is None:
            return
        sid = s.id
        with self._pending_lock:
            old = self._pending.get(sid)
            size = snapshot.nbytes() - (old.nbytes() if old is not None else 0)
            if self._pending_bytes + size > MAX_PENDING_BYTES:
                self.spills_dropped += 1
                return
            self._pending[sid] = snapshot
            self._pending_bytes += size
        self._put(0, ("write", sid))

    def _spill_history(self, handle) -> list[int] | None:
        """Engine loop thread: the history a spilled handle's session continues from, so the spill keeps the KV of
        its history's cached prefix (``Engine.export_kv``'s ``tokens``: after a Gemma 4 turn the history drops the
        thoughts the handle's KV followed). Reads the session under its data lock, which no holder keeps across an
        engine call."""
        s = self._handles.get(handle.id)
        return None if s is None else s.token_ids

    def _put(self, priority: int, task) -> None:
        self._queue.put((priority, next(self._order), task))

    def _take_pending(self, sid: str, snap) -> None:
        """Forget a pending spill once written (unless a newer one replaced it meanwhile)."""
        with self._pending_lock:
            if self._pending.get(sid) is snap:
                del self._pending[sid]
                self._pending_bytes -= snap.nbytes()

    def stats(self) -> dict:
        """The background writer's state: spills waiting in memory (and their bytes), exports queued, files
        written, spills dropped because too many waited."""
        with self._pending_lock:
            return {"pending_snapshots": len(self._pending), "pending_bytes": self._pending_bytes,
                    "queued_exports": len(self._queued), "snapshots_written": self.snapshots_written,
                    "spills_dropped": self.spills_dropped}

    def _write_loop(self) -> None:
        while (task := self._queue.get()[2]) is not None:
            kind, value = task
            try:
                if kind == "call":
                    value.set()
                elif self._deadline is not None and time.monotonic() > self._deadline:
                    continue  # closing and out of time: a later turn recomputes this KV
                elif kind == "export":
                    with self._pending_lock:
                        self._queued.discard(value.id)
                    if value.deleted or self._current(value):
                        continue
                    snap = self.manager.engine.export_kv(value.kv, value.token_ids)
                    if snap is not None:
                        self._write_snapshot(value.id, snap)
                else:
                    snap = self._pending.get(value)
                    if snap is not None:
                        self._write_snapshot(value, snap)
                        self._take_pending(value, snap)
            except Exception:  # a failed snapshot costs a recompute, never a turn
                log.exception("writing a KV snapshot failed")

    def _current(self, s) -> bool:
        """Whether the session's file on disk already holds exactly the KV it has in memory."""
        written = self._written.get(s.id)
        if written is None:
            return False
        n = self.manager.engine.kv_tokens(s.kv)
        return written == (n, hash(tuple(s.token_ids[:n])))

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued snapshot is written (tests, shutdown)."""
        if self._writer is None:
            return
        done = threading.Event()
        self._put(2, ("call", done))
        done.wait(timeout)


class Store(SnapshotWriter):
    """A store directory. Pass it to ``SessionManager(engine, store=Store(DIR))`` (or ``store="DIR"``)."""

    shared = False  # one process at a time holds the directory (its lock file)

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False,
                 snapshot_kv: bool = True, compress: bool = False):
        self.path = Path(path) if path is not None else default_store_dir()
        self.readonly = readonly
        self.snapshot_kv = snapshot_kv and not readonly
        self.compress = compress
        self.kv_dir = self.path / "kv"
        self.kv_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = None if readonly else self._take_lock()
        self._db = sqlite3.connect(self.path / "sessions.db", check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db_lock = threading.RLock()
        with self._db_lock:
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
                self._migrate()
            self._db.execute("PRAGMA synchronous=FULL")
        SnapshotWriter.__init__(self)
        if not readonly:
            self._cleanup()

    # ------------------------------------------------------------------------------------------ lifecycle
    def _take_lock(self) -> int:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path} is served by another process (open it with readonly=True to read)")
        return fd

    def _migrate(self) -> None:
        """Stores written before the owner column: move ``_owner`` out of the metadata into it. Then the index that
        pages one owner's listing (``session_page``), which needs that column."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(sessions)")}
        if "owner" not in columns:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
            for sid, metadata in self._db.execute("SELECT id, metadata FROM sessions").fetchall():
                meta = json.loads(metadata or "{}")
                owner = meta.pop("_owner", "")
                self._db.execute("UPDATE sessions SET owner=?, metadata=? WHERE id=?",
                                 (owner, json.dumps(meta), sid))
            self._db.execute("COMMIT")
        self._db.execute("CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, created_at, id)")

    def _cleanup(self) -> None:
        """Remove temporary files and snapshots whose session is gone (left by a crash)."""
        with self._db_lock:
            ids = {r[0] for r in self._db.execute("SELECT id FROM sessions")}
            self._db.execute("DELETE FROM snapshots WHERE session_id NOT IN (SELECT id FROM sessions)")
        for f in self.kv_dir.iterdir():
            if f.name.startswith(".") or (f.suffix == ".safetensors" and f.stem not in ids):
                f.unlink(missing_ok=True)

    def attach(self, manager) -> None:
        self.manager = manager
        engine = manager.engine
        self._model_fp = engine.model.fingerprint
        self._tok_fp = engine.model.tokenizer.fingerprint
        if self.snapshot_kv:
            self._start_writer(engine)

    def close(self, snapshot_all: bool = True, timeout: float = CLOSE_SNAPSHOT_S) -> None:
        """Snapshot the KV of sessions in memory whose file is stale, for at most ``timeout`` seconds (what is left
        costs a recompute at the next turn, never a turn: turns are committed as they complete), then close."""
        self._stop_writer(snapshot_all and self.snapshot_kv, timeout)
        with self._db_lock:
            self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------------------------------ writes
    def _write(self, sql: str, rows) -> None:
        if self.readonly:
            raise StoreError("the store is open read-only")
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement, args in rows if sql is None else [(sql, rows)]:
                    self._db.execute(statement, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def session_created(self, s) -> None:
        now = time.time()
        rows = [("INSERT OR REPLACE INTO sessions(id, created_at, updated_at, system, sampling, context_policy, "
                 "max_context, metadata, dropped_turns, owner) VALUES (?,?,?,?,?,?,?,?,?,?)",
                 (s.id, s.created_at, now, s.system, json.dumps(s.sampling.to_dict()), s.context_policy,
                  s.max_context, json.dumps(s.metadata), s.conversation.dropped_turns, s.owner))]
        rows += self._message_rows(s.id, s.conversation.messages, 0)
        self._write(None, rows)
        self._handles[s.kv.id] = s

    def _message_rows(self, sid: str, messages: list[Message], start: int) -> list[tuple]:
        return [("INSERT OR REPLACE INTO messages VALUES (?,?,?,?,?,?,?)",
                 (sid, start + i, m.role, m.text, m.created_at, _ids_blob(m.token_ids), m.id))
                for i, m in enumerate(messages)]

    def history_changed(self, s, messages: list[Message]) -> None:
        """Rewrite a session's messages (items added or removed outside a turn) before memory adopts them."""
        self._write(None, [("UPDATE sessions SET updated_at=? WHERE id=?", (time.time(), s.id)),
                           ("DELETE FROM messages WHERE session_id=?", (s.id,))]
                    + self._message_rows(s.id, messages, 0))

    def metadata_changed(self, s, metadata: dict) -> None:
        self._write("UPDATE sessions SET updated_at=?, metadata=? WHERE id=?",
                    (time.time(), json.dumps(metadata), s.id))

    def turn_completed(self, s, messages: list[Message], dropped: int, stats, *, idempotency_key: str | None = None,
                       reply: dict | None = None) -> None:
        """Commit a completed turn's history (blocking, fsynced) before memory adopts it, then queue a KV
        snapshot in the background. ``messages`` is the whole history after the turn. (One process owns this store:
        no version to fence, and idempotency keys are not kept; see store_protocol.)"""
        with s._data_lock:
            total_dropped = s.conversation.dropped_turns + dropped
            n_turns = len(s.turn_stats)
        with self._db_lock:
            stored = [r[0] for r in self._db.execute("SELECT msg_id FROM messages WHERE session_id=? ORDER BY idx",
                                                     (s.id,))]
        rows = [("UPDATE sessions SET updated_at=?, dropped_turns=? WHERE id=?", (time.time(), total_dropped, s.id))]
        if stored == [m.id for m in messages[:-2]]:  # a plain append: two new rows
            rows += self._message_rows(s.id, messages[-2:], len(messages) - 2)
        else:  # older turns were dropped (or the rows differ): rewrite the history in order
            rows += [("DELETE FROM messages WHERE session_id=?", (s.id,))] + self._message_rows(s.id, messages, 0)
        rows.append(("INSERT OR REPLACE INTO turns VALUES (?,?,?)", (s.id, n_turns, json.dumps(stats.__dict__))))
        self._write(None, rows)
        if self.snapshot_kv:
            self.schedule_snapshot(s)

    def session_deleted(self, s) -> None:
        self.delete_session(s.id)
        self._handles.pop(s.kv.id, None)

    def delete_session(self, sid: str) -> None:
        """Remove a session's rows and snapshot file (also usable offline, by id)."""
        with self._pending_lock:
            snap = self._pending.pop(sid, None)
            self._pending_bytes -= snap.nbytes() if snap is not None else 0
        self._write(None, [("DELETE FROM messages WHERE session_id=?", (sid,)),
                           ("DELETE FROM turns WHERE session_id=?", (sid,)),
                           ("DELETE FROM snapshots WHERE session_id=?", (sid,)),
                           ("DELETE FROM responses WHERE session_id=?", (sid,)),
                           ("DELETE FROM sessions WHERE id=?", (sid,))])
        self._snapshot_path(sid).unlink(missing_ok=True)
        self._written.pop(sid, None)

    # ------------------------------------------------------------------------------------------ snapshots
    def _snapshot_path(self, sid: str) -> Path:
        return self.kv_dir / f"{sid}.safetensors"

    def _write_snapshot(self, sid: str, snap) -> None:
        with self._db_lock:
            if self._db.execute("SELECT 1 FROM sessions WHERE id=?", (sid,)).fetchone() is None:
                return  # deleted meanwhile
        data = encode_session(snap, model_fingerprint=self._model_fp, tokenizer_fingerprint=self._tok_fp,
                              session={"id": sid})
        n = write_session_file(self._snapshot_path(sid), data, compress=self.compress)
        self._write("INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?,?)",
                    (sid, snap.num_tokens, n, self._model_fp, time.time()))
        self.snapshots_written += 1
        self._written[sid] = (snap.num_tokens, hash(tuple(snap.tokens)))

    def sync(self, s, idempotency_key: str | None = None) -> dict | None:
        """Nothing to do: this process is the only writer, so its sessions in memory are never stale."""
        return None

    def restore_kv(self, s) -> str:
        """Before a turn: give the session its KV back if it has none in memory. Returns where it came from:
        "memory" (it was there), "snapshot" (restored from disk or a pending spill), or "recompute"."""
        engine = self.manager.engine
        if engine.kv_tokens(s.kv) > 0:
            return "memory"
        snap = self._pending.get(s.id)
        if snap is None and self._snapshot_path(s.id).exists():
            try:
                _, snap = read_session_file(self._snapshot_path(s.id), model_fingerprint=self._model_fp,
                                            tokenizer_fingerprint=self._tok_fp, trusted=True)
            except SessionFileError as exc:
                log.warning("snapshot refused, recomputing", extra={"session": s.id, "reason": str(exc)})
                snap = None
        # the part of the snapshot that is still history: all of it, or (Gemma 4, whose history drops the thoughts
        # its KV holds) the KV before the last turn's thoughts
        snap = None if snap is None else prefix_snapshot(snap, s.token_ids)
        if snap is None:
            return "recompute"
        try:
            if engine.import_kv(s.kv, snap):
                self.restored += 1
                return "snapshot"
        except (GemmaSessionsError, ValueError) as exc:  # refused (another layout): recompute, never fail
            log.warning("snapshot refused, recomputing", extra={"session": s.id, "reason": str(exc)})
        return "recompute"

    # ------------------------------------------------------------------------------------------ reads
    def session_ids(self, owner: str | None = None) -> list[str]:
        with self._db_lock:
            if owner is None:
                return [r[0] for r in self._db.execute("SELECT id FROM sessions ORDER BY created_at")]
            return [r[0] for r in self._db.execute("SELECT id FROM sessions WHERE owner=? ORDER BY created_at, id",
                                                   (owner,))]

    def session_page(self, owner: str, *, limit: int, after: str | None = None, order: str = "asc") -> IdPage:
        """One page of ``owner``'s ids: a range of the index on (owner, created_at, id), ``limit + 1`` rows read (the
        extra one only says whether more follow)."""
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = "owner=?", [owner]
        with self._db_lock:
            if after is not None:
                row = self._db.execute("SELECT created_at FROM sessions WHERE id=? AND owner=?",
                                       (after, owner)).fetchone()
                if row is None:
                    raise InvalidRequestError(UNKNOWN_CURSOR)
                where, args = f"owner=? AND (created_at, id) {op} (?, ?)", [owner, row[0], after]
            ids = [r[0] for r in self._db.execute(
                f"SELECT id FROM sessions WHERE {where} ORDER BY created_at {direction}, id {direction} LIMIT ?",
                (*args, limit + 1))]
        return IdPage(ids=tuple(ids[:limit]), has_more=len(ids) > limit)

    def load_session(self, manager, sid: str):
        """Rebuild a Session (history, settings, stats) from the database; None if unknown."""
        from .session import Session, TurnStats

        with self._db_lock:
            row = self._db.execute("SELECT created_at, system, sampling, context_policy, max_context, metadata, "
                                   "dropped_turns, owner FROM sessions WHERE id=?", (sid,)).fetchone()
            if row is None:
                return None
            msgs = self._db.execute("SELECT role, text, created_at, token_ids, msg_id FROM messages WHERE session_id=? "
                                    "ORDER BY idx", (sid,)).fetchall()
            turns = self._db.execute("SELECT stats FROM turns WHERE session_id=? ORDER BY idx", (sid,)).fetchall()
        created, system, sampling, policy, max_ctx, metadata, dropped, owner = row
        s = Session(manager, system=system, sampling=SamplingParams.from_dict(json.loads(sampling)),
                    context_policy=policy, max_context=max_ctx, session_id=sid, metadata=json.loads(metadata),
                    created_at=created, owner=owner or "")
        s.conversation.messages = [Message(role=r, text=t, created_at=c, token_ids=_blob_ids(b), id=i)
                                   for r, t, c, b, i in msgs]
        s.conversation.dropped_turns = dropped
        s.turn_stats = [TurnStats(**json.loads(t[0])) for t in turns]
        if not self.readonly:
            self._handles[s.kv.id] = s
        return s

    def summaries(self) -> list[dict]:
        """One row per session without loading any model: id, owner, times, message and token counts, system
        prompt."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT s.id, s.created_at, s.updated_at, s.system, COUNT(m.idx), COALESCE(SUM(LENGTH(m.token_ids)), 0), "
                "s.owner FROM sessions s LEFT JOIN messages m ON m.session_id = s.id GROUP BY s.id ORDER BY s.created_at"
            ).fetchall()
        return [{"id": r[0], "owner": r[6] or "", "created_at": r[1], "updated_at": r[2], "system": r[3],
                 "messages": r[4], "tokens": r[5] // 4 + 1} for r in rows]

    def messages(self, sid: str) -> list[Message] | None:
        with self._db_lock:
            if self._db.execute("SELECT 1 FROM sessions WHERE id=?", (sid,)).fetchone() is None:
                return None
            rows = self._db.execute("SELECT role, text, created_at, token_ids, msg_id FROM messages "
                                    "WHERE session_id=? ORDER BY idx", (sid,)).fetchall()
        return [Message(role=r, text=t, created_at=c, token_ids=_blob_ids(b), id=i) for r, t, c, b, i in rows]

    # ------------------------------------------------------------------------------------------ responses
    def put_response(self, rid: str, owner: str, sid: str, n_messages: int, body: str) -> None:
        """Keep a response (its JSON body) for ``previous_response_id``; the oldest beyond MAX_RESPONSES go."""
        self._write(None, [("INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?)",
                            (rid, owner, sid, n_messages, body, time.time())),
                           ("DELETE FROM responses WHERE rowid <= (SELECT MAX(rowid) FROM responses) - ?",
                            (MAX_RESPONSES,))])

    def get_response(self, rid: str) -> dict | None:
        """{"owner", "session", "n", "body"} of a kept response, or None."""
        with self._db_lock:
            row = self._db.execute("SELECT owner, session_id, n_messages, body FROM responses WHERE id=?",
                                   (rid,)).fetchone()
        if row is None:
            return None
        return {"owner": row[0], "session": row[1], "n": row[2], "body": json.loads(row[3])}

    def delete_response(self, rid: str) -> bool:
        if self.readonly:
            raise StoreError("the store is open read-only")
        with self._db_lock:
            return self._db.execute("DELETE FROM responses WHERE id=?", (rid,)).rowcount > 0

    def snapshot_info(self, sid: str) -> dict | None:
        with self._db_lock:
            row = self._db.execute("SELECT tokens, bytes, model_fingerprint, created_at FROM snapshots "
                                   "WHERE session_id=?", (sid,)).fetchone()
        return None if row is None else dict(zip(("tokens", "bytes", "model_fingerprint", "created_at"), row))
