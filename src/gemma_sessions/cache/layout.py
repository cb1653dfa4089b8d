"""How a model's layers map onto KV pages: :class:`LayerShapes`, what a layout reads of a model config, and
:class:`KVLayout`, the grouping of layers into pages that are all the same size.

Contract: ``KVLayout.for_config(shapes, block_size)`` reads a model only through :class:`LayerShapes` (Gemma 1/2/3's
``ModelConfig`` implements it trivially; Gemma 4's config with its two head sizes and KV-shared layers) and returns an
immutable layout:

* Only layers that own their KV (``kv_source(i) == i``) get a slot in a page. A KV-shared layer (Gemma 4's last
  ``num_kv_shared_layers``) reads the KV of its source, the last earlier layer of its kind that owns KV: its
  ``layer_group`` and ``layer_slot`` are its source's, and it owns nothing.
* Owning layers fall into *categories* of the same kind (full / sliding) and shape (kv heads, head dim); each category
  is cut into *groups* of ``layers_per_group`` of its layers, in layer order. Every group's page holds ``block_size``
  tokens of K and V for its layers, and every page in the cache has the SAME number of elements, so one pool of page ids
  and one budget serve every group (vLLM's hybrid allocator idea). A category's ``layers_per_group`` is what makes its
  page that size::

      page units P = layers_per_group_c x kv_heads_c x head_dim_c, the same for every category c
      page       = block_size x 2 (K, V) x P elements     shape [layers_per_group_c, 2, block_size, kvh_c, hd_c]

      P = gcd over categories of (layers_c x kvh_c x hd_c) when each kvh_c x hd_c divides it: no empty slot, the
          fewest groups:
        Gemma 3 270M  15 sliding + 3 full layers, 1 x 256 each  -> P = 768:   5 sliding groups + 1 full group of 3
        Gemma 4 E2B   12 sliding owners 1 x 256, 3 full 1 x 512 -> P = 1536:  2 sliding groups of 6, 1 full group of 3
        Gemma 4 31B   50 sliding 16 x 256, 10 full 4 x 512      -> P = 20480: 10 sliding groups of 5, 1 full of 10
      otherwise the multiple of lcm(kvh_c x hd_c) that leaves the fewest empty slots (a category's last group is then
      partly empty: padding, only when the shapes leave no other way)

* ``fingerprint`` names everything a snapshot's pages depend on (block size, window, groups, their shapes, which
  layer reads which slot): a snapshot from another layout is refused even when its page shapes happen to match.

Gemma 1/2/3 get exactly the layout they had before layer shapes could differ (same groups, slots and page shape).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Protocol, runtime_checkable

import torch

from ..config import FULL, SLIDING
from ..errors import ModelError


@runtime_checkable
class LayerShapes(Protocol):
    """What a KV layout reads of a model config: per layer, its kind, its K/V shape and whose KV it reads.

    ``kv_source(i)`` is the layer whose KV layer ``i`` attends over: ``i`` itself, or for a KV-shared layer an earlier
    layer of the same kind and shape that owns its KV (Gemma 4: the last non-shared layer of that kind).
    """

    @property
    def num_layers(self) -> int: ...

    @property
    def layer_types(self) -> tuple[str, ...]: ...  # FULL or SLIDING (config.py) per layer

    @property
    def sliding_window(self) -> int | None: ...

    def layer_kv_heads(self, layer: int) -> int: ...

    def layer_head_dim(self, layer: int) -> int: ...

    def kv_source(self, layer: int) -> int: ...


Shape = tuple[int, int, int]  # (layers_per_group, kv_heads, head_dim) of a group's pages


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVLayout:
    """How layers map to KV groups and page slots (see the module docstring).

    Example::

        layout = KVLayout.for_config(model.config, block_size=16)
        layout.layer_group[i], layout.layer_slot[i]   # where layer i's K/V live (its source's, if shared)
        layout.group_shapes[g]                        # (layers_per_group, kv_heads, head_dim) of group g's pages
        layout.page_bytes(torch.bfloat16)             # one page, whatever its group
    """

    block_size: int
    group_kinds: tuple[str, ...]         # FULL or SLIDING per group
    group_shapes: tuple[Shape, ...]      # (layers_per_group, kv_heads, head_dim) per group
    group_layers: tuple[tuple[int, ...], ...]  # the owning layers in each group's slots (fewer than lpg: padding)
    layer_group: tuple[int, ...]         # layer -> group holding the KV it reads
    layer_slot: tuple[int, ...]          # layer -> slot within that group's page
    kv_source: tuple[int, ...]           # layer -> layer whose KV it reads (itself unless KV-shared)
    window: int | None

    @classmethod
    def for_config(cls, config: LayerShapes, block_size: int = 16) -> KVLayout:
        """The layout of ``config``'s layers in pages of ``block_size`` tokens. Raises ModelError for shapes that
        cannot be paged (a shared layer reading a later layer, another kind or another shape)."""
        n = config.num_layers
        types = tuple(config.layer_types)
        src = tuple(_checked_sources(config, types))
        categories: dict[tuple[str, int, int], list[int]] = {}
        for kind in (FULL, SLIDING):  # full groups first, then sliding ones (the order Gemma 1/2/3 always had)
            for i in range(n):
                if types[i] == kind and src[i] == i:
                    categories.setdefault((kind, config.layer_kv_heads(i), config.layer_head_dim(i)), []).append(i)
        units = _page_units([(len(layers), kvh * hd) for (_, kvh, hd), layers in categories.items()])
        kinds, shapes, members = [], [], []
        group, slot = [0] * n, [0] * n
        for (kind, kvh, hd), layers in categories.items():
            lpg = units // (kvh * hd)
            for start in range(0, len(layers), lpg):
                for j, layer in enumerate(layers[start:start + lpg]):
                    group[layer], slot[layer] = len(kinds), j
                kinds.append(kind)
                shapes.append((lpg, kvh, hd))
                members.append(tuple(layers[start:start + lpg]))
        for i in range(n):  # a shared layer reads its source's slot
            group[i], slot[i] = group[src[i]], slot[src[i]]
        return cls(block_size=block_size, group_kinds=tuple(kinds), group_shapes=tuple(shapes),
                   group_layers=tuple(members), layer_group=tuple(group), layer_slot=tuple(slot), kv_source=src,
                   window=config.sliding_window if SLIDING in types else None)

    # ---------------------------------------------------------------------------------------------- shapes
    @property
    def num_groups(self) -> int:
        return len(self.group_kinds)

    @functools.cached_property
    def classes(self) -> tuple[Shape, ...]:
        """The distinct page shapes, in the order of their first group (each is one view of the same pages)."""
        return tuple(dict.fromkeys(self.group_shapes))

    @functools.cached_property
    def group_class(self) -> tuple[int, ...]:
        """group -> index of its page shape in :attr:`classes`."""
        return tuple(self.classes.index(s) for s in self.group_shapes)

    @property
    def page_elems(self) -> int:
        """Elements in one page (equal for every group)."""
        lpg, kvh, hd = self.group_shapes[0]
        return lpg * 2 * self.block_size * kvh * hd

    def page_bytes(self, dtype: torch.dtype) -> int:
        return self.page_elems * torch.tensor([], dtype=dtype).element_size()

    @property
    def is_uniform(self) -> bool:
        """One page shape and no KV-shared layer (Gemma 1/2/3): what ``kernels.decode_stack`` reads and writes."""
        return len(self.classes) == 1 and all(s == i for i, s in enumerate(self.kv_source))

    def _uniform(self, what: str) -> Shape:
        if len(self.classes) != 1:
            raise ValueError(f"{what}: this layout has {len(self.classes)} page shapes ({list(self.classes)}); "
                             "read group_shapes[group]")
        return self.classes[0]

    @property
    def layers_per_group(self) -> int:
        """Layers per page of a layout with one page shape (Gemma 1/2/3); ValueError otherwise."""
        return self._uniform("layers_per_group")[0]

    @property
    def num_kv_heads(self) -> int:
        return self._uniform("num_kv_heads")[1]

    @property
    def head_dim(self) -> int:
        return self._uniform("head_dim")[2]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over everything a snapshot's pages depend on (not the dtype: snapshots convert)."""
        doc = {"block_size": self.block_size, "window": self.window, "group_kinds": list(self.group_kinds),
               "group_shapes": [list(s) for s in self.group_shapes], "layer_group": list(self.layer_group),
               "layer_slot": list(self.layer_slot), "kv_source": list(self.kv_source)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------------------------------------- windows
    def first_visible(self, group: int, pos: int) -> int:
        """First key position a query at ``pos`` can see in this group."""
        if self.group_kinds[group] == SLIDING:
            return max(0, pos - self.window + 1)  # keys k > pos - window (transformers' sliding overlay)
        return 0

    def blocks_needed(self, num_tokens: int, chunk: int = 1) -> int:
        """Pages one sequence of ``num_tokens`` holds at most at once when computed ``chunk`` tokens at a time
        (a sliding group keeps its window plus the chunk being written; a full group keeps everything)."""
        bs = self.block_size
        total = 0
        for kind in self.group_kinds:
            if kind == SLIDING:
                total += min(math.ceil(num_tokens / bs), (self.window + chunk + bs - 1) // bs + 1)
            else:
                total += math.ceil(num_tokens / bs)
        return total


def _checked_sources(config: LayerShapes, types: tuple[str, ...]) -> list[int]:
    """Every layer's KV source, checked: itself, or an earlier owning layer of the same kind and shape."""
    n = config.num_layers
    if len(types) != n or any(t not in (FULL, SLIDING) for t in types):
        raise ModelError(f"layer_types must give {FULL!r} or {SLIDING!r} for each of {n} layers")
    if SLIDING in types and not config.sliding_window:
        raise ModelError("sliding layers need a sliding_window")
    out = []
    for i in range(n):
        s = config.kv_source(i)
        kvh, hd = config.layer_kv_heads(i), config.layer_head_dim(i)
        if kvh < 1 or hd < 1:
            raise ModelError(f"layer {i}: {kvh} kv heads of dim {hd}")
        if s != i:
            # NOTE: the source must come first: a step's layers run in order, so the source has written this step's
            # K/V to the pages before the shared layer reads them.
            if not (0 <= s < i) or config.kv_source(s) != s:
                raise ModelError(f"layer {i} reads the KV of layer {s}, which is not an earlier layer owning its KV")
            if types[s] != types[i] or (config.layer_kv_heads(s), config.layer_head_dim(s)) != (kvh, hd):
                raise ModelError(f"layer {i} reads the KV of layer {s} of another kind or shape")
        out.append(s)
    return out


def _page_units(categories: list[tuple[int, int]]) -> int:
    """Elements per token of one page (``layers_per_group x kv_heads x head_dim``, the same for every category) for
    categories of (layers, kv_heads x head_dim); see the module docstring."""
    lcm = math.lcm(*(u for _, u in categories))
    exact = math.gcd(*(n * u for n, u in categories))
    if exact % lcm == 0:
        return exact
    best: tuple[int, int] | None = None  # (elements per token with the empty slots, -P): fewest, then largest P
    for p in range(lcm, max(n * u for n, u in categories) + lcm, lcm):
        total = sum(-(-n * u // p) * p for n, u in categories)
        if best is None or (total, -p) < best:
            best = (total, -p)
    return -best[1]
