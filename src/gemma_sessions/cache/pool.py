"""The block pool: allocation, sharing, prefix caching and LRU eviction of fixed-size KV blocks (ids only).

Contract:

* ``num_blocks`` blocks, ids ``0 .. num_blocks-1``, none special. Each has a refcount: ``ref_cnt > 0`` means
  "used" (held by that many sequences), ``ref_cnt == 0`` means "free" and sitting in the free queue.
  Invariant: ``num_free + num_used == num_blocks`` always.
* A used, computed, full block can be *cached*: registered in a map under a hashable ``cache_key`` (the engine
  uses ``(group_id, block_hash)``). A cached block stays registered after it is freed, so a later request with
  the same prefix finds it with :meth:`BlockPool.lookup` and re-takes it with :meth:`BlockPool.touch`, until
  its memory is reused by :meth:`BlockPool.get_new_blocks` (that evicts it from the map), or until
  :meth:`BlockPool.uncache` drops its key (KV that may be bad must never be matched again).
* Free-queue order is strict LRU; every freed block, cached or not, joins the TAIL in the order given to
  :meth:`BlockPool.free_blocks`, and allocation pops from the HEAD::

      initial:           head -> 0 1 2 3 4 5 6 7 8 9 <- tail
      get_new_blocks(3)  -> [0, 1, 2]        queue: 3 4 5 6 7 8 9
      get_new_blocks(2)  -> [3, 4]           queue: 5 6 7 8 9
      free_blocks([2, 1, 0])                 queue: 5 6 7 8 9 2 1 0
      get_new_blocks(4)  -> [5, 6, 7, 8]     queue: 9 2 1 0
      get_new_blocks(3)  -> [9, 2, 1]        (2 then 1 evicted from the map if cached)

  So the engine frees a sequence's blocks tail first (reversed) to make its tail evictable before its head.
* Every error leaves the pool unchanged: ``CapacityError`` when too few blocks are free, ``ValueError`` for
  unknown ids, double frees, touching a free block that is not cached, or re-keying a cached block.

Thread-compatibility: the pool is not locked. The engine calls it from its single loop thread; any other
caller must serialise access itself.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Iterable

from ..errors import CapacityError
from .blocks import BlockHash, FreeBlockQueue, KVBlock

EvictCallback = Callable[[int, Hashable], None]
"""Called as ``on_evict(block_id, cache_key)`` whenever a key leaves the cached map."""


class BlockPool:
    """Refcounted KV blocks with an LRU free queue and a prefix-cache map (see the module docstring)."""

    __slots__ = ("_blocks", "_free", "_cached", "enable_caching", "on_evict", "hits", "queries", "evictions")

    def __init__(self, num_blocks: int, enable_caching: bool = True, on_evict: EvictCallback | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self._blocks)
        self._cached: dict[Hashable, KVBlock] = {}
        self.enable_caching = enable_caching
        self.on_evict = on_evict
        self.hits = 0
        self.queries = 0
        self.evictions = 0

    # ----------------------------------------------------------------------------------------- accounting
    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_free(self) -> int:
        """Blocks in the free queue, cached or not (all of them can be handed out by ``get_new_blocks``)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks with ``ref_cnt > 0``."""
        return len(self._blocks) - len(self._free)

    @property
    def num_cached(self) -> int:
        """Keys registered in the cached map (used or free blocks)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used / len(self._blocks)

    def ref_count(self, block_id: int) -> int:
        return self._block(block_id).ref_cnt

    def cache_key_of(self, block_id: int) -> Hashable | None:
        """The key ``block_id`` is registered under, or ``None``."""
        return self._block(block_id).cache_key

    def free_block_ids(self) -> list[int]:
        """Free-queue ids from LRU head to MRU tail (O(n); tests and diagnostics)."""
        return [b.block_id for b in self._free]

    # ----------------------------------------------------------------------------------------- allocation
    def get_new_blocks(self, n: int) -> list[int]:
        """Pop ``n`` blocks from the LRU head, evicting any cached key they carry; each gets ``ref_cnt = 1``.

        ``CapacityError`` (state unchanged) if fewer than ``n`` are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise CapacityError(f"need {n} KV blocks, only {len(self._free)} of {self.num_blocks} are free")
        out: list[int] = []
        for _ in range(n):
            block = self._free.popleft()
            if block.cache_key is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block.block_id)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """``ref_cnt += 1`` for each id (repeats count); a free cached block leaves the free queue first.

        ``ValueError`` (state unchanged) for an unknown id or a free block that is not cached (its contents are
        garbage, so nothing may share it).
        """
        blocks = [self._block(i) for i in block_ids]
        for block in blocks:
            if block.ref_cnt == 0 and block.cache_key is None:
                raise ValueError(f"block {block.block_id} is free and not cached; it cannot be shared")
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """``ref_cnt -= 1`` for each id; a block reaching 0 joins the free-queue TAIL, in the order given.

        Pass a sequence's blocks reversed (tail first) so its tail is evicted before its head. ``ValueError``
        (state unchanged) on a double free: an id given more times than its refcount.
        """
        blocks = [self._block(i) for i in block_ids]
        pending: dict[int, int] = {}
        for block in blocks:
            pending[block.block_id] = pending.get(block.block_id, 0) + 1
            if pending[block.block_id] > block.ref_cnt:
                raise ValueError(f"double free of block {block.block_id} (ref_cnt {block.ref_cnt})")
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    # ----------------------------------------------------------------------------------------- prefix cache
    def cache_block(self, block_id: int, cache_key: Hashable, block_hash: BlockHash | None = None) -> bool:
        """Register used block ``block_id`` under ``cache_key``; ``True`` if it is (now) the key's block.

        ``False`` when another block already holds the key (that one is kept) or caching is disabled.
        ``block_hash`` defaults to ``cache_key`` if it is bytes, else to its last element if that is bytes.
        ``ValueError`` if the block is free or already registered under a different key.
        """
        block = self._block(block_id)
        if cache_key is None:
            raise ValueError("cache_key must not be None")
        if block.ref_cnt == 0:
            raise ValueError(f"block {block_id} is free; only a used, computed block can be cached")
        if block.cache_key is not None:
            if block.cache_key == cache_key:
                return True
            raise ValueError(f"block {block_id} is already cached under {block.cache_key!r}, not {cache_key!r}")
        if not self.enable_caching or cache_key in self._cached:
            return False
        if block_hash is None:
            block_hash = _hash_from_key(cache_key)
        block.cache_key = cache_key
        block.block_hash = block_hash
        self._cached[cache_key] = block
        return True

    def lookup(self, cache_key: Hashable) -> int | None:
        """The block cached under ``cache_key`` (used or free), or ``None``; counts a query and maybe a hit.

        A hit on a free block is only a promise: ``touch`` it before the next ``get_new_blocks``.
        """
        self.queries += 1
        block = self._cached.get(cache_key)
        if block is None:
            return None
        self.hits += 1
        return block.block_id

    def evict_cached(self, n: int) -> int:
        """Drop up to ``n`` free cached blocks from the map, LRU first; they stay free. Returns the count."""
        dropped = 0
        for block in self._free:
            if dropped >= n:
                break
            if block.cache_key is not None:
                self._evict(block)
                dropped += 1
        return dropped

    def uncache(self, block_ids: Iterable[int]) -> int:
        """Drop the cache keys of ``block_ids`` (used or free; blocks without a key are skipped); returns the count.

        Holders keep their blocks; later lookups miss them. The engine calls it on the blocks of a request whose step
        failed, so KV that may be bad is never matched by another sequence. ``ValueError`` (state unchanged) for an
        unknown id.
        """
        blocks = [self._block(i) for i in block_ids]
        dropped = 0
        for block in blocks:
            if block.cache_key is not None:
                self._evict(block)
                dropped += 1
        return dropped

    def reset_prefix_cache(self) -> int:
        """Forget the keys of every free cached block (used blocks keep theirs). Returns the count."""
        return self.evict_cached(len(self._blocks))

    # ----------------------------------------------------------------------------------------- checks
    def check_invariants(self) -> None:
        """Raise ``AssertionError`` unless every bookkeeping invariant holds (O(num_blocks); for tests)."""
        queued = self._free.get_all_free_blocks()
        ids = [b.block_id for b in queued]
        _require(len(ids) == len(set(ids)), f"duplicate ids in the free queue: {ids}")
        _require(len(queued) == len(self._free), f"free queue length {len(self._free)} != {len(queued)} linked")
        zero = {b.block_id for b in self._blocks if b.ref_cnt == 0}
        _require(set(ids) == zero, f"free queue {sorted(ids)} != ref_cnt-0 blocks {sorted(zero)}")
        for block in self._blocks:
            _require(block.ref_cnt >= 0, f"negative ref_cnt on {block!r}")
            queued_links = block.prev is not None and block.next is not None
            _require(queued_links == (block.ref_cnt == 0), f"free-queue links disagree with ref_cnt on {block!r}")
            if block.cache_key is not None:
                _require(self._cached.get(block.cache_key) is block, f"{block!r} not in the map under its key")
        for key, block in self._cached.items():
            _require(block.cache_key == key, f"map key {key!r} -> {block!r} with a different cache_key")
            _require(self._blocks[block.block_id] is block, f"foreign block {block!r} in the map")
        _require(self.num_free + self.num_used == self.num_blocks, "free + used != total")
        _require(0 <= self.hits <= self.queries, f"hits {self.hits} / queries {self.queries}")

    # ----------------------------------------------------------------------------------------- internals
    def _block(self, block_id: int) -> KVBlock:
        try:
            index = operator.index(block_id)
        except TypeError:
            raise ValueError(f"block ids are integers, not {type(block_id).__name__}") from None
        if not 0 <= index < len(self._blocks):
            raise ValueError(f"no block {block_id!r} in a pool of {len(self._blocks)}")
        return self._blocks[index]

    def _evict(self, block: KVBlock) -> None:
        key = block.cache_key
        del self._cached[key]
        block.cache_key = None
        block.block_hash = None
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(block.block_id, key)


def _hash_from_key(cache_key: Hashable) -> BlockHash | None:
    if isinstance(cache_key, bytes):
        return cache_key
    if isinstance(cache_key, tuple) and cache_key and isinstance(cache_key[-1], bytes):
        return cache_key[-1]
    return None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
