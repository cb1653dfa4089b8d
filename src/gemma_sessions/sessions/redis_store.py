"""RedisStore: sessions, their turn log, responses and KV blobs in Redis, shared by every replica.

Contract (see store_protocol for the interface both stores implement):
- **The truth is the log**: a session's settings, messages (exact token ids) and turn stats, written with no TTL. A
  turn is committed by one Lua script (atomic) before memory adopts it: it appends only if the session's stored
  ``version`` is the one this replica loaded (compare-and-set on a fencing token) and the request's idempotency key
  was not committed before; then it bumps the version. So two replicas never both append turn N (the loser gets
  StaleSessionError and nothing changed), and a retried request (same key) never appends twice: its retry is
  answered with the reply recorded under the key (``sync``).
- **Stale replicas reload**: ``sync``, at the start of every turn (one round trip: the version and the key), reloads
  a session whose stored version moved on: history, stats and metadata from the log; then ``restore_kv`` takes KV
  from the longest run of shared blobs when they cover more than what memory still holds, and the engine prefills
  only the rest. KV is matched by token ids, so stale KV is never used for a changed history.
- **KV blobs are a content-addressed cache**: one key per KV page, named by the prefix hash chain of its block
  (``cache.blocks.hash_block_tokens``; a partial last block by its tokens too) and the KV layer group, scoped by the
  model fingerprint, KV layout and dtype. Sessions with the same prefix (a shared system prompt) share its blobs. Only
  blobs carry a TTL (``kv_ttl_s``), so a Redis with ``maxmemory-policy volatile-lru`` (or ``volatile-ttl``) evicts KV
  and never the log; a missing blob costs a recompute. KV a session must keep private (an imported session file) is
  never written to the shared keyspace. Blobs are written by the background writer (turn end, spills under memory
  pressure, shutdown), never inside a turn.
- **Untrusted reads**: everything read back is checked as a session file is: JSON only (never pickle), every field
  validated (``manager._session_from_dict``), lists and strings bounded server-side before they travel
  (``max_read_bytes``), KV pages of exactly the expected size with a BLAKE2b digest over key and bytes, finite values
  within ``sessionfile.MAX_ABS_VALUE``, and the shapes checked by the engine before import.
- **Failure**: Redis unreachable at start raises StoreUnavailableError naming the URL (password hidden). Mid-run,
  each command is retried on a connection error (``retries`` times with backoff; scripts are safe to resend: the
  commit carries a nonce, so a resent commit that had applied reports success, not a duplicate), then
  StoreUnavailableError (HTTP 503): memory unchanged for that request. A commit whose reply was lost may have
  applied: the next ``sync`` sees the new version and reloads it, and a retry with the same idempotency key gets the
  recorded reply. The client reconnects by itself when Redis is back.
- **Durability** is Redis's: run it with ``appendonly yes`` (``appendfsync always`` for every turn on disk before it
  is reported; ``everysec`` may lose the last second on a power loss). A warning is logged at start without AOF or
  with an ``allkeys-*`` eviction policy (which could evict the log).

Key layout (``prefix`` default ``gs:``; one Redis database, not Redis Cluster: scripts touch keys they compute)::

    gs:sessions              ZSET   session id -> created_at (listing order)
    gs:o:{owner}             ZSET   that owner's session ids -> created_at (one key's listing, paged by rank)
    gs:owners_indexed        STRING set once every session is in its owner's gs:o:{owner} (older stores are indexed
                                    at the first writable open; every replica must run this version from then on,
                                    since an older one would create sessions its owner's index lacks)
    gs:s:{sid}               HASH   settings (JSON values), owner, version, dropped_turns, n_tokens, kv (hint: tokens
                                    of the last KV written), creator (nonce of the create)
    gs:s:{sid}:msgs          LIST   one JSON message per item ({"id", "role", "text", "created_at", "token_ids"})
    gs:s:{sid}:turns         LIST   one JSON TurnStats per completed turn
    gs:s:{sid}:idem          HASH   idempotency key -> {"v": version it made, "nonce", "reply"} (the newest
                                    MAX_IDEMPOTENCY_KEYS, in commit order in gs:s:{sid}:idemq)
    gs:s:{sid}:resp          SET    the session's response ids
    gs:responses             ZSET   response id -> time (the newest ``max_responses`` kept)
    gs:r:{rid}               STRING JSON {"owner", "session", "n", "body"}
    gs:kv:{scope}:{hash}:{g} STRING one KV page of group g: 16-byte digest + raw page bytes (TTL)
    gs:kvs:{scope}:{hash}    STRING a recurrent model's state (session-file bytes) for a token prefix (TTL)

Example::

    store = RedisStore("redis://127.0.0.1:6379/0")
    manager = gs.SessionManager(engine, store=store)      # or store="redis://127.0.0.1:6379/0"
    s = manager.create(system="You are terse.")
    s.send("Hello", idempotency_key=request_id)
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence

import torch

from ..cache.blocks import hash_block_tokens, hash_token_blocks
from ..cache.kv import KVSnapshot, PagedKVCache
from ..config import SLIDING
from ..errors import (GemmaSessionsError, InvalidRequestError, SessionFileError, SessionNotFoundError,
                      StaleSessionError, StoreError, StoreUnavailableError)
from .conversation import Message
from .sessionfile import MAX_ABS_VALUE, decode_session, encode_session
from .store import CLOSE_SNAPSHOT_S, MAX_RESPONSES, SnapshotWriter
from .store_protocol import UNKNOWN_CURSOR, IdPage

log = logging.getLogger("gemma_sessions.redis_store")

# Idempotency keys remembered per session (a retry comes within seconds; the oldest beyond this are forgotten).
MAX_IDEMPOTENCY_KEYS = 100
# Bytes one read may bring back (a session's log, a response): checked in Redis before anything travels.
MAX_READ_BYTES = 256 << 20
# KV bytes one restore may fetch (and hold in memory at once).
MAX_RESTORE_BYTES = 1 << 30
# Pages fetched per round trip.
_FETCH_BATCH = 64
_DIGEST = 16
# Keys known to be written recently (skip rewriting them), per process.
_KNOWN_KEYS = 200_000
# Sessions indexed per round trip when a store from before the owners' index is opened.
_INDEX_BATCH = 500

# KEYS: meta, msgs, turns, sessions, the owner's index. ARGV: sid, created_at, nonce, meta JSON, n turns, turns...,
#       messages...
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'creator') == ARGV[3] then return 'ok' end
  return 'exists'
end
local meta = cjson.decode(ARGV[4])
for k, v in pairs(meta) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'version', '0', 'creator', ARGV[3])
redis.call('DEL', KEYS[2], KEYS[3])
local n_turns = tonumber(ARGV[5])
for i = 6, 5 + n_turns do redis.call('RPUSH', KEYS[3], ARGV[i]) end
for i = 6 + n_turns, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return 'ok'
"""

# KEYS: meta, msgs, turns, idem, idemq
# ARGV: expected version, idempotency key ('' for none), nonce, mode (append | rewrite | history | metadata),
#       updated_at, dropped_turns, payload (the key's record, or the metadata JSON), stats JSON, max keys, n_tokens,
#       messages...
_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', -1} end
local key = ARGV[2]
if key ~= '' then
  local rec = redis.call('HGET', KEYS[4], key)
  if rec then
    local r = cjson.decode(rec)
    if r['nonce'] == ARGV[3] then return {'ok', r['v']} end
    return {'dup', r['v']}
  end
end
local v = tonumber(redis.call('HGET', KEYS[1], 'version'))
if v ~= tonumber(ARGV[1]) then return {'stale', v} end
local mode = ARGV[4]
if mode == 'metadata' then
  redis.call('HSET', KEYS[1], 'metadata', ARGV[7])
else
  if mode ~= 'append' then redis.call('DEL', KEYS[2]) end
  for i = 11, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
  redis.call('HSET', KEYS[1], 'n_tokens', ARGV[10])
  if mode ~= 'history' then
    redis.call('RPUSH', KEYS[3], ARGV[8])
    redis.call('HSET', KEYS[1], 'dropped_turns', ARGV[6])
  end
end
redis.call('HSET', KEYS[1], 'version', tostring(v + 1), 'updated_at', ARGV[5])
if key ~= '' then
  redis.call('HSET', KEYS[4], key, ARGV[7])
  redis.call('RPUSH', KEYS[5], key)
  while redis.call('LLEN', KEYS[5]) > tonumber(ARGV[9]) do
    redis.call('HDEL', KEYS[4], redis.call('LPOP', KEYS[5]))
  end
end
return {'ok', v + 1}
"""

# KEYS: meta, msgs, turns. ARGV: max bytes. Returns false (no session), 'toolarge', or {meta, msgs, turns}.
_LOAD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local meta = redis.call('HGETALL', KEYS[1])
local msgs = redis.call('LRANGE', KEYS[2], 0, -1)
local turns = redis.call('LRANGE', KEYS[3], 0, -1)
local total = 0
for _, list in ipairs({meta, msgs, turns}) do
  for _, item in ipairs(list) do total = total + #item end
end
if total > tonumber(ARGV[1]) then return 'toolarge' end
return {meta, msgs, turns}
"""

# KEYS: string keys. ARGV: max bytes each. Each value, or nil when missing or larger.
_BOUNDED_GET = """
local out = {}
for i, k in ipairs(KEYS) do
  local n = redis.call('STRLEN', k)
  if n > 0 and n <= tonumber(ARGV[1]) then out[i] = redis.call('GET', k) else out[i] = false end
end
return out
"""

# KEYS: meta. ARGV: the KV hint (JSON), its session version, its tokens. Only on a session that still exists (never
# re-creates a deleted one), and never over a hint of a newer version (a stale replica's late write) or of more tokens
# of the same version.
_SET_HINT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = redis.call('HGET', KEYS[1], 'kv')
if old then
  local ok, d = pcall(cjson.decode, old)
  if ok and type(d) == 'table' then
    local v, n = tonumber(d['version']) or -1, tonumber(d['tokens']) or -1
    local nv, nn = tonumber(ARGV[2]), tonumber(ARGV[3])
    if v > nv or (v == nv and n > nn) then return 0 end
  end
end
redis.call('HSET', KEYS[1], 'kv', ARGV[1])
return 1
"""

# KEYS: meta, msgs, turns, idem, idemq, resp, sessions, responses. ARGV: sid, prefix.
_DELETE = """
redis.call('ZREM', ARGV[2] .. 'o:' .. (redis.call('HGET', KEYS[1], 'owner') or ''), ARGV[1])
for _, r in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  redis.call('DEL', ARGV[2] .. 'r:' .. r)
  redis.call('ZREM', KEYS[8], r)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[1])
return 1
"""

# KEYS: r:{rid}, responses, s:{sid}:resp, s:{sid}. ARGV: rid, body, time, max responses, prefix.
_PUT_RESPONSE = """
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('SADD', KEYS[3], ARGV[1]) end
local n = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if n > 0 then
  for _, r in ipairs(redis.call('ZRANGE', KEYS[2], 0, n - 1)) do redis.call('DEL', ARGV[5] .. 'r:' .. r) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - 1)
end
return 1
"""

# KEYS: r:{rid}, responses. ARGV: rid, prefix. The response's session set is found through its own record.
_DELETE_RESPONSE = """
local doc = redis.call('GET', KEYS[1])
if not doc then return 0 end
local ok, d = pcall(cjson.decode, doc)
if ok and type(d) == 'table' and type(d['session']) == 'string' then
  redis.call('SREM', ARGV[2] .. 's:' .. d['session'] .. ':resp', ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: the owner's index. ARGV: how many, order (asc | desc), and the cursor when there is one. The ids after the
# cursor (from the start without one) in (created_at, id) order (a ZSET orders equal scores by member), or false when
# the cursor is not in this index.
_PAGE = """
local rank, range = 'ZRANK', 'ZRANGE'
if ARGV[2] == 'desc' then rank, range = 'ZREVRANK', 'ZREVRANGE' end
local start = 0
if ARGV[3] then
  local r = redis.call(rank, KEYS[1], ARGV[3])
  if not r then return false end
  start = r + 1
end
return redis.call(range, KEYS[1], start, start + tonumber(ARGV[1]) - 1)
"""

# ARGV: prefix, session ids. Adds each session that still exists to its owner's index (an older store's sessions).
_INDEX_OWNERS = """
for i = 2, #ARGV do
  local d = redis.call('HMGET', ARGV[1] .. 's:' .. ARGV[i], 'created_at', 'owner')
  if d[1] then redis.call('ZADD', ARGV[1] .. 'o:' .. (d[2] or ''), d[1], ARGV[i]) end
end
return 1
"""

_META_FIELDS = ("created_at", "updated_at", "system", "sampling", "context_policy", "max_context", "metadata",
                "dropped_turns", "owner", "version", "n_tokens", "kv")
_FINISH = ("stop", "length", "cancelled")


def redact_url(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisStore(SnapshotWriter):
    """Sessions in Redis, shared by replicas (see the module docstring).

    Args:
        url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket).
        prefix: prepended to every key (several deployments in one database).
        kv_ttl_s: seconds a KV blob lives after it was last written or refreshed (the log never expires).
        snapshot_kv: write KV blobs at all (False: history only; other replicas recompute).
        readonly: refuse writes (listing and reading).
        retries: attempts again after a connection error or timeout, with exponential backoff, before a request
            fails with StoreUnavailableError.
        socket_timeout_s / connect_timeout_s: per command and per connect.
        max_responses: responses kept for ``previous_response_id`` (the oldest go).
        max_read_bytes: largest session log or response one read brings back.
        max_restore_bytes: most KV bytes one restore fetches.
    """

    shared = True

    def __init__(self, url: str, *, prefix: str = "gs:", kv_ttl_s: int = 7 * 24 * 3600, snapshot_kv: bool = True,
                 readonly: bool = False, retries: int = 3, socket_timeout_s: float = 5.0,
                 connect_timeout_s: float = 2.0, max_responses: int = MAX_RESPONSES,
                 max_read_bytes: int = MAX_READ_BYTES, max_restore_bytes: int = MAX_RESTORE_BYTES):
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        SnapshotWriter.__init__(self)
        self.url = url
        self.path = redact_url(url)
        self.prefix = prefix
        self.kv_ttl_s = int(kv_ttl_s)
        self.readonly = readonly
        self.snapshot_kv = snapshot_kv and not readonly
        self.max_responses = max_responses
        self.max_read_bytes = max_read_bytes
        self.max_restore_bytes = max_restore_bytes
        self._errors_from = (redis.ConnectionError, redis.TimeoutError)
        self._redis_error = redis.RedisError
        try:
            self._r = redis.Redis.from_url(
                url, socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError], health_check_interval=30)
        except ValueError as exc:
            raise StoreError(f"not a Redis URL: {self.path} ({exc})") from exc
        with self._errors("connecting"):
            self._r.ping()
        self._check_config()
        self._scripts = {name: self._r.register_script(src) for name, src in (
            ("create", _CREATE), ("commit", _COMMIT), ("load", _LOAD), ("get", _BOUNDED_GET),
            ("set_hint", _SET_HINT), ("delete", _DELETE), ("put_response", _PUT_RESPONSE), ("page", _PAGE),
            ("delete_response", _DELETE_RESPONSE),
            ("index_owners", _INDEX_OWNERS))}
        self._owners_indexed = self._index_owners()
        self._hints: dict[str, int] = {}     # session id -> tokens of KV its last writer put in Redis
        self._versions: dict[str, int] = {}  # session id -> the version memory holds (for the KV hints written)
        self._valid: dict[str, int] = {}     # session id -> tokens of memory's KV still history after a reload
        self._known: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # blob key -> written at
        self._known_lock = threading.Lock()
        self._scope = ""
        self.blobs_written = 0
        self.blobs_fetched = 0
        self._model_fp = self._tok_fp = ""

    # ------------------------------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Redis's errors as ours: unreachable (after the client's retries), read-only, out of memory or loading ->
        StoreUnavailableError (503, retry later); anything else -> StoreError."""
        try:
            yield
        except self._errors_from as exc:
            raise StoreUnavailableError(f"Redis at {self.path} is unavailable ({what}: {exc})") from exc
        except self._redis_error as exc:
            text = str(exc)
            if text.startswith(("OOM", "READONLY", "LOADING", "MASTERDOWN", "BUSY")):
                raise StoreUnavailableError(f"Redis at {self.path} refused {what} ({text})") from exc
            raise StoreError(f"Redis at {self.path}: {what} failed ({text})") from exc

    def _check_config(self) -> None:
        """Warn about settings that lose turns (no AOF) or evict the log (an allkeys-* policy)."""
        try:
            conf = self._r.config_get("appendonly")
            conf.update(self._r.config_get("maxmemory-policy"))
        except self._redis_error:  # CONFIG may be renamed or disabled (managed Redis): nothing to check
            return
        get = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
               for k, v in conf.items()}
        if get.get("appendonly") == "no":
            log.warning("Redis at %s runs without AOF (appendonly no): a Redis restart loses turns since its last "
                        "RDB save", self.path)
        if str(get.get("maxmemory-policy", "")).startswith("allkeys"):
            log.warning("Redis at %s evicts any key under memory pressure (%s): use volatile-lru so only KV blobs "
                        "(with a TTL) go, never the turn log", self.path, get["maxmemory-policy"])

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _session_keys(self, sid: str) -> list[str]:
        s = self._k("s", sid)
        return [s, s + ":msgs", s + ":turns", s + ":idem", s + ":idemq", s + ":resp"]

    def _index_owners(self) -> bool:
        """Whether every session is in its owner's index; a writable store from before that index builds it first
        (ZSCAN: every session present throughout is seen; the script skips one deleted meanwhile, and a session
        created meanwhile indexed itself). A read-only one cannot: there ``session_ids(owner)`` scans every session
        and ``session_page`` refuses."""
        marker = self._k("owners_indexed")
        with self._errors("indexing sessions by owner"):
            if self._r.exists(marker):
                return True
            if self.readonly:
                return False
            batch = []
            for sid, _ in self._r.zscan_iter(self._k("sessions"), count=_INDEX_BATCH):
                batch.append(sid)
                if len(batch) == _INDEX_BATCH:
                    self._scripts["index_owners"](args=[self.prefix, *batch])
                    batch.clear()
            if batch:
                self._scripts["index_owners"](args=[self.prefix, *batch])
            self._r.set(marker, "1")
        return True

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError("the store is open read-only")

    # ------------------------------------------------------------------------------------------ lifecycle
    def attach(self, manager) -> None:
        self.manager = manager
        engine = manager.engine
        self._model_fp = engine.model.fingerprint
        self._tok_fp = engine.model.tokenizer.fingerprint
        cache = engine.cache
        layout = cache.layout.fingerprint if isinstance(cache, PagedKVCache) else "state"
        dtype = str(getattr(cache, "dtype", "native"))
        self._scope = hashlib.sha256(f"{self._model_fp}|{self._tok_fp}|{layout}|{dtype}".encode()).hexdigest()[:24]
        if self.snapshot_kv:
            self._start_writer(engine)

    def close(self, snapshot_all: bool = True, timeout: float = CLOSE_SNAPSHOT_S) -> None:
        """Write the KV of sessions in memory whose blobs are stale (at most ``timeout`` seconds), then disconnect."""
        self._stop_writer(snapshot_all and self.snapshot_kv, timeout)
        self._r.close()

    # ------------------------------------------------------------------------------------------ writes
    def session_created(self, s) -> None:
        self._writable()
        with s._data_lock:
            messages = list(s.conversation.messages)
            meta = {"created_at": repr(float(s.created_at)), "updated_at": repr(time.time()),
                    "system": json.dumps(s.system), "sampling": json.dumps(s.sampling.to_dict()),
                    "context_policy": s.context_policy, "max_context": json.dumps(s.max_context),
                    "metadata": json.dumps(s.metadata), "dropped_turns": str(s.conversation.dropped_turns),
                    "owner": s.owner, "n_tokens": str(sum(m.token_count for m in messages))}
            turns = [json.dumps(t.__dict__) for t in s.turn_stats]  # a fork's or an import's
        keys = self._session_keys(s.id)
        with self._errors("creating a session"):
            status = self._scripts["create"](
                keys=[keys[0], keys[1], keys[2], self._k("sessions"), self._k("o", s.owner)],
                args=[s.id, repr(float(s.created_at)), uuid.uuid4().hex, json.dumps(meta), len(turns), *turns,
                      *[json.dumps(m.to_dict()) for m in messages]])
        if status == b"exists":
            raise InvalidRequestError(f"session {s.id} already exists")
        s.store_version = self._versions[s.id] = 0
        self._handles[s.kv.id] = s

    def _commit(self, s, mode: str, messages: list[Message], *, key: str = "", payload: str = "", stats: str = "",
                dropped: int = 0) -> None:
        """One fenced write (see _COMMIT); adopts the new version into ``s.store_version`` on success."""
        self._writable()
        with s._data_lock:
            expected = s.store_version
            total_dropped = s.conversation.dropped_turns + dropped
        keys = self._session_keys(s.id)[:5]
        nonce = uuid.uuid4().hex
        if key:
            payload = json.dumps({"v": expected + 1, "nonce": nonce, "reply": json.loads(payload)})
        n_tokens = sum(m.token_count for m in messages) if mode != "metadata" else 0
        items = messages[-2:] if mode == "append" else messages if mode != "metadata" else []
        with self._errors("committing"):
            status, version = self._scripts["commit"](
                keys=keys, args=[expected, key, nonce, mode, repr(time.time()), total_dropped, payload, stats,
                                 MAX_IDEMPOTENCY_KEYS, n_tokens, *[json.dumps(m.to_dict()) for m in items]])
        if status == b"gone":
            raise SessionNotFoundError(f"no session {s.id!r} (deleted through another replica)")
        if status == b"stale":
            raise StaleSessionError(f"session {s.id} is at version {version} in the store, this replica held "
                                    f"{expected}: another replica wrote to it first; nothing was written (retry)")
        if status == b"dup":
            raise StaleSessionError(f"request {key!r} was committed to session {s.id} by another attempt; nothing "
                                    "was written (a retry gets the recorded reply)")
        s.store_version = self._versions[s.id] = int(version)

    def turn_completed(self, s, messages: list[Message], dropped: int, stats, *, idempotency_key: str | None = None,
                       reply: dict | None = None) -> None:
        """Commit a turn (fenced on the version this replica holds, once per idempotency key), then queue its KV."""
        with s._data_lock:
            current = [m.id for m in s.conversation.messages]
        append = dropped == 0 and [m.id for m in messages[:-2]] == current
        self._commit(s, "append" if append else "rewrite", messages, key=idempotency_key or "",
                     payload=json.dumps(reply if reply is not None else {}), stats=json.dumps(stats.__dict__),
                     dropped=dropped)
        if self.snapshot_kv:
            self.schedule_snapshot(s)

    def history_changed(self, s, messages: list[Message]) -> None:
        self._commit(s, "history", messages)

    def metadata_changed(self, s, metadata: dict) -> None:
        self._commit(s, "metadata", [], payload=json.dumps(metadata))

    def session_deleted(self, s) -> None:
        self.delete_session(s.id)
        self._handles.pop(s.kv.id, None)

    def delete_session(self, sid: str) -> None:
        """Remove a session's log, settings, keys and responses (KV blobs are shared by content and expire)."""
        self._writable()
        with self._errors("deleting a session"):
            self._scripts["delete"](keys=[*self._session_keys(sid), self._k("sessions"), self._k("responses")],
                                    args=[sid, self.prefix])
        with self._pending_lock:
            snap = self._pending.pop(sid, None)
            self._pending_bytes -= snap.nbytes() if snap is not None else 0
        self._written.pop(sid, None)
        self._hints.pop(sid, None)
        self._valid.pop(sid, None)
        self._versions.pop(sid, None)

    # ------------------------------------------------------------------------------------------ reads
    def _load(self, sid: str) -> tuple[dict, list[bytes], list[bytes]] | None:
        with self._errors("reading a session"):
            out = self._scripts["load"](keys=self._session_keys(sid)[:3], args=[self.max_read_bytes])
        if out is None:
            return None
        if out == b"toolarge":
            raise StoreError(f"session {sid} in Redis is over {self.max_read_bytes} bytes; refused")
        flat, msgs, turns = out
        meta = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        return meta, msgs, turns

    def _session_dict(self, sid: str, meta: dict, msgs: list[bytes], turns: list[bytes]) -> dict:
        """The session-file form of a stored session (validated by ``_session_from_dict`` afterwards)."""
        try:
            return {"id": sid, "created_at": float(meta["created_at"]), "system": json.loads(meta["system"]),
                    "sampling": json.loads(meta["sampling"]), "context_policy": meta["context_policy"].decode(),
                    "max_context": json.loads(meta["max_context"]), "metadata": json.loads(meta["metadata"]),
                    "dropped_turns": int(meta["dropped_turns"]), "messages": [json.loads(m) for m in msgs],
                    "turn_stats": [json.loads(t) for t in turns]}
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise SessionFileError(f"session {sid} in Redis is malformed ({type(exc).__name__}: {exc})") from exc

    def _build(self, manager, sid: str, loaded) -> tuple[object, int, int]:
        """(a validated Session, its version, the KV hint) from ``_load``'s output."""
        from .manager import _session_from_dict

        meta, msgs, turns = loaded
        d = self._session_dict(sid, meta, msgs, turns)
        try:
            owner = meta.get("owner", b"").decode()
            version = int(meta["version"])
            hint = self._hint(meta.get("kv"))
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise SessionFileError(f"session {sid} in Redis is malformed ({exc})") from exc
        s = _session_from_dict(manager, d, new_id=True, owner=owner)  # every field checked; new_id: any id form
        s.id = sid
        s.store_version = version
        return s, version, hint

    @staticmethod
    def _hint(raw: bytes | None) -> int:
        if not raw:
            return 0
        d = json.loads(raw)
        n = d.get("tokens") if isinstance(d, dict) else None
        return n if isinstance(n, int) and 0 <= n < 1 << 24 else 0

    def load_session(self, manager, sid: str):
        """Rebuild a Session from the log (every field validated); None if unknown."""
        loaded = self._load(sid)
        if loaded is None:
            return None
        s, version, hint = self._build(manager, sid, loaded)
        self._hints[sid] = hint
        self._versions[sid] = version
        if not self.readonly:
            self._handles[s.kv.id] = s
        return s

    def sync(self, s, idempotency_key: str | None = None) -> dict | None:
        """One round trip: the stored version (and the KV hint) and the idempotency key's record. Reloads ``s`` in
        place when the version moved on; SessionNotFoundError when it was deleted; the recorded reply if the key
        was committed already."""
        keys = self._session_keys(s.id)
        with self._errors("checking a session's version"):
            pipe = self._r.pipeline(transaction=False)
            pipe.hmget(keys[0], "version", "kv")
            if idempotency_key:
                pipe.hget(keys[3], idempotency_key)
            res = pipe.execute()
        version, kv = res[0]
        if version is None:
            raise SessionNotFoundError(f"no session {s.id!r} (deleted through another replica)")
        try:
            self._hints[s.id] = self._hint(kv)
            version = int(version)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"session {s.id} in Redis has a malformed version ({exc})") from exc
        if version != s.store_version:
            self._reload(s)
        if idempotency_key and res[1] is not None:
            return self._recorded(s, res[1])
        return None

    def _reload(self, s) -> None:
        """Adopt the store's history, stats and metadata into ``s`` (another replica moved it on)."""
        loaded = self._load(s.id)
        if loaded is None:
            raise SessionNotFoundError(f"no session {s.id!r} (deleted through another replica)")
        fresh, version, hint = self._build(self.manager, s.id, loaded)
        self.manager.engine.release_kv(fresh.kv)  # (an empty handle: the session keeps its own)
        with s._data_lock:
            old = s.conversation.token_ids
            s.conversation.messages = fresh.conversation.messages
            s.conversation.dropped_turns = fresh.conversation.dropped_turns
            s.turn_stats = fresh.turn_stats
            s.metadata = fresh.metadata
            s.store_version = self._versions[s.id] = version
            new = s.conversation.token_ids
        n = 0
        while n < min(len(old), len(new)) and old[n] == new[n]:
            n += 1
        self._valid[s.id] = n  # memory's KV beyond this is of a history that is no longer this session's
        self._hints[s.id] = hint
        log.info("session reloaded from the store", extra={"session": s.id, "version": version})

    def _recorded(self, s, raw: bytes) -> dict:
        """A committed key's reply record, validated like everything read back."""
        vocab = self.manager.engine.model.config.vocab_size
        try:
            rec = json.loads(raw)["reply"]
            ok = (isinstance(rec, dict) and isinstance(rec.get("content"), str)
                  and isinstance(rec.get("reasoning"), str) and rec.get("finish_reason") in _FINISH
                  and isinstance(rec.get("token_ids"), list)
                  and all(type(t) is int and 0 <= t < vocab for t in rec["token_ids"])
                  and isinstance(rec.get("stats"), dict)
                  and (isinstance(rec.get("id"), str) and 0 < len(rec["id"]) <= 64 if "id" in rec else True))
            if ok:
                from .session import TurnStats

                TurnStats(**rec["stats"])
                return rec
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"session {s.id}: a recorded reply in Redis is malformed ({exc})") from exc
        raise StoreError(f"session {s.id}: a recorded reply in Redis is malformed")

    def session_ids(self, owner: str | None = None) -> list[str]:
        with self._errors("listing sessions"):
            if owner is not None and self._owners_indexed:
                return [i.decode() for i in self._r.zrange(self._k("o", owner), 0, -1)]
            ids = [i.decode() for i in self._r.zrange(self._k("sessions"), 0, -1)]
            if owner is None:
                return ids
            pipe = self._r.pipeline(transaction=False)
            for sid in ids:
                pipe.hget(self._session_keys(sid)[0], "owner")
            owners = pipe.execute()
        return [sid for sid, o in zip(ids, owners) if o is not None and o.decode(errors="replace") == owner]

    def session_page(self, owner: str, *, limit: int, after: str | None = None, order: str = "asc") -> IdPage:
        """One page of ``owner``'s ids: one script on the owner's index (the cursor's rank, then ``limit + 1`` ids
        from the next rank; the extra one only says whether more follow)."""
        if not self._owners_indexed:
            raise StoreError(f"Redis at {self.path} has no owners' index yet: open it once without readonly=True")
        with self._errors("listing sessions"):
            cursor = [] if after is None else [after]
            ids = self._scripts["page"](keys=[self._k("o", owner)], args=[limit + 1, order, *cursor])
        if ids is None:
            raise InvalidRequestError(UNKNOWN_CURSOR)
        ids = [i.decode() for i in ids]
        return IdPage(ids=tuple(ids[:limit]), has_more=len(ids) > limit)

    def summaries(self) -> list[dict]:
        """One row per session without loading any model: id, owner, times, message and token counts, system
        prompt."""
        ids = self.session_ids()
        with self._errors("listing sessions"):
            pipe = self._r.pipeline(transaction=False)
            for sid in ids:
                keys = self._session_keys(sid)
                pipe.hmget(keys[0], "created_at", "updated_at", "system", "n_tokens", "owner")
                pipe.llen(keys[1])
            res = pipe.execute()
        rows = []
        for i, sid in enumerate(ids):
            (created, updated, system, tokens, owner), n = res[2 * i], res[2 * i + 1]
            if created is None:
                continue  # deleted meanwhile
            try:
                rows.append({"id": sid, "owner": (owner or b"").decode(), "created_at": float(created),
                             "updated_at": float(updated or created),
                             "system": json.loads(system) if system else None, "messages": n,
                             "tokens": int(tokens or 0)})
            except ValueError as exc:
                raise StoreError(f"session {sid} in Redis is malformed ({exc})") from exc
        return rows

    def messages(self, sid: str) -> list[Message] | None:
        loaded = self._load(sid)
        if loaded is None:
            return None
        from .manager import _message

        vocab = self.manager.engine.model.config.vocab_size if self.manager is not None else 1 << 31
        try:
            return [_message(json.loads(m), vocab) for m in loaded[1]]
        except (GemmaSessionsError, ValueError, TypeError, KeyError) as exc:
            raise SessionFileError(f"session {sid} in Redis has a malformed message ({exc})") from exc

    def snapshot_info(self, sid: str) -> dict | None:
        with self._errors("reading a session"):
            raw = self._r.hget(self._k("s", sid), "kv")
        try:
            d = json.loads(raw) if raw else None
        except ValueError:
            d = None
        if not isinstance(d, dict):
            return None
        return {k: d.get(k) for k in ("tokens", "bytes", "model_fingerprint", "created_at")}

    def stats(self) -> dict:
        out = super().stats()
        out.update(store="redis", blobs_written=self.blobs_written, blobs_fetched=self.blobs_fetched)
        return out

    # ------------------------------------------------------------------------------------------ responses
    def put_response(self, rid: str, owner: str, sid: str, n_messages: int, body: str) -> None:
        """Keep a response for ``previous_response_id`` (every replica sees it); the oldest beyond max_responses go."""
        self._writable()
        doc = json.dumps({"owner": owner, "session": sid, "n": n_messages, "body": json.loads(body)})
        with self._errors("keeping a response"):
            self._scripts["put_response"](
                keys=[self._k("r", rid), self._k("responses"), self._k("s", sid, "resp"), self._k("s", sid)],
                args=[rid, doc, repr(time.time()), self.max_responses, self.prefix])

    def get_response(self, rid: str) -> dict | None:
        """{"owner", "session", "n", "body"} of a kept response, or None."""
        with self._errors("reading a response"):
            raw = self._scripts["get"](keys=[self._k("r", rid)], args=[self.max_read_bytes])[0]
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            if (isinstance(d, dict) and isinstance(d.get("owner"), str) and isinstance(d.get("session"), str)
                    and type(d.get("n")) is int and isinstance(d.get("body"), dict)):
                return {"owner": d["owner"], "session": d["session"], "n": d["n"], "body": d["body"]}
        except ValueError:
            pass
        raise StoreError(f"response {rid!r} in Redis is malformed")

    def delete_response(self, rid: str) -> bool:
        self._writable()
        with self._errors("deleting a response"):
            return bool(self._scripts["delete_response"](keys=[self._k("r", rid), self._k("responses")],
                                                         args=[rid, self.prefix]))

    # ------------------------------------------------------------------------------------------ KV blobs
    @staticmethod
    def _block_keys(tokens: Sequence[int], bs: int) -> list[str]:
        """Hex names of the blocks of ``tokens``: full blocks by the prefix hash chain, a partial last block by its
        parent's hash and its own tokens (a distinct, length-prefixed hash: it names exactly that prefix too)."""
        full = hash_token_blocks(tokens, bs)
        names = [h.hex() for h in full]
        if len(tokens) % bs:
            names.append(hash_block_tokens(full[-1] if full else None, tokens[len(full) * bs:]).hex())
        return names

    def _page_key(self, name: str, group: int) -> str:
        return self._k("kv", self._scope, name, str(group))

    def _digest(self, key: str, payload: bytes) -> bytes:
        return hashlib.blake2b(payload, digest_size=_DIGEST, key=key.encode()[-64:]).digest()

    def _write_snapshot(self, sid: str, snap) -> None:
        """Writer thread: put a snapshot's pages in Redis (those not already there), then the session's hint. Without
        Redis the KV is not written (a warning, not an error: a later turn recomputes what is missing)."""
        if not snap.shareable:
            return  # private KV (an imported file) never enters the shared keyspace: other replicas recompute
        try:
            self._write_blobs(sid, snap)
        except StoreUnavailableError as exc:
            log.warning("KV not written to Redis", extra={"session": sid, "reason": str(exc)})

    def _write_blobs(self, sid: str, snap) -> None:
        with self._errors("checking a session"):
            if not self._r.exists(self._k("s", sid)):
                return  # deleted meanwhile
        if isinstance(snap, KVSnapshot):
            nbytes = self._write_pages(snap)
        else:
            nbytes = self._write_state(snap)
        version = self._versions.get(sid, 0)
        hint = json.dumps({"tokens": snap.num_tokens, "bytes": nbytes, "model_fingerprint": self._model_fp,
                           "created_at": time.time(), "version": version})
        with self._errors("writing a KV hint"):
            self._scripts["set_hint"](keys=[self._k("s", sid)], args=[hint, version, snap.num_tokens])
        self.snapshots_written += 1
        self._written[sid] = (snap.num_tokens, hash(tuple(snap.tokens)))

    def _write_pages(self, snap: KVSnapshot) -> int:
        names = self._block_keys(list(snap.tokens), snap.block_size)
        now = time.monotonic()
        todo: list[tuple[str, torch.Tensor]] = []
        with self._known_lock:
            for g, (pages, pos) in enumerate(zip(snap.pages, snap.index)):
                for i, b in enumerate(pos):
                    key = self._page_key(names[b], g)
                    at = self._known.get(key.encode())
                    if at is None or now - at > self.kv_ttl_s / 4:
                        todo.append((key, pages[i]))
        written = 0
        for start in range(0, len(todo), _FETCH_BATCH):
            batch = todo[start:start + _FETCH_BATCH]
            with self._errors("writing KV"):
                pipe = self._r.pipeline(transaction=False)
                for key, _ in batch:
                    pipe.expire(key, self.kv_ttl_s)  # 1: it is there (and lives on), 0: it must be written
                there = pipe.execute()
                pipe = self._r.pipeline(transaction=False)
                for (key, page), ok in zip(batch, there):
                    if not ok:
                        payload = page.contiguous().view(torch.uint8).numpy().tobytes()
                        pipe.set(key, self._digest(key, payload) + payload, ex=self.kv_ttl_s)
                        written += len(payload)
                        self.blobs_written += 1
                pipe.execute()
            with self._known_lock:
                for key, _ in batch:
                    self._known[key.encode()] = now
                    self._known.move_to_end(key.encode())
                while len(self._known) > _KNOWN_KEYS:
                    self._known.popitem(last=False)
        return written

    def _state_key(self, tokens: Sequence[int]) -> str:
        h = hashlib.sha256(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]
        return self._k("kvs", self._scope, h)

    def _write_state(self, snap) -> int:
        data = encode_session(snap, model_fingerprint=self._model_fp, tokenizer_fingerprint=self._tok_fp,
                              session={})
        with self._errors("writing a state snapshot"):
            self._r.set(self._state_key(snap.tokens), data, ex=self.kv_ttl_s)
        return len(data)

    def restore_kv(self, s) -> str:
        """Before a turn: when memory holds less of the history's KV than Redis (a session another replica served,
        or none in memory), import the longest run of blobs that matches the history. Returns memory | snapshot |
        recompute. A missing, evicted or refused blob is never an error, only a longer prefill."""
        engine = self.manager.engine
        have = engine.kv_tokens(s.kv)
        valid = min(have, self._valid.pop(s.id, have))
        history = s.token_ids
        hint = min(self._hints.get(s.id, 0), len(history))
        cache = engine.cache
        step = cache.layout.block_size if isinstance(cache, PagedKVCache) else 1
        if hint <= valid + step:  # nothing (or less than a block) to gain over what memory holds
            return "memory" if have else "recompute"
        try:
            snap = self._fetch_pages(history, hint) if isinstance(cache, PagedKVCache) else self._fetch_state(
                history, hint)
            if snap is not None and snap.num_tokens > valid and engine.import_kv(s.kv, snap):
                self.restored += 1
                return "snapshot"
        except StoreUnavailableError as exc:  # KV is a cache: without Redis the turn recomputes
            log.warning("KV blobs unavailable, recomputing", extra={"session": s.id, "reason": str(exc)})
        except (GemmaSessionsError, ValueError) as exc:  # refused (another layout, a bad blob): recompute
            log.warning("KV blobs refused, recomputing", extra={"session": s.id, "reason": str(exc)})
        return "memory" if have else "recompute"

    def _needed(self, n: int) -> list[tuple[int, int]]:
        """(group, block) of every page a continuation after ``n`` tokens reads: every block of a full group, the
        window of a sliding group (``kv.check_snapshot``'s rule)."""
        lay = self.manager.engine.cache.layout
        bs = lay.block_size
        n_blocks = -(-n // bs)
        out = []
        for g, kind in enumerate(lay.group_kinds):
            first = lay.first_visible(g, n) // bs if kind == SLIDING else 0
            out += [(g, b) for b in range(first, n_blocks)]
        return out

    def _exists(self, keys: list[str]) -> list[bool]:
        with self._errors("looking up KV"):
            pipe = self._r.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(x) for x in pipe.execute()]

    def _fetch_pages(self, history: list[int], hint: int) -> KVSnapshot | None:
        """The KV of the longest prefix of ``history`` whose pages Redis holds: the hint's length (the last KV
        written, its partial last block included) when all its pages are there, else the whole blocks of the
        leading run of pages present."""
        lay = self.manager.engine.cache.layout
        bs = lay.block_size
        names = self._block_keys(history[:hint], bs)
        full = [g for g, kind in enumerate(lay.group_kinds) if kind != SLIDING] or [0]
        present = self._exists([self._page_key(name, full[0]) for name in names])
        run = next((i for i, ok in enumerate(present) if not ok), len(present))
        for n in dict.fromkeys((hint, run * bs)):
            if n == 0 or -(-n // bs) > run:
                continue
            if n != hint:
                names = self._block_keys(history[:n], bs)
            need = self._needed(n)
            if all(self._exists([self._page_key(names[b], g) for g, b in need if g not in full])):
                snap = self._read_pages(history, n, names, need)
                if snap is not None:
                    return snap
        return None

    def _read_pages(self, history: list[int], n: int, names: list[str], need: list[tuple[int, int]]):
        cache = self.manager.engine.cache
        lay, dtype = cache.layout, cache.dtype
        page = lay.page_bytes(dtype)
        if len(need) * page > self.max_restore_bytes or len(need) > cache.num_blocks:
            log.info("KV in Redis is larger than one restore may fetch; recomputing")
            return None
        pages: dict[int, list[torch.Tensor]] = {g: [] for g in range(lay.num_groups)}
        index: dict[int, list[int]] = {g: [] for g in range(lay.num_groups)}
        for start in range(0, len(need), _FETCH_BATCH):
            batch = need[start:start + _FETCH_BATCH]
            keys = [self._page_key(names[b], g) for g, b in batch]
            with self._errors("reading KV"):
                values = self._scripts["get"](keys=keys, args=[page + _DIGEST])
            for (g, b), key, raw in zip(batch, keys, values):
                t = self._page(key, raw, page, dtype, lay, g)
                if t is None:
                    return None  # evicted meanwhile, or refused
                pages[g].append(t)
                index[g].append(b)
        self.blobs_fetched += len(need)
        groups = range(lay.num_groups)
        return KVSnapshot(tokens=tuple(history[:n]), block_size=lay.block_size, group_kinds=lay.group_kinds,
                          pages=tuple(torch.stack(pages[g]) if pages[g] else
                                      torch.empty((0, lay.group_shapes[g][0], 2, lay.block_size,
                                                   *lay.group_shapes[g][1:]), dtype=dtype) for g in groups),
                          index=tuple(tuple(index[g]) for g in groups), shareable=True,
                          layout_fingerprint=lay.fingerprint)

    def _page(self, key: str, raw: bytes | None, page: int, dtype: torch.dtype, lay, g: int) -> torch.Tensor | None:
        """One page from its blob, or None: exact size, digest over key and bytes, finite values in range."""
        if raw is None or len(raw) != page + _DIGEST:
            return None
        payload = raw[_DIGEST:]
        if self._digest(key, payload) != raw[:_DIGEST]:
            log.warning("a KV blob in Redis fails its digest; ignored")
            return None
        lpg, kvh, hd = lay.group_shapes[g]
        t = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).view(lpg, 2, lay.block_size, kvh, hd)
        f = t.float()
        if not bool(torch.isfinite(f).all()) or float(f.abs().max()) > MAX_ABS_VALUE:
            log.warning("a KV blob in Redis holds non-finite or out-of-range values; ignored")
            return None
        return t

    def _fetch_state(self, history: list[int], hint: int):
        """A recurrent model's state for ``history[:hint]`` (one blob, decoded as a session file), or None."""
        if hint == 0 or hint > len(history):
            return None
        key = self._state_key(history[:hint])
        with self._errors("reading a state snapshot"):
            raw = self._scripts["get"](keys=[key], args=[self.max_restore_bytes])[0]
        if raw is None:
            return None
        try:
            _, snap = decode_session(raw, model_fingerprint=self._model_fp, tokenizer_fingerprint=self._tok_fp,
                                     trusted=True, max_bytes=self.max_restore_bytes, name="Redis state blob")
        except SessionFileError as exc:
            log.warning("a state blob in Redis was refused", extra={"reason": str(exc)})
            return None
        return snap if snap is not None and list(snap.tokens) == history[:hint] else None

