"""The written interface between the scheduler / engine and a cache: :class:`KVCache` and :class:`CachedSequence`.

Contract: the scheduler and the engine use a cache only through these methods, so the paged KV of Gemma 1/2/3
(:class:`~gemma_sessions.cache.kv.PagedKVCache`) and RecurrentGemma's fixed-size state slots
(:class:`~gemma_sessions.cache.state.StateCache`) share continuous batching, handles, eviction of idle sessions,
preemption and spilling to the store. The runner is the one place that knows which cache it has (it reads the
pages or the slots). Implementations conform structurally; ``tests/unit/test_interfaces.py`` checks both.

A sequence's life, as the scheduler drives it::

    seq = cache.start(tokens, checkpoints)      # adopts whatever prefix is cached (seq.num_computed tokens)
    cache.rematch(seq)                          # before its first chunk: a longer prefix may be cached by now
    cache.shared_prefix(earlier_seq, seq.tokens) # what an earlier prompt will share: seq waits rather than recompute
    n = cache.allocate(seq, n)                  # room for the next n tokens (CapacityError: none now)
    ... the runner computes tokens [num_computed, num_computed + n) ...
    cache.commit(seq, n)                        # they are computed: shareable from now on
    cache.resume(seq, longer_tokens)            # the next turn of a parked sequence, or False: it diverged
    cache.free(seq) | cache.discard(seq)        # done (its KV stays reusable) | failed (its KV is dropped)

Thread-compatibility: only the engine loop thread calls a cache, except ``check_snapshot``, which reads immutable
layout only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class CachedSequence(Protocol):
    """One sequence as the scheduler and the engine see it (the rest of it is its cache's business)."""

    tokens: list[int]       # every token known so far (prompt, then generated)
    num_computed: int       # tokens whose KV / state is computed
    cached_at_start: int    # tokens found cached when the current request started


@runtime_checkable
class Snapshot(Protocol):
    """A CPU copy of one sequence's KV or state, independent of where it lived (what the store and files save)."""

    tokens: tuple[int, ...]
    shareable: bool         # False: restore as a private sequence (never shared through the prefix cache)

    @property
    def num_tokens(self) -> int: ...

    def nbytes(self) -> int: ...


@runtime_checkable
class KVCache(Protocol):
    """What the scheduler and the engine ask of a cache (see the module docstring for the order of calls)."""

    # ---------------------------------------------------------------------------------------------- capacity
    def could_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` fits the whole cache at all (False: the request fails)."""

    def has_room(self, num_tokens: int) -> bool:
        """Whether a first chunk of ``num_tokens`` fits now (else a new request waits for running ones)."""

    def describe(self) -> str:
        """The cache's size in words, for error messages."""

    # ---------------------------------------------------------------------------------------------- sequences
    def start(self, tokens: list[int], checkpoints: Iterable[int] = ()) -> CachedSequence:
        """A new sequence for ``tokens``, adopting the longest cached prefix. ``checkpoints``: prompt positions other
        sequences are likely to share (a system prompt's end); a hint a cache may ignore (paged KV shares every full
        block anyway; a state cache snapshots there)."""

    def resume(self, seq: CachedSequence, tokens: list[int]) -> bool:
        """Continue a parked ``seq`` with ``tokens``, which extend what it computed (only the new ones are computed);
        False, and ``seq`` unchanged, when they do not (the caller frees it and starts over)."""

    def rematch(self, seq: CachedSequence) -> int:
        """Before ``seq`` computes anything: adopt a longer cached prefix if one appeared since it started. Returns
        the tokens gained."""

    def shared_prefix(self, seq: CachedSequence, tokens: list[int]) -> int:
        """Leading tokens of ``tokens`` a new sequence could adopt from ``seq``'s KV once ``seq`` has computed them
        (0 where this cache shares nothing that way). The scheduler holds a new prompt back while an earlier one
        still computes that much of it, instead of computing the shared tokens twice in one step."""

    def allocate(self, seq: CachedSequence, n: int) -> int:
        """Make room to compute up to ``n`` next tokens of ``seq``; returns how many got room (>= 1; fewer when the
        cache wants the chunk cut, e.g. at a checkpoint). Raises CapacityError, changing nothing, when there is no
        room now."""

    def commit(self, seq: CachedSequence, n: int) -> None:
        """``n`` more tokens of ``seq`` are computed (the runner wrote them): reusable by other sequences now."""

    def fork(self, seq: CachedSequence) -> CachedSequence:
        """A new sequence with ``seq``'s computed tokens, sharing its KV or starting from a copy of its state."""

    def free(self, seq: CachedSequence) -> None:
        """Release ``seq``; what it computed stays reusable (prefix cache, snapshot) until evicted."""

    def discard(self, seq: CachedSequence) -> None:
        """Release ``seq`` and drop what it computed from the shared cache (a failed step: it may be bad)."""

    # ---------------------------------------------------------------------------------------------- snapshots
    def export(self, seq: CachedSequence) -> Snapshot | None:
        """A CPU copy of ``seq``'s KV or state (None when it holds none)."""

    def adopt_prefix(self, tokens: list[int]) -> CachedSequence:
        """A new sequence holding the longest cached prefix of ``tokens`` (``num_computed`` 0 when none is cached), to
        export or to keep for a history that parted from its own KV. Not a request's look-up: the prefix-hit counters
        do not move."""

    def check_snapshot(self, snap: object) -> None:
        """Raise SessionFileError, with the reason, unless ``snap`` fits this cache. Any thread."""

    def import_snapshot(self, snap: Snapshot) -> CachedSequence:
        """A new sequence holding ``snap`` (private unless ``snap.shareable``). Raises SessionFileError when it does
        not fit, ValueError for the other kind of snapshot, CapacityError when there is no room now."""

    # ---------------------------------------------------------------------------------------------- accounting
    def bytes_held(self, seq: CachedSequence) -> int:
        """Bytes of cache ``seq`` holds now (shared pages counted in full)."""

    def reserve(self) -> None:
        """Make the whole budget resident now (it otherwise becomes resident as it is used)."""

    def stats(self) -> dict:
        """Counters for ``Engine.stats``: at least blocks_total / used / free / cached, kv_bytes_total / used,
        prefix_queried_tokens, prefix_hit_tokens, cache_block_evictions and cache_kind."""


def resume_sequence(cache, seq, tokens: list[int]) -> bool:
    """``KVCache.resume`` for a cache whose sequences have ``tokens``, ``num_computed`` and ``cached_at_start`` and
    which counts ``prefix_queried_tokens`` / ``prefix_hit_tokens`` (both caches)."""
    n = seq.num_computed
    if len(tokens) <= n or tokens[:n] != seq.tokens[:n]:
        return False
    seq.tokens, seq.cached_at_start = tokens, n
    cache.prefix_queried_tokens += len(tokens)
    cache.prefix_hit_tokens += n
    return True


KV_CACHE_METHODS = ("could_ever_fit", "has_room", "describe", "start", "resume", "rematch", "shared_prefix", "allocate",
                    "commit", "fork", "free", "discard", "export", "adopt_prefix", "check_snapshot", "import_snapshot",
                    "bytes_held", "reserve", "stats")
"""Every method of :class:`KVCache`, for tests and readers (the Protocol is the definition)."""


def adopt_cached_prefix(cache, tokens: list[int]):
    """``KVCache.adopt_prefix`` for a cache whose ``start`` counts ``prefix_queried_tokens`` / ``prefix_hit_tokens``."""
    counters = cache.prefix_queried_tokens, cache.prefix_hit_tokens
    try:
        return cache.start(tokens)
    finally:
        cache.prefix_queried_tokens, cache.prefix_hit_tokens = counters
