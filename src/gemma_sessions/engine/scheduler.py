"""Continuous batching: which requests advance in the next step, by how many tokens, and who gives way.

Contract: ``Scheduler.schedule()`` returns the step's work (decode rows first, then prefill chunks) with KV pages
already allocated. Every running request that is decoding advances by one token each step; prompts are
prefilled in chunks of at most ``max_batched_tokens`` tokens per step in total, so one long prompt cannot stall
the others, and of at most ``prefill_tokens_while_decoding`` while any request decodes, so a step of decode rows
stays short (their next tokens stream on) and a short prompt's turn ends sooner than if several prompts shared one
long step; requests join (``admit``) and leave (``finish``) between steps.

NOTE: like vLLM v1 there are no separate prefill and decode phases: a request simply has ``len(tokens) -
num_computed`` tokens left to compute, and each step gives every running request as many as the budget allows.

Memory pressure, in order: (1) the pool reuses unreferenced cached blocks (LRU) by itself; (2) parked sessions'
KV (idle, between turns) is dropped, least recently used first; (3) the newest running request is preempted
(its blocks go back to the prefix cache, it re-queues and recomputes). A request that cannot fit even alone fails
with ``CapacityError``; the others keep running.

A request whose admission or scheduling raises anything else fails alone (``fail(req, exc, drop_kv=True)``: its KV
is dropped, since it may be the cause); the other requests are scheduled as usual.

The cache is any :class:`~gemma_sessions.cache.protocol.KVCache`: a ``PagedKVCache`` (Gemma) or a ``StateCache``
(RecurrentGemma's fixed-size state slots). This module imports neither, nor the runner: the step's work is plain
:class:`~.work.WorkItem` data.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from ..cache.protocol import KVCache
from ..errors import CapacityError
from .request import KVHandle, Request, State
from .work import WorkItem

log = logging.getLogger("gemma_sessions.engine")

FailFn = Callable[..., None]
"""``fail(request, exc, drop_kv=False)``: end a request with an error (the engine's ``_fail``)."""


class Scheduler:
    def __init__(self, cache: KVCache, max_batch: int, max_batched_tokens: int,
                 fail: FailFn,
                 spill: Callable[[KVHandle], None] | None = None,
                 prefill_tokens_while_decoding: int | None = None):
        self.cache = cache
        self.max_batch = max_batch
        self.max_batched_tokens = max_batched_tokens
        self.prefill_tokens_while_decoding = prefill_tokens_while_decoding or max_batched_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.parked: collections.OrderedDict[int, KVHandle] = collections.OrderedDict()  # LRU of idle sessions
        self._fail = fail
        self._spill = spill  # called with an idle handle just before its KV is dropped (tiered eviction)
        self.preemptions = 0
        self.parked_evictions = 0
        self.held_for_prefix = 0  # steps a new prompt waited for an earlier one computing their shared prefix

    # ------------------------------------------------------------------------------------------ admission
    def admit(self) -> None:
        """Move waiting requests into the running batch while there is room."""
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            total = min(len(req.prompt) + req.params.max_tokens, req.max_context)
            if not self.cache.could_ever_fit(total):
                self.waiting.popleft()
                self._fail(req, CapacityError(
                    f"request of {len(req.prompt)} prompt + {req.params.max_tokens} new tokens can never fit "
                    f"the KV cache ({self.cache.describe()})"))
                continue
            if self.running and not self.cache.has_room(min(len(req.prompt), self.max_batched_tokens)):
                break  # let running requests finish first; nothing else to admit until memory frees up
            self.waiting.popleft()
            try:
                self._start(req)
            except Exception as exc:  # this request fails alone; the others are admitted as usual
                log.exception("admitting request %d failed", req.id)
                self._fail(req, exc, drop_kv=True)
                continue
            self.running.append(req)

    def _start(self, req: Request) -> None:
        """Give ``req`` its sequence: its handle's (continued, or dropped when the history diverged) or a new one.
        ``req.seq`` holds whatever it has at every point, so a failure here loses no pages."""
        cache, handle = self.cache, req.handle
        tokens = req.prompt + req.output  # after a preemption, what was generated is recomputed too
        if handle is not None:
            self.parked.pop(handle.id, None)
            if handle.seq is not None:
                req.seq, handle.seq = handle.seq, None
        seq = req.seq
        if seq is not None and not cache.resume(seq, tokens):  # a continuation computes only the new tokens
            req.seq = None  # history diverged (truncation, edit): drop it; the prefix cache may still hold a prefix
            cache.free(seq)
            seq = None
        if seq is None:
            seq = req.seq = cache.start(tokens, req.checkpoints)
        if req.cached_tokens < 0:  # first admission (a preempted request keeps its original number)
            req.cached_tokens = seq.cached_at_start
        req.state = State.RUNNING

    # ------------------------------------------------------------------------------------------ scheduling
    def schedule(self) -> list[tuple[Request, WorkItem]]:
        """Allocate and return this step's work: [(request, item)], single-token items first."""
        budget = self.max_batched_tokens
        running = [(r, r.left() <= 1) for r in self.running if r.state is State.RUNNING]  # (request, decoding)
        # prompts' tokens this step: fewer while any request decodes (a request with one token left to compute)
        prefill = min(budget, self.prefill_tokens_while_decoding) if any(d for _, d in running) else budget
        work: list[tuple[Request, WorkItem]] = []
        ahead: list[Request] = []  # prompts earlier in the batch, still computing: a later one may wait for them
        for req, decode in running:
            if not decode and prefill <= 0:
                continue
            try:
                item = self._schedule_one(req, budget if decode else min(budget, prefill), ahead)
            except Exception as exc:  # this request fails alone; the step goes on with the others
                log.exception("scheduling request %d failed", req.id)
                self._fail(req, exc, drop_kv=True)
                continue
            if not decode and req.seq is not None:  # (a request preempted while scheduling holds no KV to wait for)
                ahead.append(req)
            if item is None:
                continue
            if not decode:
                prefill -= item.num_tokens
            budget -= item.num_tokens
            work.append((req, item))
            if budget <= 0:
                break
        work.sort(key=lambda w: w[1].num_tokens != 1)  # stable: decode rows first
        return work

    def _schedule_one(self, req: Request, budget: int, ahead: list[Request] = ()) -> WorkItem | None:
        """Allocate ``req``'s next chunk (at most ``budget`` tokens); None when it gets no room this step, or when
        it has computed nothing yet and a prompt ``ahead`` of it is still computing tokens it will share (it adopts
        them once they are there, instead of computing them a second time alongside)."""
        seq = req.seq
        if req.computed == 0 and seq.num_computed < len(seq.tokens) - 1:
            req.cached_tokens += self.cache.rematch(seq)  # a prefix computed since it was admitted
            for other in ahead:
                shared = self.cache.shared_prefix(other.seq, seq.tokens)
                if shared > seq.num_computed and other.seq.num_computed < shared:
                    self.held_for_prefix += 1
                    return None
        n = self._allocate(req, min(req.left(), budget))
        if n == 0:
            return None
        return WorkItem(seq=seq, num_tokens=n, want_logits=seq.num_computed + n == len(seq.tokens))

    def _allocate(self, req: Request, n: int) -> int:
        """Allocate pages for up to ``n`` tokens of ``req``; returns how many tokens got room (0: none; fewer than
        ``n`` also when the cache cuts the chunk at a checkpoint).

        Under pressure: drop idle sessions' KV first, then shrink a prefill chunk, then preempt the newest
        running request (possibly ``req`` itself); a request alone that still cannot fit fails.
        """
        while n > 0:
            try:
                return self.cache.allocate(req.seq, n)
            except CapacityError:
                if self.evict_one_parked():
                    continue
                if n > 1:
                    n //= 2
                    continue
                victim = self.running[-1]
                if victim is req:
                    if len(self.running) == 1:
                        self._fail(req, CapacityError("the request no longer fits the KV cache"))
                    else:
                        self.preempt(req)
                    return 0
                self.preempt(victim)
                n = 1
        return 0

    def evict_one_parked(self) -> bool:
        """Drop the least recently used idle session's KV (spilling it first); False when none is left."""
        while self.parked:
            _, handle = self.parked.popitem(last=False)
            if handle.seq is not None:
                if self._spill is not None:
                    self._spill(handle)
                self.cache.free(handle.seq)
                handle.seq = None
                handle.evictions += 1
                self.parked_evictions += 1
                return True
        return False

    def preempt(self, req: Request) -> None:
        """Send a running request back to the front of the queue; its KV goes to the prefix cache."""
        self.running.remove(req)
        self.cache.free(req.seq)
        req.seq = None
        req.state = State.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def park(self, handle: KVHandle, seq) -> None:
        handle.seq = seq
        self.parked[handle.id] = handle
        self.parked.move_to_end(handle.id)
