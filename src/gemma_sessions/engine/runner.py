"""Runs one scheduled step through the model over the paged KV cache.

Contract: ``run_step(net, cache, work)`` takes the step's work items (sequence, number of new tokens, whether to
return logits for its last token) and returns float32 logits ``[R, vocab]`` for the rows that asked. Tokens of all
sequences are flattened into one ``[N]`` batch so every projection is one matrix product; attention goes through
:class:`PagedBatch`:

    flattened tokens:  [ d0 d1 d2 ... (one per decoding sequence) | p0 p0 p0 p0 | p1 p1 ... (prefill chunks) ]
    decode rows   -> one attention over each row's visible keys, read in place from the pages
    prefill chunk -> its own causal (and windowed) attention; in the fast mode (bf16 KV) the step's chunks are
                     padded into one batched attention (same bits, far fewer torch calls)

``run_state_step`` is the same contract for RecurrentGemma's state slots (``cache/state.py``).

NOTE: decode rows come first so they share one batched attention; a prefill chunk is attended on its own because
its queries see different key ranges.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .. import kernels
from ..cache.kv import PagedKVCache
from ..cache.layout import LayerShapes
from ..cache.state import StateCache
from ..kernels import backend
from ..models import gemma as gemma_model
from ..models.gemma import attention, visibility_mask
from .work import WorkItem


@runtime_checkable
class PagedConfig(LayerShapes, Protocol):
    """What the engine reads of a paged model's config: its layers' KV shapes (:class:`LayerShapes`, for the
    layout), its query heads, vocabulary and context length. ``ModelConfig`` and ``Gemma4Config`` implement it."""

    num_heads: int
    vocab_size: int
    max_position_embeddings: int


@runtime_checkable
class PagedModel(Protocol):
    """What the engine and the runner ask of a model whose K/V live in the paged cache (``GemmaModel`` for Gemma
    1/2/3, ``Gemma4Model``); the engine serves any ``net`` that has these, not a list of classes.

    The layers read and write K/V only through the ``KVBatch`` they are given (:class:`PagedBatch` here), with the
    score scale and soft-cap ``attention_params()`` gives. The fast paths are optional, asked first:
    ``greedy_head(h, want_logits)`` is called only when ``can_greedy_head()`` and ``hidden_decode_stack(ids,
    positions, kv)`` only when ``can_decode_stack(rows)`` says so (the int8 mode; Gemma 4 with per-layer embeddings
    or the MoE block runs its layers one by one). ``prepare_greedy`` and ``prepare_i16`` make what those paths need
    at the engine's start rather than in a first request.
    """

    config: PagedConfig
    weight_format: str
    device: torch.device

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, kv: PagedBatch) -> torch.Tensor:
        """Final-normed hidden states [N, hidden] for N flattened tokens at their absolute positions."""

    def logits(self, h: torch.Tensor, batch: bool = False) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""

    def attention_params(self) -> tuple[float, float | None]:
        """The score scale and soft-cap every attention layer uses (what :class:`PagedBatch` applies)."""

    def can_greedy_head(self) -> bool:
        """Whether ``greedy_head`` runs."""

    def greedy_head(self, h: torch.Tensor, want_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, hidden] -> (the exact greedy token per row, -1 where h is not finite; approximate logits [N, vocab]
        when ``want_logits``)."""

    def can_decode_stack(self, rows: int) -> bool:
        """Whether ``hidden_decode_stack`` runs a decode step of ``rows`` rows."""

    def hidden_decode_stack(self, ids: torch.Tensor, positions: torch.Tensor, kv: kernels.StackKV) -> torch.Tensor:
        """:meth:`hidden` for a step of decode rows, every layer in one compiled call over ``kv``
        (:meth:`PagedBatch.stack_args`)."""

    def prepare_greedy(self) -> None:
        """Make the greedy head's layout now where it runs (may do nothing)."""

    def prepare_i16(self) -> None:
        """Make what batched steps need now, not in a first request (may do nothing)."""


@runtime_checkable
class StateModel(Protocol):
    """What :func:`run_state_step` and ``cache/state.py`` ask of a recurrent model (RecurrentGemma's
    ``GriffinModel``): fixed-size state slots and a step over them."""

    config: object

    def new_slots(self, num_slots: int) -> object:
        """A pool of ``num_slots`` state slots (its ``slot_bytes()``: one slot's size)."""

    def forward_slots(self, ids: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, pool: object,
                      last_only: bool = False) -> torch.Tensor:
        """Advance the sequences in ``slots`` by ``ids`` [B, T]; logits [B, T or 1, vocab]."""


def leading_decode_rows(items: list[WorkItem]) -> int:
    """How many items at the front are single-token (decode) rows (the scheduler puts them first)."""
    n = 0
    while n < len(items) and items[n].num_tokens == 1:
        n += 1
    return n


class PagedBatch:
    """The ``KVBatch`` the model's layers call for one step: writes new K/V to pages, attends over pages.

    Each group reads and writes its own page shape (``cache.group_flat(g)``): Gemma 4's sliding and full groups differ
    in head size and KV heads. A KV-shared layer calls ``attend(layer, q, None, None)``: it writes nothing and attends
    over its source layer's KV (the same group and slot; the source, an earlier layer, wrote this step's K/V already).
    ``heads``: the query heads (a (query, kv) pair as before is accepted; kv heads come from the layout, per group).
    """

    def __init__(self, cache: PagedKVCache, items: list[WorkItem], scale: float, softcap: float | None,
                 heads: int | tuple[int, int]):
        self.cache, self.scale, self.softcap = cache, scale, softcap
        self.hq = heads if isinstance(heads, int) else heads[0]
        lay = cache.layout
        dev = cache.device
        self.n_decode = leading_decode_rows(items)  # they share one batched attention
        self.write = []   # per group: LongTensor [N]
        self.decode = []  # per group: (block table [B, P], start [B], lengths [B]) of the decode rows, or None
        self.prefill = []  # per group: list of (row start, row end, index [L], mask [T, L])
        bs = lay.block_size
        decode = items[:self.n_decode]
        for g in range(lay.num_groups):
            stride = cache.group_page_stride(g)
            # decode rows: their new token's slot, from Python ints (no tensor per row)
            write = [torch.tensor([seq.tables[g][p // bs] * stride + p % bs
                                   for seq, p in ((it.seq, it.seq.num_computed) for it in decode)], dtype=torch.long)]
            write += [cache.slot_base(it.seq, it.seq.num_computed, it.seq.num_computed + it.num_tokens, g)
                      for it in items[self.n_decode:]]
            self.write.append((torch.cat(write) if len(write) > 1 else write[0]).to(dev))
            self.decode.append(self._decode_tables(decode, g))
            self.prefill.append(self._prefill_index(items, g))
        # the fast mode's prefill chunks: one padded attention per layer instead of one per chunk (see _packed), not
        # where a chunk was split in blocks (its blocks' keys differ in length: padding would undo the split's saving)
        split = any(it.num_tokens > gemma_model.PREFILL_BLOCK for it in items[self.n_decode:])
        self.packed = [self._packed(p, g) if cache.dtype == torch.bfloat16 and not split else None
                       for g, p in enumerate(self.prefill)]

    def _decode_tables(self, items: list[WorkItem], g: int):
        """(block table [B, P], first visible position within the first page [B], visible keys [B]) of the decode
        rows: what kernels.decode_attention reads the pages through."""
        if not items:
            return None
        lay = self.cache.layout
        bs = lay.block_size
        pages, start, lengths = [], [], []
        for it in items:
            pos = it.seq.num_computed  # the new token's position
            lo = lay.first_visible(g, pos)
            pages.append(it.seq.tables[g][lo // bs:pos // bs + 1])
            start.append(lo % bs)
            lengths.append(pos + 1 - lo)
        width = max(len(p) for p in pages)
        table = torch.tensor([p + [0] * (width - len(p)) for p in pages], dtype=torch.long)
        dev = self.cache.device
        return table.to(dev), torch.tensor(start).to(dev), torch.tensor(lengths).to(dev)

    def _prefill_index(self, items: list[WorkItem], g: int):
        cache, lay = self.cache, self.cache.layout
        out, row = [], 0
        for i, it in enumerate(items):
            if i >= self.n_decode:  # in blocks of PREFILL_BLOCK queries, each with the keys it can see (as DenseKV)
                window = lay.window if lay.group_kinds[g] == "sliding" else None
                block = gemma_model.PREFILL_BLOCK
                for b0 in range(0, it.num_tokens, block):
                    s, t = it.seq.num_computed + b0, min(block, it.num_tokens - b0)
                    lo = lay.first_visible(g, s)
                    mask = visibility_mask(torch.arange(s, s + t), torch.arange(lo, s + t), window)
                    index = cache.slot_base(it.seq, lo, s + t, g)
                    out.append((row + b0, row + b0 + t, index.to(cache.device), mask.to(cache.device)))
            row += it.num_tokens
        return out

    def _packed(self, chunks: list, g: int):
        """Several prefill chunks of a step as one padded batch: (query rows [B * Tmax], key slots [B * Lmax],
        ~mask [B, 1, g * Tmax, Lmax] for masked_fill, the real rows' places [n] in the padded output, B, Tmax,
        Lmax), or None for fewer than 2 chunks or when padding would more than double the work. Same operations as
        :func:`attention` per chunk, ~10 torch calls per layer instead of ~8 per chunk (16 chunks of 50 tokens: ~8
        ms per layer was mostly those calls). Padded query rows see key 0 (no empty softmax) and are dropped; padded
        keys are masked. Only for the bf16 KV of the fast mode, whose prefill rounding already depends on the
        step's company (bf16 GEMMs); the float32 mode keeps one exact attention per chunk."""
        if len(chunks) < 2:
            return None
        sizes = [(end - start, index.numel()) for start, end, index, _ in chunks]
        b, tmax, lmax = len(chunks), max(t for t, _ in sizes), max(n for _, n in sizes)
        if 2 * sum(t * n for t, n in sizes) < b * tmax * lmax:
            return None
        dev = self.cache.device
        qidx = torch.zeros(b, tmax, dtype=torch.long)
        slots = torch.zeros(b, lmax, dtype=torch.long)
        mask = torch.zeros(b, tmax, lmax, dtype=torch.bool)
        mask[:, :, 0] = True
        valid = []
        for i, ((start, end, index, m), (t, n)) in enumerate(zip(chunks, sizes)):
            qidx[i, :t] = torch.arange(start, end)
            slots[i, :n] = index.cpu()
            slots[i, n:] = index[0].item()
            mask[i, :t, :n] = m.cpu()
            valid.append(torch.arange(i * tmax, i * tmax + t))
        hq, hkv = self.hq, self.cache.layout.group_shapes[g][1]
        notm = ~mask[:, None, None].expand(b, 1, hq // hkv, tmax, lmax).reshape(b, 1, hq // hkv * tmax, lmax)
        return (qidx.view(-1).to(dev), slots.view(-1).to(dev), notm.to(dev), torch.cat(valid).to(dev), b, tmax,
                lmax)

    def _attend_packed(self, packed, q: torch.Tensor, flat: torch.Tensor, off_k: int, off_v: int) -> torch.Tensor:
        qidx, slots, notm, valid, b, tmax, lmax = packed
        hkv, d = flat.shape[1], flat.shape[2]
        hq = q.shape[1]
        keys = flat.index_select(0, slots + off_k).view(b, lmax, hkv, d).transpose(1, 2)
        vals = flat.index_select(0, slots + off_v).view(b, lmax, hkv, d).transpose(1, 2)
        out_dtype = keys.dtype
        dt = backend.matmul_dtype(keys.dtype, keys.device)
        if dt != keys.dtype:
            keys, vals = keys.to(dt), vals.to(dt)  # as attention(): float32 where bf16 would be software, bf16 out
        qp = q.index_select(0, qidx).to(out_dtype).to(keys.dtype).view(b, tmax, hq, d).transpose(1, 2)
        qp = qp.reshape(b, hkv, hq // hkv * tmax, d)
        scores = torch.matmul(qp, keys.transpose(-1, -2)) * self.scale  # as attention(), step by step
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(notm, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(vals.dtype)
        out = torch.matmul(probs, vals).reshape(b, hq, tmax, d).transpose(1, 2).reshape(b * tmax, hq, d)
        return out.index_select(0, valid).to(out_dtype)

    def stack_args(self) -> kernels.StackKV:
        """The cache's part of ``kernels.decode_stack`` for a step of decode rows only: what :meth:`attend` uses,
        for every layer at once. Any layout: one slot tensor per page shape (``cache.flats``, each with its page
        stride), each layer's shape, offsets and group (a KV-shared layer's are its source's: the kernel writes
        nothing for it and reads its source's slots), and per group the rows' write slots and block tables."""
        cache, lay = self.cache, self.cache.layout
        if any(d is None for d in self.decode) or any(self.prefill):
            raise ValueError("stack_args describes a step of decode rows only")
        n = len(lay.layer_group)
        return kernels.StackKV(
            flats=tuple(cache.flats), layer_flat=tuple(lay.group_class[g] for g in lay.layer_group),
            off_k=tuple(cache.layer_offset(i, 0) for i in range(n)),
            off_v=tuple(cache.layer_offset(i, 1) for i in range(n)), layer_group=tuple(lay.layer_group),
            write=tuple(self.write), table=tuple(d[0] for d in self.decode), start=tuple(d[1] for d in self.decode),
            lengths=tuple(d[2] for d in self.decode), block=lay.block_size, page_stride=tuple(cache.page_strides))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """Write k, v ([N, Hkv, D] of ``layer``'s group) into the pages and attend q ([N, Hq, D]); returns [N, Hq, D].
        A KV-shared layer passes k = v = None (and only it may: ValueError otherwise)."""
        cache, lay = self.cache, self.cache.layout
        g = lay.layer_group[layer]
        off_k, off_v = cache.layer_offset(layer, 0), cache.layer_offset(layer, 1)
        flat, stride = cache.group_flat(g), cache.group_page_stride(g)
        shared = lay.kv_source[layer] != layer
        if (k is None) != shared or (v is None) != shared:
            raise ValueError(f"layer {layer} reads the KV of layer {lay.kv_source[layer]}: pass k = v = None" if shared
                             else f"layer {layer} owns its KV: pass its k and v")
        if k is not None:
            flat.index_copy_(0, self.write[g] + off_k, k.to(flat.dtype))
            flat.index_copy_(0, self.write[g] + off_v, v.to(flat.dtype))
        outs = []
        hkv, d = flat.shape[1], flat.shape[2]
        if self.decode[g] is not None:
            table, start, lengths = self.decode[g]
            b, bs = table.shape[0], cache.layout.block_size
            # one query per row, keys read in place from the pages (kernels.decode_attention), in float32
            out = kernels.decode_attention(q[:b].float(), flat[off_k:], flat[off_v:], table, start, lengths, bs,
                                           stride, self.scale, self.softcap)
            if out is None:  # no compiled kernel (or not on the CPU): gather, convert, attend
                width = int(lengths.max())
                pos = start[:, None] + torch.arange(width, device=table.device)[None, :]
                index = table.gather(1, (pos // bs).clamp(max=table.shape[1] - 1)) * stride + pos % bs
                keys = flat.index_select(0, (index + off_k).view(-1)).view(b, width, hkv, d).transpose(1, 2)
                vals = flat.index_select(0, (index + off_v).view(-1)).view(b, width, hkv, d).transpose(1, 2)
                mask = (torch.arange(width, device=index.device)[None, :] < lengths[:, None])[:, None, :]
                dt = torch.float32 if q.device.type == "cpu" else q.dtype
                out = attention(q[:b, :, None].to(dt), keys.to(dt), vals.to(dt), mask, self.scale, self.softcap)
                out = out[:, :, 0]
            outs.append(out)
        if self.packed[g] is not None:
            outs.append(self._attend_packed(self.packed[g], q, flat, off_k, off_v))
        for start, end, index, mask in [] if self.packed[g] is not None else self.prefill[g]:
            keys = flat.index_select(0, index + off_k).transpose(0, 1)[None]
            vals = flat.index_select(0, index + off_v).transpose(0, 1)[None]
            out = attention(q[start:end].transpose(0, 1)[None].to(keys.dtype), keys, vals, mask[None],
                            self.scale, self.softcap)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs).to(q.dtype) if len(outs) > 1 else outs[0].to(q.dtype)


@torch.inference_mode()
def run_step(net: PagedModel, cache: PagedKVCache, items: list[WorkItem]) -> torch.Tensor:
    """Compute one step; returns logits [R, vocab] for the items with ``want_logits`` (in order).

    Single-token items (decode rows) should come first: the leading run of them is attended as one batch. The caller
    commits the tokens (``cache.commit``) after this returns.
    """
    logits, _ = run_step_greedy(net, cache, items, None)
    return torch.stack(logits) if logits else torch.empty(0, net.config.vocab_size)


@torch.inference_mode()
def run_step_greedy(net: PagedModel, cache: PagedKVCache, items: list[WorkItem],
                    greedy: list[bool] | None) -> tuple[list[torch.Tensor | None], list[int | None]]:
    """The engine's step: like :func:`run_step`, but rows marked in ``greedy`` (one flag per row that wants logits)
    may come back as their exact greedy token instead of logits (``GemmaModel.greedy_head``: int8-activation products
    with an error bound, then exact logits for the few outputs it cannot rule out). Returns (logits: a float32
    [vocab] tensor per row, None where the row's token is given; tokens: int or None per row).

    NOTE: in the fast (int8) mode a product of a few rows runs the exact grouped-int8 kernel and a product of many
    rows a bf16 GEMM. When up to 8 decode rows share a step with prefill chunks they run as their own forward, so
    they stay exact: a session's decoded tokens do not depend on what else is in the batch. Prefill chunks of
    several prompts share one bf16 GEMM, whose rounding depends on its row count, so a prompt's prefill logits may
    differ in the last bf16 bit with its company. (One forward per chunk made prefills exact too, but
    bench/concurrency.py then gave 85 tok/s at 64 sessions where the run before these changes gave 120.) A greedy
    row's token is the exact head's argmax over its hidden state whatever the row count; a sampled row among more
    than 8 gets the head's int8-activation approximation (as it got bf16 products before), also when no row is
    greedy, where the backend's head keeps 8-bit activations (``Plan.approx_logits``; else it keeps its product's
    logits).
    """
    n_decode = leading_decode_rows(items)
    parts = [items]
    if net.weight_format == "int8" and 0 < n_decode < len(items) and backend.plan(n_decode).exact:
        parts = [items[:n_decode], items[n_decode:]]
    logits: list[torch.Tensor | None] = []
    tokens: list[int | None] = []
    for part in parts:
        h = _hidden_rows(net, cache, part)
        flags = None if greedy is None else greedy[len(tokens):len(tokens) + h.shape[0]]
        part_logits, part_tokens = _head(net, h, flags)
        logits += part_logits
        tokens += part_tokens
    return logits, tokens


def _head(net: PagedModel, h: torch.Tensor, greedy: list[bool] | None):
    n = h.shape[0]
    if n == 0:
        return [], []
    # the fast head (int8 activations): the exact greedy token of greedy rows, the approximate logits of sampled
    # ones; when every row is greedy (from the rows where plan.greedy_head), or when the rows are too many for the
    # exact kernel anyway, sampled or not (its approximation moves a row's softmax a little more than bf16 products
    # would, at a fraction of their time; bench/RESULTS.md); not for a few rows, where the exact kernel's logits are
    # as fast (the same tokens either way). Where the backend's head has coarser activations (plan.approx_logits
    # false), sampled rows keep the product's logits and only greedy rows go through the fast head.
    plan = backend.plan(n)
    if greedy is not None and plan.greedy_head and (all(greedy) or not plan.exact) and net.can_greedy_head():
        if all(greedy) or plan.approx_logits:
            found, approx = net.greedy_head(h, want_logits=not all(greedy))
            found = found.tolist()
            if all(t >= 0 for t in found):  # else a row has non-finite values: the plain logits for every row
                return ([None if g else approx[i] for i, g in enumerate(greedy)],
                        [t if g else None for t, g in zip(found, greedy)])
        elif any(greedy):
            rows = [i for i, g in enumerate(greedy) if g]
            found = net.greedy_head(h[rows], want_logits=False)[0].tolist()
            if all(t >= 0 for t in found):
                others = [i for i, g in enumerate(greedy) if not g]
                plain = dict(zip(others, net.logits(h[others], batch=True)))
                tokens = dict(zip(rows, found))
                return [plain.get(i) for i in range(n)], [tokens.get(i) for i in range(n)]
    out = net.logits(h, batch=True)  # (a row with non-finite values: argmax of the plain logits, as before)
    return list(out), [None] * n


def _hidden_rows(net: PagedModel, cache: PagedKVCache, items: list[WorkItem]) -> torch.Tensor:
    """The final hidden states [R, hidden] of the items that want logits."""
    dev = cache.device
    ids, pos, rows = [], [], []
    row = 0
    for it in items:
        s = it.seq.num_computed
        ids += it.seq.tokens[s:s + it.num_tokens]
        pos += range(s, s + it.num_tokens)
        row += it.num_tokens
        if it.want_logits:
            rows.append(row - 1)
    batch = PagedBatch(cache, items, *net.attention_params(), net.config.num_heads)
    ids_t, pos_t = torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, device=dev)
    if batch.n_decode == len(items) and net.can_decode_stack(len(items)):  # (the model's device is the cache's)
        h = net.hidden_decode_stack(ids_t, pos_t, batch.stack_args())  # every layer in one compiled call
    else:
        h = net.hidden(ids_t, pos_t, batch)
    if not rows:
        return h[:0]
    return h[torch.tensor(rows, device=dev)]


@torch.inference_mode()
def run_state_step(net, cache: StateCache, items: list[WorkItem]) -> torch.Tensor:
    """One engine step for a recurrent model: every single-token item (decode rows) in one batched forward over
    their slots, each prefill chunk on its own. Returns logits [R, vocab] for the items with ``want_logits``."""
    dev = cache.device
    out: dict[int, torch.Tensor] = {}
    decode = [i for i, it in enumerate(items) if it.num_tokens == 1]
    if decode:
        rows = [items[i] for i in decode]
        ids = torch.tensor([[it.seq.tokens[it.seq.num_computed]] for it in rows], dtype=torch.long, device=dev)
        slots = torch.tensor([it.seq.slot for it in rows], dtype=torch.long, device=dev)
        start = torch.tensor([it.seq.num_computed for it in rows], dtype=torch.long, device=dev)
        logits = net.forward_slots(ids, slots, start, cache.pool, last_only=True)[:, 0]
        out.update({i: logits[j] for j, i in enumerate(decode) if items[i].want_logits})
    for i, it in enumerate(items):
        if it.num_tokens == 1:
            continue
        s = it.seq.num_computed
        ids = torch.tensor([it.seq.tokens[s:s + it.num_tokens]], dtype=torch.long, device=dev)
        slot = torch.tensor([it.seq.slot], dtype=torch.long, device=dev)
        start = torch.tensor([s], dtype=torch.long, device=dev)
        logits = net.forward_slots(ids, slot, start, cache.pool, last_only=True)[0, 0]
        if it.want_logits:
            out[i] = logits
    if not out:
        return torch.empty(0, net.config.vocab_size)
    return torch.stack([out[i] for i in sorted(out)])


def run_state_step_greedy(net, cache: StateCache, items: list[WorkItem],
                          greedy: list[bool] | None) -> tuple[list[torch.Tensor], list[int | None]]:
    """:func:`run_state_step` in :func:`run_step_greedy`'s shape (every row's logits; the engine takes the argmax)."""
    logits = run_state_step(net, cache, items)
    return list(logits), [None] * logits.shape[0]
