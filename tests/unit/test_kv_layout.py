"""The paged KV cache over layer groups that differ in head size and KV heads, with KV-shared layers (Gemma 4).

Synthetic layer shapes (``Shapes``, a ``LayerShapes``) with two head sizes, two KV-head counts and KV-shared layers:

* layouts: Gemma 1/2/3 exactly as before (the pre-Gemma-4 rule, written out here); Gemma 4's published shapes (E2B,
  E4B, 31B) in pages of one size without padding; padding only where the shapes leave no other way;
* page accounting: shared layers own no pages, full groups keep every block, sliding groups their window;
* prefix reuse across sequences with sliding windows, fork and copy on write, eviction, export / import and the
  session file, ``check_snapshot`` refusing another layout;
* ``PagedBatch.attend`` for mixed widths and shared layers (``attend(layer, q, None, None)``) against a dense torch
  attention written here, over prefill chunks, decode rows, a fork, a cached prefix and past the window.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma_sessions.cache.kv import KVLayout, KVSnapshot, PagedKVCache
from gemma_sessions.cache.layout import LayerShapes
from gemma_sessions.config import FULL, SLIDING
from gemma_sessions.engine.runner import PagedBatch
from gemma_sessions.engine.work import WorkItem
from gemma_sessions.errors import CapacityError, ModelError, SessionFileError
from gemma_sessions.kernels.stack import StackKV
from gemma_sessions.sessions.sessionfile import decode_session, encode_session
from gemma_sessions.testing import tiny_config

CPU = torch.device("cpu")
S, F = SLIDING, FULL


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shapes:
    """Explicit layer shapes: (kv heads, head dim) per kind; the last ``shared`` layers read the last earlier layer of
    their kind (Gemma 4's rule)."""

    layer_types: tuple[str, ...]
    sliding: tuple[int, int]
    full: tuple[int, int]
    shared: int = 0
    sliding_window: int | None = 8

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def layer_kv_heads(self, layer: int) -> int:
        return (self.sliding if self.layer_types[layer] == S else self.full)[0]

    def layer_head_dim(self, layer: int) -> int:
        return (self.sliding if self.layer_types[layer] == S else self.full)[1]

    def kv_source(self, layer: int) -> int:
        first = self.num_layers - self.shared
        if layer < first:
            return layer
        return max(j for j in range(first) if self.layer_types[j] == self.layer_types[layer])


def gemma4(n: int, period: int, sliding: tuple[int, int], full: tuple[int, int], shared: int, window: int) -> Shapes:
    return Shapes(layer_types=tuple(F if (i + 1) % period == 0 else S for i in range(n)), sliding=sliding, full=full,
                  shared=shared, sliding_window=window)


# 10 layers, the last 4 shared: owners 0..5 (sliding 0 1 2 3 5 of 2 x 8, full 4 of 1 x 32): 16 and 32 elements per
# token and layer over 5 and 1 layers leave no page size without an empty slot: padding (see test_padding_...)
MIXED = Shapes(layer_types=(S, S, S, S, F, S, S, S, S, F), sliding=(2, 8), full=(1, 32), shared=4)
# 8 layers, the last 2 shared: sliding 0 1 3 4 (2 x 8), full 2 5 (1 x 32): one sliding group of 4, one full of 2
EVEN = Shapes(layer_types=(S, S, F, S, S, F, S, F), sliding=(2, 8), full=(1, 32), shared=2)
# MIXED at Gemma 4's widths (256-wide sliding, 512-wide full, 1 KV head): the compiled decode kernel's wide path
WIDE = dataclasses.replace(MIXED, sliding=(1, 256), full=(1, 512))
HQ = 4
SCALE = 0.3  # (the attention tests scale by 2 / sqrt(widest head dim): scores of a few units, as in a real model)


def _cache(shapes: LayerShapes, blocks: int = 256, dtype: torch.dtype = torch.float32, bs: int = 4) -> PagedKVCache:
    cache = PagedKVCache(KVLayout.for_config(shapes, bs), blocks, dtype, CPU)
    cache.buffer.normal_()  # garbage where nothing was written: a page read before it is written shows
    return cache


def _run(cache: PagedKVCache, seq, n: int, chunk: int = 5) -> None:
    """Compute ``n`` more tokens of ``seq`` (bookkeeping only), ``chunk`` at a time."""
    while n > 0:
        m = cache.allocate(seq, min(chunk, n))
        cache.commit(seq, m)
        n -= m


# ---------------------------------------------------------------------------------------------- layouts
def _legacy(config) -> tuple:
    """The layout rule before layer shapes could differ (one shape; groups of gcd(full, sliding) layers)."""
    full = [i for i, t in enumerate(config.layer_types) if t == F]
    sliding = [i for i, t in enumerate(config.layer_types) if t == S]
    lpg = math.gcd(len(full), len(sliding)) if full and sliding else len(full or sliding)
    kinds, group, slot = [], [0] * config.num_layers, [0] * config.num_layers
    for kind, layers in ((F, full), (S, sliding)):
        for start in range(0, len(layers), lpg):
            for j, layer in enumerate(layers[start:start + lpg]):
                group[layer], slot[layer] = len(kinds), j
            kinds.append(kind)
    return lpg, tuple(kinds), tuple(group), tuple(slot)


@pytest.mark.parametrize("n,period", [(3, 0), (7, 6), (18, 6), (26, 6), (34, 6), (62, 6), (26, 2), (42, 2), (46, 2)])
def test_gemma_1_2_3_layouts_are_unchanged(n, period):
    types = tuple(S if period and (i + 1) % period else F for i in range(n))
    config = dataclasses.replace(tiny_config("gemma3"), num_layers=n, layer_types=types)
    lay = KVLayout.for_config(config, 16)
    lpg, kinds, group, slot = _legacy(config)
    assert (lay.layers_per_group, lay.group_kinds, lay.layer_group, lay.layer_slot) == (lpg, kinds, group, slot)
    assert lay.is_uniform and lay.kv_source == tuple(range(n))
    cache = PagedKVCache(lay, 10, torch.float32, CPU)
    kvh, hd = config.num_kv_heads, config.head_dim
    assert cache.storage.shape == (10, lpg, 2, 16, kvh, hd) and cache.storage.is_contiguous()
    assert cache.flat.shape == (10 * lpg * 2 * 16, kvh, hd) and cache.page_stride == lpg * 2 * 16
    assert cache.flat.data_ptr() == cache.buffer.data_ptr() == cache.storage.data_ptr()
    assert lay.page_bytes(torch.bfloat16) == lpg * 2 * 16 * kvh * hd * 2


@pytest.mark.parametrize("name,shapes,groups", [
    # E2B: 35 layers (4 sliding : 1 full), 1 KV head, 256 / 512 wide, the last 20 layers shared (owners 0..14)
    ("E2B", gemma4(35, 5, (1, 256), (1, 512), 20, 512), [(F, (3, 1, 512), 1), (S, (6, 1, 256), 2)]),
    # E4B: 42 layers (5 : 1), 2 KV heads, the last 18 shared (owners 0..23: 20 sliding, 4 full)
    ("E4B", gemma4(42, 6, (2, 256), (2, 512), 18, 512), [(F, (2, 2, 512), 2), (S, (4, 2, 256), 5)]),
    # 31B: 60 layers (5 : 1), 16 KV heads sliding, 4 full (512 wide), nothing shared
    ("31B", gemma4(60, 6, (16, 256), (4, 512), 0, 1024), [(F, (10, 4, 512), 1), (S, (5, 16, 256), 10)]),
])
def test_gemma4_layouts_share_one_page_size_without_padding(name, shapes, groups):
    lay = KVLayout.for_config(shapes, 16)
    want_kinds = tuple(k for k, _, count in groups for _ in range(count))
    want_shapes = tuple(s for _, s, count in groups for _ in range(count))
    assert lay.group_kinds == want_kinds and lay.group_shapes == want_shapes, name
    assert len({lpg * kvh * hd for lpg, kvh, hd in lay.group_shapes}) == 1  # one page size
    owners = [i for i in range(shapes.num_layers) if shapes.kv_source(i) == i]
    assert sorted(j for members in lay.group_layers for j in members) == owners  # every owner once, no empty slot
    assert all(len(m) == s[0] for m, s in zip(lay.group_layers, lay.group_shapes))
    for i in range(shapes.num_layers):  # a shared layer reads exactly its source's slot
        src = shapes.kv_source(i)
        assert (lay.layer_group[i], lay.layer_slot[i]) == (lay.layer_group[src], lay.layer_slot[src])
        assert lay.group_layers[lay.layer_group[i]][lay.layer_slot[i]] == src
    assert not lay.is_uniform
    with pytest.raises(ValueError, match="page shapes"):
        _ = lay.layers_per_group


def test_padding_only_when_the_shapes_leave_no_other_way():
    lay = KVLayout.for_config(MIXED, 4)
    # 5 sliding owners of 16 elements, 1 full of 32: pages of 32 elements per token; the third sliding group has one
    # empty slot (6 slots for 5 layers), the smallest padding any page size allows
    assert lay.group_kinds == (F, S, S, S)
    assert lay.group_shapes == ((1, 1, 32), (2, 2, 8), (2, 2, 8), (2, 2, 8))
    assert lay.group_layers == ((4,), (0, 1), (2, 3), (5,))
    assert lay.kv_source == (0, 1, 2, 3, 4, 5, 5, 5, 5, 4)
    assert lay.layer_group == (1, 1, 2, 2, 0, 3, 3, 3, 3, 0) and lay.layer_slot == (0, 1, 0, 1, 0, 0, 0, 0, 0, 0)
    assert lay.page_elems == 32 * 2 * 4
    even = KVLayout.for_config(EVEN, 4)  # 4 x 16 and 2 x 32: one group each, no empty slot
    assert even.group_shapes == ((2, 1, 32), (4, 2, 8)) and even.group_layers == ((2, 5), (0, 1, 3, 4))


def test_unpageable_shapes_are_refused():
    with pytest.raises(ModelError, match="sliding_window"):
        KVLayout.for_config(dataclasses.replace(MIXED, sliding_window=None), 4)

    @dataclasses.dataclass(frozen=True)
    class OtherKind(Shapes):
        def kv_source(self, layer: int) -> int:
            return 0 if layer == 3 else layer  # a full layer reading a sliding one

    with pytest.raises(ModelError, match="another kind or shape"):
        KVLayout.for_config(OtherKind(layer_types=(S, S, S, F), sliding=(1, 8), full=(1, 8)), 4)

    @dataclasses.dataclass(frozen=True)
    class Chain(Shapes):
        def kv_source(self, layer: int) -> int:
            return {2: 1, 1: 0}.get(layer, layer)  # 2 reads 1, which reads 0: 1 owns nothing

    with pytest.raises(ModelError, match="earlier layer owning"):
        KVLayout.for_config(Chain(layer_types=(S,) * 3, sliding=(1, 8), full=(1, 8)), 4)


def test_a_shared_layer_must_read_an_earlier_owner_of_its_shape():
    @dataclasses.dataclass(frozen=True)
    class Later(Shapes):
        def kv_source(self, layer: int) -> int:
            return 3 if layer == 1 else layer

    with pytest.raises(ModelError, match="earlier layer"):
        KVLayout.for_config(Later(layer_types=(S,) * 4, sliding=(1, 8), full=(1, 8)), 4)

    @dataclasses.dataclass(frozen=True)
    class Wider(Shapes):
        def layer_head_dim(self, layer: int) -> int:
            return 16 if layer == 2 else 8

        def kv_source(self, layer: int) -> int:
            return 0 if layer == 2 else layer

    with pytest.raises(ModelError, match="another kind or shape"):
        KVLayout.for_config(Wider(layer_types=(S,) * 4, sliding=(1, 8), full=(1, 8)), 4)


def test_the_layer_shapes_protocol_fits_the_configs():
    assert isinstance(tiny_config("gemma3"), LayerShapes) and isinstance(MIXED, LayerShapes)
    c = tiny_config("gemma2")
    assert [(c.layer_kv_heads(i), c.layer_head_dim(i), c.kv_source(i)) for i in range(c.num_layers)] == \
        [(c.num_kv_heads, c.head_dim, i) for i in range(c.num_layers)]


# ---------------------------------------------------------------------------------------------- accounting
def test_pages_hold_only_owners_full_groups_everything_sliding_groups_their_window():
    cache = _cache(MIXED)
    lay, pool = cache.layout, cache.pool
    seq = cache.start(list(range(100, 141)))
    for n in range(0, 40, 5):
        _run(cache, seq, 5)
        done = n + 5
        for g, table in enumerate(seq.tables):
            held = [b for b in table if b is not None]
            first = lay.first_visible(g, done) // 4 if lay.group_kinds[g] == S else 0
            assert held == table[first:] and len(held) == -(-done // 4) - first, (done, g)
        assert pool.num_used == len(seq.held_blocks())  # nothing shared: every held block is one used page
        pool.check_invariants()
    # 4 groups for 10 layers: the 4 shared layers own nothing. Parked at 40 tokens: the full group 10 blocks, each
    # sliding group the 2 blocks holding what the next query (at 40) can see: keys 33..39, in blocks 8 and 9
    assert [sum(b is not None for b in t) for t in seq.tables] == [10, 2, 2, 2]
    assert cache.bytes_held(seq) == 16 * lay.page_bytes(torch.float32)
    # the minimum: the full owner's 40 tokens of 1 x 32 and five sliding owners' 8 (the window) of 2 x 8, K and V,
    # float32; held: the same plus the sliding group's empty slot (6 slots for 5 layers), nothing else at 40 tokens
    full, sliding = 2 * 40 * 32 * 4, 2 * 8 * 2 * 8 * 4
    assert cache.bytes_held(seq) == full + 6 * sliding and full + 5 * sliding == 15360
    cache.free(seq)
    assert pool.num_used == 0
    pool.check_invariants()


def test_prefix_reuse_across_sequences_with_sliding_windows():
    cache = _cache(MIXED)
    a = cache.start(list(range(100, 142)))
    _run(cache, a, 42)
    tables_a = [list(t) for t in a.tables]
    b = cache.start(a.tokens[:40] + [7, 8])  # while a is alive: shares its blocks
    assert b.num_computed == 40 and b.cached_at_start == 40
    for g, (ta, tb) in enumerate(zip(tables_a, b.tables)):
        first = cache.layout.first_visible(g, 40) // 4 if cache.layout.group_kinds[g] == S else 0
        assert tb == [None] * first + ta[first:10], g  # the window before position 40: blocks 8, 9
    cache.free(a)
    cache.free(b)
    c = cache.start(a.tokens[:20] + [1] * 30)  # a freed: its cached blocks, diverging after 20 tokens
    assert c.num_computed == 20
    assert [b for b in c.tables[0]] == tables_a[0][:5]
    d = cache.start(a.tokens[:30] + [5])  # the sliding blocks a released as it went are still cached: reused
    assert d.num_computed == 28
    cache.pool.check_invariants()


def test_a_prefix_stops_where_a_sliding_window_block_was_evicted():
    cache = _cache(MIXED)
    a = cache.start(list(range(100, 142)))
    _run(cache, a, 42)
    tables = [list(t) for t in a.tables]
    cache.free(a)
    assert cache.start(a.tokens[:40] + [1]).num_computed == 40
    cache.pool.uncache([tables[2][9]])  # one sliding group's block 9 is gone (its full-group twin is still cached)
    # 40 tokens would need it (the window before 40: blocks 8, 9); 36 need blocks 7, 8 of every sliding group
    assert cache.start(a.tokens[:40] + [1]).num_computed == 36


def test_fork_shares_every_page_and_copies_the_partial_tail_on_write():
    cache = _cache(MIXED)
    a = cache.start(list(range(100, 122)))
    _run(cache, a, 22)  # block 5 holds 2 of 4 tokens
    child = cache.fork(a)
    assert child.tables == a.tables
    assert all(cache.pool.ref_count(b) == 2 for b in a.held_blocks())
    before = {g: cache.views[cache.layout.group_class[g]][a.tables[g][5]].clone() for g in range(4)}
    child.tokens.append(9)
    cache.allocate(child, 1)
    for g in range(4):
        old, new = a.tables[g][5], child.tables[g][5]
        assert new != old and cache.pool.ref_count(old) == 1 and cache.pool.ref_count(new) == 1
        view = cache.views[cache.layout.group_class[g]]
        assert torch.equal(view[new], before[g]) and torch.equal(view[old], before[g])  # a copy; the parent's intact
        assert child.tables[g][:5] == a.tables[g][:5]  # full blocks stay shared
    cache.pool.check_invariants()


def test_capacity_errors_leave_the_pool_unchanged():
    cache = _cache(EVEN, blocks=10)
    a = cache.start(list(range(64)))
    _run(cache, a, 24)  # full group: 6 blocks; sliding group: the window before 24 (17..23) in blocks 4, 5
    assert [sum(b is not None for b in t) for t in a.tables] == [6, 2]
    tables = [list(t) for t in a.tables]
    with pytest.raises(CapacityError):
        cache.allocate(a, 20)  # 5 more blocks per group, 2 free
    assert a.tables == tables and cache.pool.num_used == 8
    cache.pool.check_invariants()


# ---------------------------------------------------------------------------------------------- snapshots
def _filled(shapes: Shapes, n: int = 30):
    cache = _cache(shapes)
    seq = cache.start(list(range(200, 200 + n + 1)))
    _run(cache, seq, n)
    return cache, seq


def test_export_import_roundtrip_keeps_each_groups_shape_and_values():
    cache, seq = _filled(MIXED)
    snap = cache.export(seq)
    lay = cache.layout
    assert snap.layout_fingerprint == lay.fingerprint
    for g, pages in enumerate(snap.pages):
        lpg, kvh, hd = lay.group_shapes[g]
        assert pages.shape[1:] == (lpg, 2, 4, kvh, hd)
        assert list(snap.index[g]) == [i for i, b in enumerate(seq.tables[g]) if b is not None]
    other = _cache(MIXED)
    other.pool.get_new_blocks(3)  # other page ids than the exporter's
    seq2 = other.import_snapshot(snap)
    assert seq2.num_computed == 30 and seq2.tokens == seq.tokens[:30]
    again = other.export(seq2)
    assert again.index == snap.index and all(torch.equal(x, y) for x, y in zip(again.pages, snap.pages))
    assert other.start(seq.tokens[:28] + [1]).num_computed == 28  # a shareable import registers its blocks


def test_session_file_carries_the_layout_and_refuses_pages_of_another_shape():
    cache, seq = _filled(MIXED)
    snap = cache.export(seq)
    data = encode_session(snap, model_fingerprint="m", tokenizer_fingerprint="t", session={"id": "x"})
    _, got = decode_session(data, model_fingerprint="m", tokenizer_fingerprint="t", trusted=True)
    assert got.layout_fingerprint == snap.layout_fingerprint and got.group_kinds == snap.group_kinds
    assert all(torch.equal(x, y) for x, y in zip(got.pages, snap.pages))
    cache.check_snapshot(got)
    _, quantized = decode_session(encode_session(snap, model_fingerprint="m", tokenizer_fingerprint="t",
                                                 session={}, quantize=True), model_fingerprint=None,
                                  tokenizer_fingerprint=None)
    cache.check_snapshot(quantized)  # int8 per (block, layer, K|V, token) of each group's own shape
    assert all(torch.allclose(x, y, atol=float(y.abs().max()) / 100) for x, y in zip(quantized.pages, snap.pages))
    with pytest.raises(SessionFileError, match="layout's shape"):
        _check_file_shapes(snap)


def _check_file_shapes(snap: KVSnapshot) -> None:
    """A file whose layout names one shape for group 0 and holds pages of another."""
    import json

    from safetensors.torch import load, save

    from gemma_sessions.sessions.sessionfile import _checksum

    data = encode_session(snap, model_fingerprint="m", tokenizer_fingerprint="t", session={})
    n = int.from_bytes(data[:8], "little")
    tensors, meta = load(data), json.loads(data[8:8 + n])["__metadata__"]
    layout = json.loads(meta["layout"])
    layout["group_shapes"][0] = layout["group_shapes"][1]
    meta["layout"] = json.dumps(layout)
    meta["checksum"] = _checksum(tensors, meta)
    decode_session(save({k: v.clone() for k, v in tensors.items()}, metadata=meta), model_fingerprint=None,
                   tokenizer_fingerprint=None)


def test_check_snapshot_refuses_a_snapshot_of_another_layout():
    cache, seq = _filled(MIXED)
    snap = cache.export(seq)
    # the same groups and page shapes, another window: a wider one lacks blocks, a narrower one only the fingerprint
    # tells (the snapshot holds every block it needs)
    with pytest.raises(SessionFileError, match="lacks blocks"):
        _cache(dataclasses.replace(MIXED, sliding_window=12)).check_snapshot(snap)
    narrower = _cache(dataclasses.replace(MIXED, sliding_window=4))
    assert narrower.layout.group_shapes == cache.layout.group_shapes and narrower.layout.group_kinds == snap.group_kinds
    with pytest.raises(SessionFileError, match="another KV layout"):
        narrower.check_snapshot(snap)
    narrower.check_snapshot(dataclasses.replace(snap, layout_fingerprint=None))  # (what shapes alone would accept)
    # the same groups and shapes, the layers in another order (which layer reads which slot differs)
    moved = _cache(dataclasses.replace(MIXED, layer_types=(S, S, S, F, S, S, S, S, S, F)))
    assert moved.layout.group_shapes == cache.layout.group_shapes
    with pytest.raises(SessionFileError, match="another KV layout"):
        moved.check_snapshot(snap)
    with pytest.raises(SessionFileError, match="another KV layout"):
        moved.import_snapshot(snap)
    # full layers of 2 x 16 instead of 1 x 32 (the same page size): the shapes tell (also without a fingerprint, as
    # a format-1 file's snapshot)
    wide = _cache(dataclasses.replace(MIXED, full=(2, 16)))
    assert wide.layout.group_kinds == snap.group_kinds
    for s in (snap, dataclasses.replace(snap, layout_fingerprint=None)):
        with pytest.raises(SessionFileError, match="pages of shape"):
            wide.check_snapshot(s)
    # other KV-shared layers: other groups
    with pytest.raises(SessionFileError):
        _cache(dataclasses.replace(MIXED, shared=2)).check_snapshot(snap)
    cache.check_snapshot(dataclasses.replace(snap, layout_fingerprint=None))  # shapes fit: accepted without one


def test_a_format_1_session_file_still_loads_into_gemma3():
    """Files written before layouts had shapes and a fingerprint (format 1) load and restore as they did."""
    import json

    from safetensors.torch import load, save

    from gemma_sessions.sessions.sessionfile import _checksum

    cache = PagedKVCache(KVLayout.for_config(tiny_config("gemma3"), 4), 64, torch.float32, CPU)
    cache.buffer.normal_()
    seq = cache.start(list(range(10, 40)))
    _run(cache, seq, 29)
    data = encode_session(cache.export(seq), model_fingerprint="m", tokenizer_fingerprint="t", session={})
    n = int.from_bytes(data[:8], "little")
    tensors, meta = load(data), json.loads(data[8:8 + n])["__metadata__"]
    layout = json.loads(meta["layout"])
    meta["layout"] = json.dumps({"block_size": layout["block_size"], "group_kinds": layout["group_kinds"]})
    meta["format_version"] = "1"
    meta["checksum"] = _checksum(tensors, meta)
    old = save({k: v.clone() for k, v in tensors.items()}, metadata=meta)
    _, snap = decode_session(old, model_fingerprint="m", tokenizer_fingerprint="t", trusted=True)
    assert snap.layout_fingerprint is None
    restored = cache.import_snapshot(snap)
    assert restored.num_computed == 29
    meta["format_version"] = "2"  # the same short layout claiming format 2: refused (group_shapes missing)
    meta["checksum"] = _checksum(tensors, meta)
    with pytest.raises(SessionFileError, match="group_shapes"):
        decode_session(save({k: v.clone() for k, v in tensors.items()}, metadata=meta), model_fingerprint=None,
                       tokenizer_fingerprint=None)


# ---------------------------------------------------------------------------------------------- attention
class Dense:
    """The reference: each sequence's K/V per owning layer, position by position, attended in float64."""

    def __init__(self, shapes: Shapes, dtype: torch.dtype):
        self.shapes, self.dtype = shapes, dtype
        self.scale = 2 / max(shapes.full[1], shapes.sliding[1]) ** 0.5
        self.kv: dict[str, dict[int, tuple[list, list]]] = {}

    def new(self, name: str, like: str | None = None, upto: int | None = None) -> None:
        src = self.kv.get(like, {})
        self.kv[name] = {layer: (list(k[:upto]), list(v[:upto])) for layer, (k, v) in src.items()}

    def write(self, name: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        ks, vs = self.kv[name].setdefault(layer, ([], []))
        ks += list(k.to(self.dtype).double())  # what the pages hold: the cache dtype's rounding
        vs += list(v.to(self.dtype).double())

    def attend(self, name: str, layer: int, pos: int, q: torch.Tensor, prefill: bool) -> torch.Tensor:
        """q [Hq, D] at ``pos`` over the source layer's keys it can see (its window, if sliding). A prefill chunk's
        queries are rounded to the cache dtype, as the engine attends a chunk in the KV dtype (decode rows: float32)."""
        sh = self.shapes
        q = q.to(self.dtype) if prefill else q
        lo = max(0, pos - sh.sliding_window + 1) if sh.layer_types[layer] == S else 0
        ks, vs = self.kv[name][sh.kv_source(layer)]
        keys, vals = torch.stack(ks[lo:pos + 1]), torch.stack(vs[lo:pos + 1])  # [L, Hkv, D]
        group = q.shape[0] // keys.shape[1]  # query head h reads kv head h // group (repeat_kv)
        keys, vals = keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), keys) * self.scale, dim=-1)
        return torch.einsum("hl,lhd->hd", probs, vals)


def _step(cache: PagedKVCache, ref: Dense, rows: list[tuple[str, object, int]], gen: torch.Generator) -> float:
    """One step over ``rows`` (name, sequence, new tokens; decode rows first): every layer's attend against the
    reference. Returns the largest difference."""
    shapes, lay = ref.shapes, cache.layout
    for _, seq, n in rows:
        cache.allocate(seq, n)
    items = [WorkItem(seq=seq, num_tokens=n, want_logits=False) for _, seq, n in rows]
    where = [(name, seq.num_computed + j, n > 1) for name, seq, n in rows for j in range(n)]
    batch = PagedBatch(cache, items, ref.scale, None, HQ)
    worst = 0.0
    for layer in range(shapes.num_layers):
        kvh, hd = shapes.layer_kv_heads(layer), shapes.layer_head_dim(layer)
        q = torch.randn(len(where), HQ, hd, generator=gen)
        k = v = None
        if lay.kv_source[layer] == layer:
            k, v = torch.randn(len(where), kvh, hd, generator=gen), torch.randn(len(where), kvh, hd, generator=gen)
            row = 0
            for name, _, n in rows:
                ref.write(name, layer, k[row:row + n], v[row:row + n])
                row += n
        out = batch.attend(layer, q, k, v)
        assert out.shape == (len(where), HQ, hd)
        want = torch.stack([ref.attend(name, layer, pos, q[i], pre) for i, (name, pos, pre) in enumerate(where)])
        worst = max(worst, float((out.double() - want).abs().max()))
    for _, seq, n in rows:
        cache.commit(seq, n)
    return worst


@pytest.mark.parametrize("dtype,native,tol", [(torch.float32, False, 1e-5), (torch.bfloat16, False, 3e-2),
                                              (torch.bfloat16, True, 6e-2)], ids=["float32", "bf16", "bf16-native"])
@pytest.mark.parametrize("shapes", [MIXED, EVEN, WIDE], ids=["mixed", "even", "gemma4-widths"])
def test_paged_attention_equals_dense_attention(shapes, dtype, native, tol, monkeypatch):
    """Prefill chunks, decode rows beside a prefill chunk, a cached prefix adopted by another sequence, a fork whose
    shared tail is copied on write, and decoding past the window: every layer (owning or KV-shared, 8 to 512 wide,
    1 or 2 KV heads) equals the dense reference. bf16 KV also takes the packed prefill path, in float32 after rounding
    or (native) in bf16 GEMMs, whose rounded scores and probabilities cost a few 1e-2 here; a wrong key, slot or
    window costs O(1)."""
    from gemma_sessions import kernels

    monkeypatch.setitem(kernels._state, "native_bf16", native)
    gen = torch.Generator().manual_seed(0)
    cache, ref = _cache(shapes, dtype=dtype), Dense(shapes, dtype)
    a = cache.start(list(range(100, 130)))
    ref.new("a")
    worst = [_step(cache, ref, [("a", a, 10)], gen), _step(cache, ref, [("a", a, 12)], gen)]
    b = cache.start(a.tokens[:20] + [7] * 6)  # a's first 5 blocks, the sliding groups only their window
    assert b.num_computed == 20 and any(t[0] is None for t in b.tables)
    ref.new("b", like="a", upto=20)
    c = cache.fork(a)  # at 22 tokens: block 5 half full, shared
    ref.new("c", like="a")
    c.tokens += [3] * 10
    b2 = cache.start(a.tokens[:8] + [4] * 9)  # a second prefill chunk in the same step (packed with bf16 KV)
    ref.new("b2", like="a", upto=8)
    worst.append(_step(cache, ref, [("a", a, 1), ("c", c, 1), ("b", b, 6), ("b2", b2, 8)], gen))
    for _ in range(12):  # decode past the window (a at 35, b at 38): sliding blocks are released as they go
        for s in (a, b):
            if len(s.tokens) <= s.num_computed:
                s.tokens.append(5)
        worst.append(_step(cache, ref, [("a", a, 1), ("c", c, 1), ("b", b, 1)], gen))
    assert a.num_computed == 35 and all(t[0] is None for t, kind in zip(a.tables, cache.layout.group_kinds)
                                        if kind == S)
    assert max(worst) < tol, worst
    cache.pool.check_invariants()


def test_the_shared_layer_contract_is_enforced_and_writes_nothing():
    cache = _cache(MIXED)
    seq = cache.start(list(range(20)))
    cache.allocate(seq, 6)
    batch = PagedBatch(cache, [WorkItem(seq=seq, num_tokens=6, want_logits=False)], SCALE, None, HQ)
    q8, kv8 = torch.randn(6, HQ, 8), torch.randn(6, 2, 8)
    batch.attend(5, q8, kv8, kv8)  # the source of layers 6, 7, 8
    before = cache.buffer.clone()
    out = batch.attend(7, q8, None, None)
    assert torch.equal(cache.buffer, before) and out.shape == (6, HQ, 8)
    with pytest.raises(ValueError, match="pass k = v = None"):
        batch.attend(7, q8, kv8, kv8)
    with pytest.raises(ValueError, match="owns its KV"):
        batch.attend(5, q8, None, None)
    with pytest.raises(ValueError, match="decode rows only"):  # a prefill chunk: the layer loop
        batch.stack_args()
    with pytest.raises(ValueError, match="page shapes"):
        _ = cache.flat


def test_stack_args_for_gemma3_are_what_they_were():
    """One page shape: one flat (the cache's own storage), the offsets and page stride the dict form had."""
    config = tiny_config("gemma3")
    cache = PagedKVCache(KVLayout.for_config(config, 4), 64, torch.float32, CPU)
    seq = cache.start(list(range(12)))
    _run(cache, seq, 11)
    cache.allocate(seq, 1)
    kv = PagedBatch(cache, [WorkItem(seq=seq, num_tokens=1, want_logits=True)], SCALE, None,
                    (config.num_heads, config.num_kv_heads)).stack_args()
    lay = cache.layout
    assert isinstance(kv, StackKV) and len(kv.flats) == 1
    assert kv.flats[0] is cache.flat and kv.flats[0].data_ptr() == cache.buffer.data_ptr()
    assert kv.layer_flat == (0,) * 7 and kv.page_stride == (8,) and kv.block == 4
    assert kv.off_k == tuple(lay.layer_slot[i] * 2 * 4 for i in range(7))
    assert kv.off_v == tuple((lay.layer_slot[i] * 2 + 1) * 4 for i in range(7))
    assert kv.layer_group == lay.layer_group


def test_stack_args_describe_every_page_shape_and_the_shared_layers():
    """Two page shapes and KV-shared layers (MIXED): a flat per shape with its stride, each layer on its group's
    flat, a shared layer on its source's group, slot and offsets; per group the slot the rows write and the table
    attend() reads (the same tensors)."""
    cache = _cache(MIXED)
    seqs = [cache.start(list(range(20 + i))) for i in range(2)]
    for s in seqs:
        _run(cache, s, len(s.tokens) - 1)
        cache.allocate(s, 1)
    batch = PagedBatch(cache, [WorkItem(seq=s, num_tokens=1, want_logits=True) for s in seqs], SCALE, None, HQ)
    kv = batch.stack_args()
    lay = cache.layout
    assert len(lay.classes) == 2 and kv.flats == cache.flats and kv.page_stride == cache.page_strides
    for i in range(MIXED.num_layers):
        src = MIXED.kv_source(i)
        assert kv.layer_group[i] == lay.layer_group[src]
        assert kv.flats[kv.layer_flat[i]] is cache.group_flat(lay.layer_group[i])
        assert kv.flats[kv.layer_flat[i]].shape[1:] == (MIXED.layer_kv_heads(i), MIXED.layer_head_dim(i))
        assert (kv.off_k[i], kv.off_v[i]) == (cache.layer_offset(src, 0), cache.layer_offset(src, 1))
    assert [kv.layer_flat[i] for i in range(MIXED.num_layers)] != [0] * MIXED.num_layers
    for g in range(lay.num_groups):
        assert kv.write[g] is batch.write[g] and kv.table[g] is batch.decode[g][0]
        assert torch.equal(kv.lengths[g], batch.decode[g][2])


# ---------------------------------------------------------------------------------------------- property
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["start", "run", "fork", "free", "decode"]), st.integers(0, 7),
                          st.integers(1, 9)), min_size=1, max_size=40))
def test_any_sequence_of_operations_keeps_the_pool_consistent(ops):
    """Random starts (prefixes of one token stream), chunks, forks, frees and decodes on the mixed layout: the pool's
    invariants hold, every held page is accounted for, sliding groups never hold more than their window plus a chunk,
    and freeing everything leaves nothing used."""
    cache = _cache(MIXED, blocks=120)
    lay, stream, seqs = cache.layout, list(range(300, 400)), []
    for op, i, n in ops:
        try:
            if op == "start" or not seqs:
                seqs.append(cache.start(stream[:10 + 7 * i]))
            elif op == "run":
                s = seqs[i % len(seqs)]
                todo = len(s.tokens) - s.num_computed
                if todo:
                    _run(cache, s, min(n, todo), chunk=n)
            elif op == "fork":
                seqs.append(cache.fork(seqs[i % len(seqs)]))
            elif op == "free":
                cache.free(seqs.pop(i % len(seqs)))
            else:
                s = seqs[i % len(seqs)]
                s.tokens = s.tokens[:s.num_computed] + [n]
                _run(cache, s, 1)
        except CapacityError:
            pass
        cache.pool.check_invariants()
        held = [b for s in seqs for b in s.held_blocks()]
        assert all(cache.pool.ref_count(b) == held.count(b) for b in set(held))
        for s in seqs:
            for g, table in enumerate(s.tables):
                if lay.group_kinds[g] == S:
                    assert sum(b is not None for b in table) <= (8 + 9 + 3) // 4 + 1
    for s in seqs:
        cache.free(s)
    assert cache.pool.num_used == 0


# ---------------------------------------------------------------------------------------------- the Gemma 4 layers
# "all" (MoE, PLE, k_eq_v...): its dense path alone moves logits (|x| < 8) by ~1e-3 between a prompt at once and in
# chunks (float32 sums in other orders, amplified); "plain": ~1e-6. A wrong key, slot or window moves them by O(1).
@pytest.mark.parametrize("variant,tol", [("all", 1e-2), ("plain", 1e-4)])
def test_gemma4_layers_over_pages_equal_their_dense_kv(variant, tol):
    """The Gemma 4 decoder (models/gemma4.py: KV-shared layers calling attend(layer, q, None, None), 8- and 16-wide
    heads, k_eq_v, windows of 5 / 7 tokens) stepped by the engine's runner over the paged cache: two prompts prefilled
    in chunks in the same steps, decode rows beside a prefill chunk, a fork, a prefix adopted from the cache, decoding
    past the window. Every row's logits equal one sequence alone on its dense KV (generate's path)."""
    from gemma_sessions.config_gemma4 import Gemma4Config
    from gemma_sessions.engine import runner
    from gemma_sessions.models.gemma4 import Gemma4Model
    from gemma_sessions.testing import random_gemma4_tensors, tiny_gemma4_hf_config

    config = Gemma4Config.from_hf_config(tiny_gemma4_hf_config(variant))
    net = Gemma4Model(config, random_gemma4_tensors(config, seed=1), "float32", CPU).eval()
    cache = PagedKVCache(KVLayout.for_config(config, 4), 256, torch.float32, CPU)
    assert not cache.layout.is_uniform and any(s != i for i, s in enumerate(cache.layout.kv_source))
    gen = torch.Generator().manual_seed(2)
    p1, p2 = (torch.randint(7, 500, (n,), generator=gen).tolist() for n in (19, 23))
    got: list[tuple[object, int, torch.Tensor]] = []  # (sequence, position of the row's token, logits)

    def step(rows: list[tuple[object, int]]) -> None:
        items = []
        for seq, n in rows:
            cache.allocate(seq, n)
            items.append(WorkItem(seq=seq, num_tokens=n, want_logits=True))
        logits = runner.run_step(net, cache, items)
        for (seq, n), row in zip(rows, logits):
            got.append((seq, seq.num_computed + n - 1, row))
            cache.commit(seq, n)

    a, b = cache.start(p1), cache.start(p2)
    step([(a, 11), (b, 9)])
    step([(a, 8), (b, 14)])
    c = cache.fork(a)
    d = cache.start(p2[:16] + [9, 8, 7, 6, 5])
    assert d.num_computed == 16
    for i in range(9):
        for s, tok in ((a, 11 + i), (c, 300 + 7 * i), (b, 40 + 3 * i)):
            s.tokens.append(tok)
        step([(a, 1), (c, 1), (b, 1)] + ([(d, 5)] if i == 0 else []))
    with torch.inference_mode():
        dense = {id(s): net.step(torch.tensor(s.tokens[:s.num_computed]), net.new_sequence(s.num_computed))
                 for s in (a, b, c, d)}
    worst = max(float((row - dense[id(s)][pos]).abs().max()) for s, pos, row in got)
    assert len(got) == 2 * 2 + 9 * 3 + 1 and worst < tol, worst
    cache.pool.check_invariants()
