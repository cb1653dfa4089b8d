"""Paged KV storage and per-sequence block tables, with prefix reuse that works for sliding-window layers.

Contract: ``PagedKVCache`` owns one buffer of equal-size pages and a :class:`~.pool.BlockPool` of their ids. Layers
are split into *groups* (:class:`~.layout.KVLayout`; vLLM's hybrid layout): every full-attention group keeps every
block of a sequence; every sliding group keeps only the blocks that a future query can still see (the last ``window``
tokens), releasing older ones to the prefix cache. All pages have the same size, so one pool serves every group, even
when groups differ in head size and KV heads (Gemma 4); KV-shared layers own no pages (they read their source's).

    Gemma 3 270M: 18 layers = 15 sliding + 3 full  ->  groups of 3 layers: 5 sliding groups + 1 full group
    page = block_size tokens x 3 layers x (K, V) x kv_heads x head_dim

    buffer [num_pages, page_elems]: every page, whatever its group
    views[c] [num_pages, lpg_c, 2, block_size, kvh_c, hd_c]: the same memory for page shape c (one per shape)
    flats[c] [num_pages * lpg_c * 2 * block_size, kvh_c, hd_c]: token slots; of (page p, slot j, K|V, offset o):
        ((p * lpg_c + j) * 2 + kv) * block_size + o   (page stride lpg_c * 2 * block_size)

With one page shape (Gemma 1/2/3) ``storage``, ``flat`` and ``page_stride`` are that shape's view, flat view and
stride, exactly the tensors they always were.

A :class:`SeqKV` is one sequence's state: its token ids, how many have KV computed, one block table per group
(``None`` where a sliding group released a block), and the hash chain of its full blocks. Full blocks are
registered in the pool under ``(group, block_hash)`` as soon as they are computed, so any later sequence with the
same prefix (another session, a fork, the same session after eviction) reuses them. Only a sequence's last,
partial block is ever written again; when it is shared (fork) it is copied first (copy on write).

A sequence's last, partial block is shared too, once its sequence is done with it (``free``: a stateless request
that finished, a parked session evicted): it is registered under ``(group, TAIL, parent block hash, its tokens)``
when that sequence was its only holder, and a later sequence whose prefix is the same full blocks and then at least
one of those tokens adopts it (``start``): the block leaves the prefix cache (the adopter writes into it; nobody
else may match it) and its slots past the common tokens are zeroed. So a stateless multi-turn chat, whose next
request repeats the previous one and its reply, recomputes from where it parts from them, not from the last block
boundary before that.

A *private* sequence (restored from an untrusted snapshot, ``KVSnapshot.shareable=False``) never registers a block:
its KV, and every block it or a fork of it computes on top, stays its own. Nothing else can match it, so KV that a
user file made up never reaches another user's conversation. Once its KV is gone (freed, or replaced by a cached
prefix in ``rematch``) the sequence is normal again: whatever it computes next comes from token ids alone.

Thread-compatibility: called only from the engine loop thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from ..config import FULL, SLIDING
from ..errors import CapacityError, SessionFileError
from .blocks import BlockHash, hash_block_tokens
from .layout import KVLayout  # (engine, tests and benchmarks import KVLayout from here too)
from .pool import BlockPool
from .protocol import adopt_cached_prefix, resume_sequence

TAIL = "tail"  # the second element of a partial block's cache key (a full block's is its hash)


class SeqKV:
    """One sequence's KV bookkeeping (mutable; owned by the engine thread)."""

    __slots__ = ("tokens", "num_computed", "tables", "hashes", "num_registered", "cached_at_start", "private")

    def __init__(self, num_groups: int):
        self.tokens: list[int] = []
        self.num_computed = 0
        self.tables: list[list[int | None]] = [[] for _ in range(num_groups)]
        self.hashes: list[BlockHash] = []
        self.num_registered = 0  # full blocks registered in the prefix cache
        self.cached_at_start = 0  # tokens found cached when the current request started
        self.private = False  # KV from an untrusted snapshot: never registered in the prefix cache

    def held_blocks(self) -> list[int]:
        return [b for table in self.tables for b in table if b is not None]


class PagedKVCache:
    """The paged KV tensor plus allocation, prefix matching, window release and copy on write."""

    def __init__(self, layout: KVLayout, num_blocks: int, dtype: torch.dtype, device: torch.device):
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.pool = BlockPool(num_blocks, on_evict=self._evicted)
        # Partial tail blocks in the prefix cache: parent block hash (None: the first block) -> their token tuples
        # (each registered in the pool per group under (group, TAIL, parent, tokens); see the module docstring).
        self._tails: dict[BlockHash | None, set[tuple[int, ...]]] = {}
        bs = layout.block_size
        # NOTE: torch.empty, not zeros: the budget becomes resident only as pages are used. Pages are zeroed when
        # handed out (``_new_blocks``), so nothing a query can read is ever uninitialised memory.
        self.buffer = torch.empty(num_blocks, layout.page_elems, dtype=dtype, device=device)
        self.views = tuple(self.buffer.view(num_blocks, lpg, 2, bs, kvh, hd) for lpg, kvh, hd in layout.classes)
        self.flats = tuple(v.view(-1, v.shape[-2], v.shape[-1]) for v in self.views)
        self.page_strides = tuple(lpg * 2 * bs for lpg, _, _ in layout.classes)  # flat slots per page
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # ------------------------------------------------------------------------------------------ tensors
    def _only_class(self, what: str) -> int:
        if len(self.views) != 1:
            raise ValueError(f"{what}: this cache has {len(self.views)} page shapes; use group_flat(group) / "
                             "group_page_stride(group)")
        return 0

    @property
    def storage(self) -> torch.Tensor:
        """``[num_pages, layers_per_group, 2, block_size, kv_heads, head_dim]`` of a cache with one page shape."""
        return self.views[self._only_class("storage")]

    @property
    def flat(self) -> torch.Tensor:
        """The token slots ``[num_pages * lpg * 2 * block_size, kv_heads, head_dim]`` of a cache with one page shape."""
        return self.flats[self._only_class("flat")]

    @property
    def page_stride(self) -> int:
        return self.page_strides[self._only_class("page_stride")]

    def group_flat(self, group: int) -> torch.Tensor:
        """The token slots of ``group``'s page shape (see the module docstring)."""
        return self.flats[self.layout.group_class[group]]

    def group_page_stride(self, group: int) -> int:
        return self.page_strides[self.layout.group_class[group]]

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    # ------------------------------------------------------------------------------------------ capacity
    def could_ever_fit(self, num_tokens: int) -> bool:
        return self.layout.blocks_needed(num_tokens, chunk=self.layout.block_size) <= self.pool.num_blocks

    def has_room(self, num_tokens: int) -> bool:
        """Free pages for a first chunk of ``num_tokens`` (cached pages are reclaimed by allocation too)."""
        return self.pool.num_free >= self.layout.blocks_needed(num_tokens, chunk=num_tokens)

    def describe(self) -> str:
        return f"{self.pool.num_blocks} blocks of {self.layout.block_size} tokens"

    def export(self, seq: SeqKV) -> KVSnapshot:
        return export_snapshot(self, seq)

    def adopt_prefix(self, tokens: list[int]) -> SeqKV:
        return adopt_cached_prefix(self, tokens)

    def import_snapshot(self, snap: KVSnapshot) -> SeqKV:
        """A new sequence holding ``snap``'s KV (private unless ``snap.shareable``). Raises ValueError for a recurrent
        state snapshot (a caller's mistake), SessionFileError when it does not fit (:meth:`check_snapshot`),
        CapacityError when the pool cannot hold it now."""
        if not isinstance(snap, KVSnapshot):
            raise ValueError("a recurrent state snapshot cannot restore a KV cache")
        return import_snapshot(self, snap)

    def check_snapshot(self, snap: object) -> None:
        """Raise SessionFileError unless ``snap`` fits this cache: a KVSnapshot of this layout (its fingerprint, when it
        carries one), the same block size and group kinds, each group's pages of that group's shape
        ``[n, layers_per_group, 2, block_size, kv_heads, head_dim]`` in a float dtype, block positions sorted, unique
        and inside its tokens, every block a next token can see present.

        Reads only the immutable layout: safe from any thread. Values (NaN, magnitudes) are the session file's check
        (``sessionfile.decode_session``); a snapshot this process exported is trusted.
        """
        check_snapshot(self.layout, snap)

    def reserve(self) -> None:
        self.buffer.zero_()

    def stats(self) -> dict:
        pool, page = self.pool, self.layout.page_bytes(self.dtype)
        return {
            "cache_kind": "paged",
            "blocks_total": pool.num_blocks, "blocks_used": pool.num_used, "blocks_free": pool.num_free,
            "blocks_cached": pool.num_cached, "block_size": self.layout.block_size,
            "kv_bytes_total": pool.num_blocks * page, "kv_bytes_used": pool.num_used * page,
            "prefix_queried_tokens": self.prefix_queried_tokens, "prefix_hit_tokens": self.prefix_hit_tokens,
            "cache_block_evictions": pool.evictions,
        }

    # ------------------------------------------------------------------------------------------ prefix reuse
    def _hashes(self, tokens: list[int], n_blocks: int, known: list[BlockHash]) -> list[BlockHash]:
        bs = self.layout.block_size
        hashes = list(known[:n_blocks])
        for b in range(len(hashes), n_blocks):
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[b * bs:(b + 1) * bs]))
        return hashes

    def match_prefix(self, tokens: list[int]) -> tuple[int, list[list[int | None]], list[BlockHash]]:
        """Longest block-aligned cached prefix usable for ``tokens`` (at least one token is left to compute).

        Returns (number of cached tokens, block tables to adopt, hashes of those blocks). A prefix of n blocks
        is usable when every full group has blocks 0..n-1 and every sliding group has the blocks covering the
        window before position n * block_size.
        """
        lay, pool = self.layout, self.pool
        bs = lay.block_size
        max_blocks = max(0, (len(tokens) - 1) // bs)
        hashes = self._hashes(tokens, max_blocks, [])
        full_groups = [g for g, k in enumerate(lay.group_kinds) if k == FULL]
        slide_groups = [g for g, k in enumerate(lay.group_kinds) if k == SLIDING]
        n = 0
        while n < max_blocks and all(pool.lookup((g, hashes[n])) is not None for g in full_groups):
            n += 1
        while n > 0:
            first = lay.first_visible(slide_groups[0], n * bs) // bs if slide_groups else n
            if all(pool.lookup((g, hashes[b])) is not None for g in slide_groups for b in range(first, n)):
                break
            n -= 1
        tables: list[list[int | None]] = []
        for g, kind in enumerate(lay.group_kinds):
            first = lay.first_visible(g, n * bs) // bs if kind == SLIDING else 0
            tables.append([None] * first + [pool.lookup((g, hashes[b])) for b in range(first, n)])
        return n * bs, tables, hashes[:n]

    def _evicted(self, block_id: int, key) -> None:
        """The pool dropped ``key``: forget a tail's index entry with it (its other groups' keys fail lookups)."""
        if isinstance(key, tuple) and len(key) == 4 and key[1] == TAIL:
            tails = self._tails.get(key[2])
            if tails is not None:
                tails.discard(key[3])
                if not tails:
                    del self._tails[key[2]]

    def _tail_keys(self, parent: BlockHash | None, tail: tuple[int, ...]) -> list[tuple]:
        return [(g, TAIL, parent, tail) for g in range(self.layout.num_groups)]

    def _register_tail(self, seq: SeqKV) -> None:
        """Cache ``seq``'s partial last block before it is freed, when ``seq`` is its only holder in every group (a
        fork's shared tail may still be written in place by the other holder)."""
        bs, n = self.layout.block_size, seq.num_computed
        index, count = n // bs, n % bs
        if seq.private or not count or not self.pool.enable_caching or len(seq.hashes) < index:
            return
        blocks = [table[index] if len(table) > index else None for table in seq.tables]
        if any(b is None or self.pool.ref_count(b) != 1 or self.pool.cache_key_of(b) is not None for b in blocks):
            return
        parent = seq.hashes[index - 1] if index else None
        tail = tuple(seq.tokens[index * bs:n])
        keys = self._tail_keys(parent, tail)
        for key in keys:  # a stale holder of the key (its tail lost another group's block): drop it
            old = self.pool.lookup(key)
            if old is not None:
                self.pool.uncache([old])
        for b, key in zip(blocks, keys):
            self.pool.cache_block(b, key)
        self._tails.setdefault(parent, set()).add(tail)

    def _adopt_tail(self, tokens: list[int], n: int, tables: list[list[int | None]],
                    hashes: list[BlockHash]) -> int:
        """After ``n`` block-aligned cached tokens (their blocks touched): adopt the cached partial block that
        continues them with the most of ``tokens`` (leaving one to compute), appending it to ``tables``. Returns the
        tokens it adds (0: none)."""
        bs = self.layout.block_size
        parent = hashes[-1] if n else None
        want = tokens[n:min(n + bs, len(tokens) - 1)]
        best, best_keep, best_blocks = None, 0, None
        for tail in list(self._tails.get(parent, ())):
            keep = 0
            while keep < min(len(tail), len(want)) and tail[keep] == want[keep]:
                keep += 1
            if keep <= best_keep:
                continue
            blocks = [self.pool.lookup(key) for key in self._tail_keys(parent, tail)]
            if any(b is None for b in blocks):
                continue
            best, best_keep, best_blocks = tail, keep, blocks
        if best is None:
            return 0
        self.pool.touch(best_blocks)
        self.pool.uncache(best_blocks)  # the adopter writes into it from ``best_keep`` on: nobody else may match it
        for g, (table, b) in enumerate(zip(tables, best_blocks)):
            table.append(b)
            self.views[self.layout.group_class[g]][b, :, :, best_keep:].zero_()  # another sequence's tokens
        return best_keep

    def start(self, tokens: list[int], checkpoints: Iterable[int] = ()) -> SeqKV:
        """A new sequence for ``tokens``, adopting whatever prefix is cached, full blocks and then a partial one
        (full blocks are shared by themselves: ``checkpoints``, which a recurrent state cache snapshots at, need
        nothing here)."""
        seq = SeqKV(self.layout.num_groups)
        n, tables, hashes = self.match_prefix(tokens)
        for table in tables:
            self.pool.touch([b for b in table if b is not None])
        n += self._adopt_tail(tokens, n, tables, hashes)
        seq.tokens, seq.num_computed, seq.tables, seq.hashes = list(tokens), n, tables, hashes
        seq.num_registered = len(hashes)
        seq.cached_at_start = n
        self.prefix_queried_tokens += len(tokens)
        self.prefix_hit_tokens += n
        return seq

    def resume(self, seq: SeqKV, tokens: list[int]) -> bool:
        """Continue a parked ``seq`` with ``tokens`` if they extend its computed ones (False, unchanged, if not)."""
        return resume_sequence(self, seq, tokens)

    def shared_prefix(self, seq: SeqKV, tokens: list[int]) -> int:
        """The full blocks ``tokens`` has in common with ``seq`` (a prefix match leaves one token to compute); 0
        for a private sequence, which registers none."""
        if seq.private or not self.pool.enable_caching:
            return 0
        bs = self.layout.block_size
        limit = min(len(seq.tokens), len(tokens) - 1) // bs
        n = 0
        while n < limit and seq.tokens[n * bs:(n + 1) * bs] == tokens[n * bs:(n + 1) * bs]:
            n += 1
        return n * bs

    def rematch(self, seq: SeqKV) -> int:
        """Before a sequence computes anything: adopt a longer cached prefix if one appeared since it started
        (requests arriving together: the first one's blocks are registered as its chunks complete). Returns the
        number of newly cached tokens."""
        n, tables, hashes = self.match_prefix(seq.tokens)
        if n <= seq.num_computed:
            return 0
        for table in tables:
            self.pool.touch([b for b in table if b is not None])
        self.free(seq)  # (before the tail: its own tail may be the one to adopt)
        n += self._adopt_tail(seq.tokens, n, tables, hashes)
        gained = n - seq.num_computed
        seq.num_computed, seq.tables, seq.hashes, seq.num_registered = n, tables, hashes, len(hashes)
        seq.cached_at_start = n
        seq.private = False  # its own KV is gone: it now holds only shared blocks and computes on top of them
        self.prefix_hit_tokens += gained
        return gained

    def fork(self, seq: SeqKV) -> SeqKV:
        """A child sharing every block of ``seq`` (the partial last block is copied when first written)."""
        child = SeqKV(self.layout.num_groups)
        child.tokens = list(seq.tokens[:seq.num_computed])
        child.num_computed = seq.num_computed
        child.tables = [list(t) for t in seq.tables]
        child.hashes = list(seq.hashes)
        child.num_registered = seq.num_registered
        child.private = seq.private  # a fork computes on top of its parent's KV: private stays private
        self.pool.touch(child.held_blocks())
        return child

    # ------------------------------------------------------------------------------------------ allocation
    def blocks_to_allocate(self, seq: SeqKV, n: int) -> int:
        """Pages needed to compute the next ``n`` tokens (new blocks plus copy-on-write of a shared tail)."""
        bs = self.layout.block_size
        start, end = seq.num_computed, seq.num_computed + n
        need = 0
        for table in seq.tables:
            need += max(0, (end + bs - 1) // bs - len(table))
            if start % bs and len(table) > start // bs:
                tail = table[start // bs]
                if tail is not None and self.pool.ref_count(tail) > 1:
                    need += 1
        return need

    def release_out_of_window(self, seq: SeqKV) -> None:
        """Free sliding-group blocks that no query at or after ``num_computed`` can see."""
        bs = self.layout.block_size
        for g, kind in enumerate(self.layout.group_kinds):
            if kind != SLIDING:
                continue
            table = seq.tables[g]
            last_dead = self.layout.first_visible(g, seq.num_computed) // bs  # blocks < this are invisible
            dead = [b for b in table[:last_dead] if b is not None]
            if dead:
                self.pool.free_blocks(reversed(dead))
                table[:last_dead] = [None] * min(last_dead, len(table))

    def allocate(self, seq: SeqKV, n: int) -> int:
        """Make room for computing tokens [num_computed, num_computed + n); returns n. Raises CapacityError with the
        pool unchanged (released out-of-window blocks aside: no query could see them)."""
        self.release_out_of_window(seq)
        need = self.blocks_to_allocate(seq, n)
        if need > self.pool.num_free:
            raise CapacityError(f"need {need} KV blocks, {self.pool.num_free} free")
        bs = self.layout.block_size
        start, end = seq.num_computed, seq.num_computed + n
        for table in seq.tables:
            if start % bs and len(table) > start // bs:
                self._copy_on_write(table, start // bs)
            missing = (end + bs - 1) // bs - len(table)
            if missing > 0:
                table.extend(self._new_blocks(missing))
        return n

    def _new_blocks(self, n: int) -> list[int]:
        ids = self.pool.get_new_blocks(n)
        self.buffer.index_fill_(0, torch.tensor(ids, device=self.device), 0)
        return ids

    def _copy_on_write(self, table: list[int | None], index: int) -> None:
        old = table[index]
        if old is None or self.pool.ref_count(old) == 1:
            return
        (new,) = self.pool.get_new_blocks(1)
        self.buffer[new].copy_(self.buffer[old])
        self.pool.free_blocks([old])
        table[index] = new

    def commit(self, seq: SeqKV, n: int) -> None:
        """Mark n more tokens computed; register blocks that just became full in the prefix cache; release
        sliding-window blocks no later query can see (an idle session holds only its windows)."""
        seq.num_computed += n
        bs = self.layout.block_size
        full = seq.num_computed // bs
        if full > seq.num_registered:
            seq.hashes = self._hashes(seq.tokens, full, seq.hashes)
            if not seq.private:  # a private sequence's blocks are never shared (module docstring)
                for b in range(seq.num_registered, full):
                    for g, table in enumerate(seq.tables):
                        if table[b] is not None:
                            self.pool.cache_block(table[b], (g, seq.hashes[b]))
            seq.num_registered = full
        self.release_out_of_window(seq)

    def free(self, seq: SeqKV) -> None:
        """Return every block of ``seq`` (tail first, so its tail is evicted before its head); its partial last
        block stays in the prefix cache (see the module docstring)."""
        self._register_tail(seq)
        self._release(seq)

    def _release(self, seq: SeqKV) -> None:
        for table in seq.tables:
            held = [b for b in table if b is not None]
            self.pool.free_blocks(reversed(held))
            table.clear()
        seq.num_computed = 0
        seq.num_registered = 0
        seq.hashes = []
        seq.private = False  # it holds nothing now; what it computes next comes from token ids

    def discard(self, seq: SeqKV) -> None:
        """Free ``seq`` and drop its blocks from the prefix cache (a failed step: its KV may be what failed)."""
        self.pool.uncache(seq.held_blocks())
        self._release(seq)

    # ------------------------------------------------------------------------------------------ indices
    def slot_base(self, seq: SeqKV, start: int, end: int, group: int) -> torch.Tensor:
        """Flat slot base (page * page stride + offset, in ``group_flat(group)``) of positions [start, end), as a CPU
        LongTensor; add the layer/K|V offset later. Every position must have a page."""
        bs = self.layout.block_size
        first, last = start // bs, (end - 1) // bs
        pages = torch.tensor(seq.tables[group][first:last + 1], dtype=torch.long)
        pos = torch.arange(start, end)
        return pages[pos // bs - first] * self.group_page_stride(group) + pos % bs

    def layer_offset(self, layer: int, kv: int) -> int:
        """Flat slots from a page's start to ``layer``'s K (kv=0) or V (kv=1): its source's, if it is KV-shared."""
        return (self.layout.layer_slot[layer] * 2 + kv) * self.layout.block_size

    def bytes_held(self, seq: SeqKV) -> int:
        return len(seq.held_blocks()) * self.layout.page_bytes(self.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVSnapshot:
    """A copy of one sequence's KV, independent of page ids: what session files and the store save.

    ``pages[g]`` is ``[n, layers_per_group, 2, block_size, kv_heads, head_dim]`` (group ``g``'s page shape) for the
    blocks group ``g`` still holds and ``index[g]`` their block positions in the sequence (a sliding group holds only
    its window). ``layout_fingerprint`` is the exporting layout's (``KVLayout.fingerprint``); None for a snapshot from
    a session file written before layouts had one (format version 1: one page shape), checked by shapes only.
    """

    tokens: tuple[int, ...]          # the tokens whose KV is stored (num_computed of them)
    block_size: int
    group_kinds: tuple[str, ...]
    pages: tuple[torch.Tensor, ...]
    index: tuple[tuple[int, ...], ...]
    shareable: bool = True           # False: restored as a private sequence (never in the prefix cache)
    layout_fingerprint: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pages)


def export_snapshot(cache: PagedKVCache, seq: SeqKV) -> KVSnapshot:
    """Copy ``seq``'s KV out of the pages (to CPU)."""
    lay = cache.layout
    pages, index = [], []
    for g, table in enumerate(seq.tables):
        pos = tuple(i for i, b in enumerate(table) if b is not None)
        ids = torch.tensor([table[i] for i in pos], dtype=torch.long, device=cache.device)
        pages.append(cache.views[lay.group_class[g]].index_select(0, ids).cpu())
        index.append(pos)
    return KVSnapshot(tokens=tuple(seq.tokens[:seq.num_computed]), block_size=lay.block_size,
                      group_kinds=lay.group_kinds, pages=tuple(pages), index=tuple(index),
                      shareable=not seq.private, layout_fingerprint=lay.fingerprint)


def import_snapshot(cache: PagedKVCache, snap: KVSnapshot) -> SeqKV:
    """A new sequence holding ``snap``'s KV in freshly allocated pages (private unless ``snap.shareable``). Raises
    SessionFileError when it does not fit, CapacityError (pool unchanged) when the pool cannot hold it now."""
    lay = cache.layout
    check_snapshot(lay, snap)
    need = sum(len(ix) for ix in snap.index)
    if need > cache.pool.num_free:
        raise CapacityError(f"restoring needs {need} KV blocks, {cache.pool.num_free} free")
    seq = SeqKV(lay.num_groups)
    seq.private = not snap.shareable
    n = snap.num_tokens
    n_blocks = (n + lay.block_size - 1) // lay.block_size
    for g, (pages, pos) in enumerate(zip(snap.pages, snap.index)):
        ids = cache.pool.get_new_blocks(len(pos)) if pos else []
        if ids:
            cache.views[lay.group_class[g]].index_copy_(0, torch.tensor(ids, device=cache.device),
                                                        pages.to(device=cache.device, dtype=cache.dtype))
        table: list[int | None] = [None] * n_blocks
        for p, b in zip(pos, ids):
            table[p] = b
        seq.tables[g] = table
    seq.tokens = list(snap.tokens)
    seq.num_computed = 0
    cache.commit(seq, n)  # registers the full blocks in the prefix cache (none when private)
    return seq


def check_snapshot(lay: KVLayout, snap: object) -> None:
    """Refuse (SessionFileError) a snapshot that does not fit ``lay`` (see :meth:`PagedKVCache.check_snapshot`)."""
    if not isinstance(snap, KVSnapshot):
        raise SessionFileError("the snapshot is not paged KV (a recurrent state?); it does not fit this model's cache")
    if snap.block_size != lay.block_size:
        raise SessionFileError(f"KV blocks of {snap.block_size} tokens; this engine uses {lay.block_size}")
    if tuple(snap.group_kinds) != lay.group_kinds:
        raise SessionFileError(f"KV layer groups {list(snap.group_kinds)} do not match this model's "
                               f"{list(lay.group_kinds)}")
    if len(snap.pages) != lay.num_groups or len(snap.index) != lay.num_groups:
        raise SessionFileError(f"{len(snap.pages)} page tensors and {len(snap.index)} block indexes for "
                               f"{lay.num_groups} KV groups")
    for g, (pages, pos) in enumerate(zip(snap.pages, snap.index)):
        _check_group(lay, g, pages, pos, snap.num_tokens)
    # last: the checks above name what differs; this one catches what shapes cannot show (which layer reads which slot)
    if snap.layout_fingerprint is not None and snap.layout_fingerprint != lay.fingerprint:
        raise SessionFileError("the snapshot was made with another KV layout (layer groups, page shapes, KV-shared "
                               "layers or window); it does not fit this model's cache")


def _check_group(lay: KVLayout, g: int, pages: object, pos: object, n: int) -> None:
    """One group's pages and block positions: shape, dtype, positions sorted, unique, inside, covering the window."""
    bs = lay.block_size
    n_blocks = (n + bs - 1) // bs
    lpg, kvh, hd = lay.group_shapes[g]
    shape = (lpg, 2, bs, kvh, hd)
    if not isinstance(pages, torch.Tensor) or not pages.is_floating_point():
        raise SessionFileError(f"KV group {g}: pages must be a float tensor")
    if not isinstance(pos, tuple) or any(type(p) is not int for p in pos):
        raise SessionFileError(f"KV group {g}: block positions must be a tuple of ints")
    if pages.dim() != 6 or tuple(pages.shape[1:]) != shape or pages.shape[0] != len(pos):
        raise SessionFileError(f"KV group {g}: pages of shape {list(pages.shape)}, expected "
                               f"[{len(pos)}, {', '.join(map(str, shape))}] (layers, K/V, block, kv heads, head dim)")
    if any(p < 0 or p >= n_blocks for p in pos):
        raise SessionFileError(f"KV group {g}: block positions outside the sequence's {n_blocks} blocks")
    if any(a >= b for a, b in zip(pos, pos[1:])):
        raise SessionFileError(f"KV group {g}: block positions are not sorted and unique")
    first = lay.first_visible(g, n) // bs if lay.group_kinds[g] == SLIDING else 0
    if n and set(range(first, n_blocks)) - set(pos):
        raise SessionFileError(f"KV group {g}: the snapshot lacks blocks a next token must see")
