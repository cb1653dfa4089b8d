"""Block pool and prefix-hash tests: exact white-box expectations plus a stateful model check.

The white-box tests pin the exact block ids handed out and the exact eviction order (strict LRU free queue,
freed blocks joining the tail in the order given). The state machine runs random allocate / extend / share /
fork / free / cache / evict sequences against a pure-Python reference model of the free queue, the refcounts
and the cached map, and compares everything after every step.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gemma_sessions.cache.blocks import FreeBlockQueue, KVBlock, hash_block_tokens, hash_token_blocks
from gemma_sessions.cache.pool import BlockPool
from gemma_sessions.errors import CapacityError


def snapshot(pool: BlockPool) -> tuple:
    """Everything observable about a pool, for 'state unchanged' checks."""
    refs = tuple(pool.ref_count(i) for i in range(pool.num_blocks))
    keys = tuple(pool.cache_key_of(i) for i in range(pool.num_blocks))
    return (pool.free_block_ids(), refs, keys, pool.num_cached, pool.hits, pool.queries, pool.evictions)


def key(i: int) -> tuple[int, bytes]:
    return (0, bytes([i]) * 16)


# ------------------------------------------------------------------------------------------------ white box
class TestExactOrder:
    def test_lru_allocation_and_eviction_order(self) -> None:
        evicted: list[tuple[int, object]] = []
        pool = BlockPool(10, on_evict=lambda b, k: evicted.append((b, k)))
        assert pool.free_block_ids() == list(range(10))
        assert pool.get_new_blocks(3) == [0, 1, 2]
        assert pool.get_new_blocks(2) == [3, 4]
        assert (pool.num_used, pool.num_free) == (5, 5)
        for b in (0, 1, 2):
            assert pool.cache_block(b, key(b)) is True
        assert pool.num_cached == 3
        assert pool.cache_key_of(1) == key(1)

        pool.free_blocks([2, 1, 0])  # a sequence's blocks, tail first
        assert pool.free_block_ids() == [5, 6, 7, 8, 9, 2, 1, 0]
        assert (pool.num_used, pool.num_free, pool.num_cached) == (2, 8, 3)
        assert pool.lookup(key(1)) == 1  # still cached while free
        pool.check_invariants()

        assert pool.get_new_blocks(4) == [5, 6, 7, 8]
        assert evicted == [] and pool.evictions == 0
        assert pool.get_new_blocks(3) == [9, 2, 1]
        assert evicted == [(2, key(2)), (1, key(1))]
        assert pool.evictions == 2
        assert pool.free_block_ids() == [0]
        assert pool.lookup(key(2)) is None
        assert pool.lookup(key(1)) is None
        assert pool.lookup(key(0)) == 0
        assert pool.cache_key_of(2) is None and pool.num_cached == 1
        assert [pool.ref_count(i) for i in range(10)] == [0] + [1] * 9
        pool.check_invariants()

        pool.touch([0])  # a prefix hit re-takes the cached free block
        assert pool.free_block_ids() == []
        assert (pool.ref_count(0), pool.num_free, pool.num_used) == (1, 0, 10)
        assert pool.cache_key_of(0) == key(0)
        assert pool.usage == 1.0
        pool.check_invariants()

    def test_touch_removes_cached_block_from_middle_of_queue(self) -> None:
        pool = BlockPool(6)
        assert pool.get_new_blocks(4) == [0, 1, 2, 3]
        pool.cache_block(1, key(1))
        pool.free_blocks([3, 2, 1, 0])
        assert pool.free_block_ids() == [4, 5, 3, 2, 1, 0]
        pool.touch([1, 1])  # two sharers
        assert pool.free_block_ids() == [4, 5, 3, 2, 0]
        assert pool.ref_count(1) == 2
        pool.free_blocks([1])
        assert pool.free_block_ids() == [4, 5, 3, 2, 0]
        pool.free_blocks([1])
        assert pool.free_block_ids() == [4, 5, 3, 2, 0, 1]  # back at the MRU tail
        assert pool.get_new_blocks(6) == [4, 5, 3, 2, 0, 1]
        assert pool.evictions == 1 and pool.num_cached == 0
        pool.check_invariants()

    def test_shared_block_freed_only_at_last_reference(self) -> None:
        pool = BlockPool(4)
        assert pool.get_new_blocks(2) == [0, 1]
        pool.touch([0, 1])  # fork
        pool.free_blocks([1, 0])
        assert pool.free_block_ids() == [2, 3]
        assert (pool.ref_count(0), pool.ref_count(1)) == (1, 1)
        pool.free_blocks([0, 1])  # order given is the eviction order
        assert pool.free_block_ids() == [2, 3, 0, 1]
        assert pool.num_used == 0
        pool.check_invariants()

    def test_lookup_counters(self) -> None:
        pool = BlockPool(4)
        pool.get_new_blocks(1)
        pool.cache_block(0, key(7))
        assert pool.lookup(key(8)) is None
        assert (pool.hits, pool.queries) == (0, 1)
        assert pool.lookup(key(7)) == 0
        assert (pool.hits, pool.queries) == (1, 2)
        assert pool.lookup(key(7)) == 0
        assert (pool.hits, pool.queries) == (2, 3)

    def test_capacity_error_leaves_state_unchanged(self) -> None:
        pool = BlockPool(5)
        pool.get_new_blocks(2)
        pool.cache_block(1, key(1))
        pool.free_blocks([1])
        before = snapshot(pool)
        with pytest.raises(CapacityError):
            pool.get_new_blocks(5)
        assert snapshot(pool) == before
        assert pool.get_new_blocks(4) == [2, 3, 4, 1]  # exactly the free count still works
        with pytest.raises(CapacityError):
            pool.get_new_blocks(1)
        assert pool.get_new_blocks(0) == []
        with pytest.raises(ValueError):
            pool.get_new_blocks(-1)
        pool.check_invariants()

    def test_double_free_raises_and_leaves_state_unchanged(self) -> None:
        pool = BlockPool(4)
        pool.get_new_blocks(2)
        pool.free_blocks([0])
        before = snapshot(pool)
        with pytest.raises(ValueError, match="double free"):
            pool.free_blocks([0])
        with pytest.raises(ValueError, match="double free"):
            pool.free_blocks([1, 1])  # ref_cnt 1, freed twice in one call
        assert snapshot(pool) == before
        assert pool.ref_count(1) == 1
        pool.check_invariants()

    def test_bad_ids_raise_value_error(self) -> None:
        pool = BlockPool(3)
        pool.get_new_blocks(1)
        before = snapshot(pool)
        for bad in (-1, 3, "0", 1.0):
            with pytest.raises(ValueError):
                pool.touch([0, bad])
            with pytest.raises(ValueError):
                pool.free_blocks([0, bad])
        assert snapshot(pool) == before
        with pytest.raises(ValueError):
            BlockPool(0)

    def test_touch_uncached_free_block_raises(self) -> None:
        pool = BlockPool(3)
        pool.get_new_blocks(1)
        before = snapshot(pool)
        with pytest.raises(ValueError, match="not cached"):
            pool.touch([0, 2])
        assert snapshot(pool) == before


class TestCacheMap:
    def test_first_registration_wins(self) -> None:
        pool = BlockPool(4)
        pool.get_new_blocks(2)
        assert pool.cache_block(0, key(1)) is True
        assert pool.cache_block(1, key(1)) is False
        assert pool.lookup(key(1)) == 0
        assert pool.cache_key_of(1) is None
        assert pool.cache_block(0, key(1)) is True  # idempotent
        assert pool.num_cached == 1
        pool.check_invariants()

    def test_one_key_per_block_and_only_used_blocks(self) -> None:
        pool = BlockPool(4)
        pool.get_new_blocks(1)
        pool.cache_block(0, key(1))
        with pytest.raises(ValueError, match="already cached"):
            pool.cache_block(0, key(2))
        with pytest.raises(ValueError, match="free"):
            pool.cache_block(3, key(3))
        with pytest.raises(ValueError):
            pool.cache_block(0, None)
        assert pool.num_cached == 1 and pool.lookup(key(2)) is None

    def test_caching_disabled(self) -> None:
        pool = BlockPool(2, enable_caching=False)
        pool.get_new_blocks(1)
        assert pool.cache_block(0, key(1)) is False
        assert pool.lookup(key(1)) is None
        assert pool.num_cached == 0

    def test_evict_cached_lru_first_skips_uncached(self) -> None:
        evicted: list[int] = []
        pool = BlockPool(6, on_evict=lambda b, k: evicted.append(b))
        assert pool.get_new_blocks(5) == [0, 1, 2, 3, 4]
        for b in (0, 2, 3, 4):
            pool.cache_block(b, key(b))
        pool.free_blocks([3, 1, 0, 2])  # 4 stays used
        assert pool.free_block_ids() == [5, 3, 1, 0, 2]
        assert pool.evict_cached(2) == 2
        assert evicted == [3, 0]
        assert pool.free_block_ids() == [5, 3, 1, 0, 2]  # eviction does not move blocks
        assert pool.evict_cached(5) == 1
        assert evicted == [3, 0, 2]
        assert pool.evict_cached(5) == 0
        assert pool.lookup(key(4)) == 4  # used blocks are never evicted
        assert (pool.num_cached, pool.evictions) == (1, 3)
        pool.check_invariants()

    def test_reset_prefix_cache_keeps_used_blocks(self) -> None:
        pool = BlockPool(4)
        pool.get_new_blocks(3)
        for b in range(3):
            pool.cache_block(b, key(b))
        pool.free_blocks([0, 1])
        assert pool.reset_prefix_cache() == 2
        assert [pool.lookup(key(b)) for b in range(3)] == [None, None, 2]
        assert pool.free_block_ids() == [3, 0, 1]
        pool.check_invariants()


class TestFreeBlockQueue:
    def test_operations(self) -> None:
        blocks = [KVBlock(i) for i in range(4)]
        q = FreeBlockQueue(blocks)
        assert len(q) == 4
        q.remove(blocks[2])
        assert [b.block_id for b in q.get_all_free_blocks()] == [0, 1, 3]
        assert q.popleft() is blocks[0]
        q.append(blocks[2])
        q.append_n([blocks[0]])
        assert [b.block_id for b in q.get_all_free_blocks()] == [1, 3, 2, 0]
        assert len(q) == 4
        with pytest.raises(ValueError):
            q.append(blocks[1])  # already queued
        for _ in range(4):
            q.popleft()
        assert len(q) == 0 and q.get_all_free_blocks() == []
        with pytest.raises(ValueError):
            q.popleft()
        with pytest.raises(ValueError):
            q.remove(blocks[1])  # not queued


# ------------------------------------------------------------------------------------------------ hashes
class TestHashes:
    def test_known_values(self) -> None:
        # Hard-coded once: a change here means the on-disk / cross-process hash encoding changed.
        h0 = hash_block_tokens(None, [1, 2, 3, 4])
        assert h0.hex() == "fb377b69999dd074fc5099ccddb3a79f"
        h1 = hash_block_tokens(h0, [5, 6, 7, 8], ("lora", 1))
        assert h1.hex() == "eeca9599a73626bb40232a1976a56e49"
        assert len(h0) == 16 and isinstance(h0, bytes)

    def test_deterministic_and_sensitive(self) -> None:
        base = hash_block_tokens(None, [1, 2, 3, 4])
        assert hash_block_tokens(None, (1, 2, 3, 4)) == base
        variants = {
            base,
            hash_block_tokens(b"\x00" * 16, [1, 2, 3, 4]),
            hash_block_tokens(base, [1, 2, 3, 4]),
            hash_block_tokens(None, [1, 2, 3, 5]),
            hash_block_tokens(None, [1, 2, 3]),
            hash_block_tokens(None, [1, 2, 3, 4], ("a",)),
            hash_block_tokens(None, [1, 2, 3, 4], (1,)),
            hash_block_tokens(None, [1, 2, 3, 4], ("1",)),
            hash_block_tokens(None, [1, 2, 3, 4], ((1,),)),
        }
        assert len(variants) == 9

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=8),
        st.integers(0, 7),
        st.integers(1, 50),
    )
    def test_any_token_change_changes_hash(self, tokens: list[int], pos: int, delta: int) -> None:
        pos %= len(tokens)
        other = list(tokens)
        other[pos] = other[pos] + delta if other[pos] + delta < 2**31 else other[pos] - delta
        assert hash_block_tokens(None, tokens) != hash_block_tokens(None, other)

    def test_bad_extra_keys_and_tokens(self) -> None:
        with pytest.raises(TypeError):
            hash_block_tokens(None, [1], (1.5,))
        with pytest.raises(struct.error):  # token outside int32
            hash_block_tokens(None, [2**31])

    def test_token_blocks_chain_and_partial_tail(self) -> None:
        tokens = list(range(10))
        hashes = hash_token_blocks(tokens, 4)
        assert len(hashes) == 2  # 10 tokens = 2 full blocks + a partial block without a hash
        h0 = hash_block_tokens(None, tokens[0:4])
        assert hashes == [h0, hash_block_tokens(h0, tokens[4:8])]
        assert hash_token_blocks(tokens[:8], 4) == hashes
        assert hash_token_blocks(tokens[:7], 4) == hashes[:1]
        assert hash_token_blocks(tokens[:3], 4) == []
        assert hash_token_blocks(tokens[4:8], 4, parent=h0) == hashes[1:]
        extra = hash_token_blocks(tokens, 4, extra_keys=("img",))
        assert len(extra) == 2 and not set(extra) & set(hashes)
        with pytest.raises(ValueError):
            hash_token_blocks(tokens, 0)

    def test_prefix_property(self) -> None:
        a = hash_token_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
        b = hash_token_blocks([1, 2, 3, 4, 9, 9, 9, 9], 4)
        c = hash_token_blocks([0, 2, 3, 4, 5, 6, 7, 8], 4)
        assert a[0] == b[0] and a[1] != b[1]
        assert a[0] != c[0] and a[1] != c[1]  # a change in block 0 changes every later hash


# ------------------------------------------------------------------------------------------------ model check
class BlockPoolMachine(RuleBasedStateMachine):
    """Random operations against a reference model of the LRU queue, refcounts and cached map."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: BlockPool
        self.seqs: dict[int, list[int]] = {}
        self.next_seq = 0
        self.free: list[int] = []  # model free queue, head (LRU) first
        self.key_of: dict[int, object] = {}  # block -> cache key
        self.evicted: list[int] = []
        self.expect_evicted: list[int] = []

    @initialize(num_blocks=st.integers(3, 12))
    def setup(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks, on_evict=lambda b, k: self.evicted.append(b))
        self.free = list(range(num_blocks))

    # --- model helpers ---------------------------------------------------------------------------------
    def _expected_refs(self) -> list[int]:
        refs = [0] * self.pool.num_blocks
        for blocks in self.seqs.values():
            for b in blocks:
                refs[b] += 1
        return refs

    def _new_seq(self, blocks: list[int]) -> None:
        self.seqs[self.next_seq] = blocks
        self.next_seq += 1

    def _model_allocate(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        for b in taken:
            if self.key_of.pop(b, None) is not None:
                self.expect_evicted.append(b)
        return taken

    def _model_free(self, blocks: list[int]) -> None:
        refs = self._expected_refs()
        for b in blocks:
            refs[b] -= 1
            if refs[b] == 0:
                self.free.append(b)

    def _allocate_into(self, n: int, seq: int | None) -> None:
        if n > len(self.free):
            before = snapshot(self.pool)
            with pytest.raises(CapacityError):
                self.pool.get_new_blocks(n)
            assert snapshot(self.pool) == before
            return
        expected = self._model_allocate(n)
        assert self.pool.get_new_blocks(n) == expected
        if seq is None:
            self._new_seq(expected)
        else:
            self.seqs[seq].extend(expected)

    # --- rules ---------------------------------------------------------------------------------------
    @rule(n=st.integers(0, 5))
    def allocate(self, n: int) -> None:
        self._allocate_into(n, None)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(1, 3))
    def extend(self, data: st.DataObject, n: int) -> None:
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        self._allocate_into(n, seq)

    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        """A prefix hit: look up a cached block (used or free) and take a reference for a new sequence."""
        if not self.key_of:
            assert self.pool.lookup(("never", b"")) is None
            return
        block = data.draw(st.sampled_from(sorted(self.key_of)))
        assert self.pool.lookup(self.key_of[block]) == block
        self.pool.touch([block])
        if block in self.free:
            self.free.remove(block)
        self._new_seq([block])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        blocks = list(self.seqs[seq])
        self.pool.touch(blocks)  # all held, so none is in the free queue
        self._new_seq(blocks)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free_seq(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        order = self.seqs[seq][::-1]
        self._model_free(order)  # computes refs with the sequence still live
        del self.seqs[seq]
        self.pool.free_blocks(order)

    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        block = data.draw(st.integers(0, self.pool.num_blocks - 1))
        before = snapshot(self.pool)
        with pytest.raises(ValueError):
            self.pool.free_blocks([block] * (self._expected_refs()[block] + 1))
        assert snapshot(self.pool) == before

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), k=st.integers(0, 5))
    def cache(self, data: st.DataObject, k: int) -> None:
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        if not self.seqs[seq]:
            return
        block = data.draw(st.sampled_from(self.seqs[seq]))
        new_key = key(k)
        owner = {v: b for b, v in self.key_of.items()}.get(new_key)
        current = self.key_of.get(block)
        if current is not None and current != new_key:
            with pytest.raises(ValueError):
                self.pool.cache_block(block, new_key)
        elif current == new_key:
            assert self.pool.cache_block(block, new_key) is True
        elif owner is not None:
            assert self.pool.cache_block(block, new_key) is False
        else:
            assert self.pool.cache_block(block, new_key) is True
            self.key_of[block] = new_key

    @rule(n=st.integers(0, 4))
    def evict_cached(self, n: int) -> None:
        victims = [b for b in self.free if b in self.key_of][:n]
        for b in victims:
            del self.key_of[b]
        self.expect_evicted.extend(victims)
        assert self.pool.evict_cached(n) == len(victims)

    # --- invariants ----------------------------------------------------------------------------------
    @invariant()
    def matches_model(self) -> None:
        pool = self.pool
        pool.check_invariants()
        refs = self._expected_refs()
        assert [pool.ref_count(i) for i in range(pool.num_blocks)] == refs
        assert pool.free_block_ids() == self.free
        assert pool.num_free + pool.num_used == pool.num_blocks
        assert pool.num_used == sum(1 for r in refs if r > 0)
        assert [pool.cache_key_of(i) for i in range(pool.num_blocks)] == [
            self.key_of.get(i) for i in range(pool.num_blocks)
        ]
        assert pool.num_cached == len(self.key_of)
        assert self.evicted == self.expect_evicted
        assert pool.evictions == len(self.expect_evicted)

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        for seq in sorted(self.seqs):
            self.pool.free_blocks(self.seqs[seq][::-1])
        assert self.pool.num_used == 0
        assert self.pool.num_free == self.pool.num_blocks
        self.pool.check_invariants()


BlockPoolMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestBlockPoolMachine = BlockPoolMachine.TestCase
