"""Pure data for the paged KV cache: block hashes, the block record and the O(1) LRU free queue.

Contract:

* :func:`hash_block_tokens` hashes one block of token ids chained to its parent block's hash, so a full
  block's hash names the whole token prefix up to and including it. The hash is BLAKE2b (16-byte digest) over
  a canonical byte encoding, identical across processes, platforms and Python versions (no ``hash()``).
* :func:`hash_token_blocks` hashes every FULL block of a token sequence; a trailing partial block gets none.
* :class:`KVBlock` is the mutable bookkeeping record of one physical block (id, refcount, hash, cache key and
  the free-queue links). It owns no memory; the tensors live elsewhere, indexed by ``block_id``.
* :class:`FreeBlockQueue` is a doubly linked list of free blocks with sentinel ends; ``popleft``, ``remove``
  and ``append`` are O(1). The head is the least recently used end (evicted / reused first), the tail the
  most recently freed end::

      head sentinel <-> b5 <-> b6 <-> ... <-> b2 <-> b1 <-> b0 <-> tail sentinel
      ^ popleft() takes from here (LRU)              append() adds here (MRU) ^

  ``remove(block)`` unlinks a block from anywhere (a cached free block reused by a prefix hit).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Iterable, Iterator, Sequence

BlockHash = bytes
"""A 16-byte BLAKE2b digest naming a block-aligned token prefix."""

_DOMAIN = b"gemma-sessions/kv-block/v1"
_ROOT = b"\x00"  # marker for "no parent": the first block of a sequence
_CHILD = b"\x01"  # followed by the length-prefixed parent hash
_EXTRA_TYPES = (str, int, bytes, bool, type(None))


def _encode_extra(value: object) -> str:
    """A canonical text form of ``extra_keys``: repr of str/int/bytes/bool/None, nested in tuples only."""
    if isinstance(value, tuple):
        return "(" + ",".join(_encode_extra(v) for v in value) + ",)"
    if isinstance(value, _EXTRA_TYPES):
        return repr(value)
    raise TypeError(f"extra_keys may hold only str, int, bytes, bool, None and tuples, not {type(value).__name__}")


def hash_block_tokens(parent: BlockHash | None, tokens: Sequence[int], extra_keys: tuple = ()) -> BlockHash:
    """Hash one block: ``H(domain, parent-or-root, len + int32-LE tokens, canonical extra_keys)``.

    Raises ``TypeError`` for an extra key of an unsupported type and ``struct.error`` for a token id outside
    int32.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(_DOMAIN)
    if parent is None:
        h.update(_ROOT)
    else:
        h.update(_CHILD + struct.pack("<I", len(parent)) + bytes(parent))
    h.update(struct.pack(f"<I{len(tokens)}i", len(tokens), *tokens))
    extra = _encode_extra(tuple(extra_keys)).encode("utf-8")
    h.update(struct.pack("<I", len(extra)) + extra)
    return h.digest()


def hash_token_blocks(
    tokens: Sequence[int], block_size: int, extra_keys: tuple = (), parent: BlockHash | None = None
) -> list[BlockHash]:
    """Hashes of every full ``block_size`` block of ``tokens``, each chained to the previous (or ``parent``)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[BlockHash] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, tokens[start : start + block_size], extra_keys)
        hashes.append(parent)
    return hashes


class KVBlock:
    """Bookkeeping for one physical KV block.

    ``ref_cnt`` counts the sequences holding the block; 0 means it sits in the free queue. ``cache_key`` is the
    key it is registered under in the pool's cached map (``None``: not cached); ``block_hash`` the prefix hash
    it holds (informational). ``prev`` / ``next`` are the free-queue links (both ``None`` when not queued).
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash", "cache_key", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.cache_key: Hashable | None = None
        self.prev: KVBlock | None = None
        self.next: KVBlock | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={h}, cache_key={self.cache_key!r})"


class FreeBlockQueue:
    """Doubly linked LRU list of free blocks with sentinel head/tail; every operation is O(1) except listing.

    A block is in the queue iff its ``prev`` and ``next`` links are set. Not thread-safe (single owner).
    """

    __slots__ = ("_head", "_tail", "_len")

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0
        self.append_n(blocks)

    def __len__(self) -> int:
        return self._len

    def popleft(self) -> KVBlock:
        """Unlink and return the least recently used block; ``ValueError`` when empty."""
        first = self._head.next
        if first is self._tail or first is None:
            raise ValueError("no free blocks")
        self.remove(first)
        return first

    def remove(self, block: KVBlock) -> None:
        """Unlink ``block`` from wherever it sits; ``ValueError`` if it is not queued."""
        prev, nxt = block.prev, block.next
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next = nxt
        nxt.prev = prev
        block.prev = block.next = None
        self._len -= 1

    def append(self, block: KVBlock) -> None:
        """Link ``block`` at the tail (most recently used end); ``ValueError`` if it is already queued."""
        if block.prev is not None or block.next is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev
        assert last is not None  # the sentinels are always linked
        last.next = block
        block.prev = last
        block.next = self._tail
        self._tail.prev = block
        self._len += 1

    def append_n(self, blocks: Iterable[KVBlock]) -> None:
        """Append ``blocks`` in order (the first given becomes evictable first)."""
        for block in blocks:
            self.append(block)

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next
        while node is not None and node is not self._tail:
            yield node
            node = node.next

    def get_all_free_blocks(self) -> list[KVBlock]:
        """The queued blocks from head (LRU) to tail (MRU); O(n), for tests and diagnostics."""
        return list(self)
