"""The engine: one loop thread that owns the model and the KV cache; token ids in, token ids out.

Contract: ``Engine.submit(prompt_ids, params, kv=handle)`` is safe from any thread and returns a
:class:`GenerationStream` at once. The loop thread alone touches the model, the pages and the block tables;
everything else reaches it through a queue of commands (submit, cancel wake-ups, fork, release). The engine knows
nothing about text, chats or sessions; a ``KVHandle`` is how a caller keeps a sequence's KV between requests.

Gemma 1/2/3 and Gemma 4 (any ``runner.PagedModel``) keep K/V in a :class:`PagedKVCache`; RecurrentGemma keeps its
fixed-size state in a :class:`StateCache` of slots (same scheduler, same handles, snapshots instead of shared pages).

The loop survives what one request raises: a failure while admitting, scheduling or sampling a request fails that
request; a row whose logits are not finite fails its request with ``NumericalError``; a failed forward fails the
requests of its batch. Each such request's KV is dropped rather than parked (it may be the cause; a session
recomputes it from its token ids next turn) and the loop goes on with the next step. Only a failure outside any
request's work ends the loop (everyone then gets ``EngineClosedError``); ``alive`` and ``health()`` tell.

Snapshots restored with ``import_kv`` are checked against this engine's cache first (``check_snapshot``); one with
``shareable=False`` (a user's file) becomes a private sequence whose KV never enters the shared prefix cache.

Example::

    with gs.Engine(model, kv_cache_bytes=256 << 20) as engine:
        out = engine.submit(model.tokenizer.encode("Hi", add_bos=True), gs.SamplingParams(max_tokens=8)).result()
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from .. import kernels
from ..cache.kv import KVLayout, KVSnapshot, PagedKVCache
from ..cache.state import StateCache, StateSnapshot
from ..errors import (CapacityError, ContextLengthError, EngineBusyError, EngineClosedError, InvalidRequestError,
                      NumericalError, SessionFileError, UnsupportedModelError)
from ..sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenConstraint, TokenLogprob, token_logprob
from .request import GenerationOutput, GenerationStream, KVHandle, Request, State
from .runner import PagedConfig, PagedModel, StateModel, run_state_step_greedy, run_step_greedy
from .scheduler import Scheduler
from .work import WorkItem

log = logging.getLogger("gemma_sessions.engine")

SCORE_CHUNK = 16      # prompt tokens a scoring job computes at a time, by default (Engine's score_chunk)
MAX_SCORE_CHUNK = 256  # a chunk's float32 logits are chunk x vocabulary x 4 bytes (256: 268 MB on a 262k vocabulary)
SCORE_SHARE = 0.5     # while others run, scoring takes at most this much time per second of their steps
MAX_SCORING_JOBS = 64  # scoring jobs queued at most (EngineBusyError beyond); one computes at a time


class _ScoreJob:
    """One prompt being scored on the loop thread (``Engine.score``): its dense state exists only while it runs."""

    def __init__(self, ids: list[int], top: int) -> None:
        self.ids, self.top = ids, top
        self.out: list[TokenLogprob | None] = [None]
        self.state = None
        self.done = 0  # prompt tokens computed
        self.future: concurrent.futures.Future = concurrent.futures.Future()


def default_kv_cache_bytes(device: torch.device) -> int:
    """A sane default budget: a quarter of available memory, between 256 MiB and 8 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            free = 4 << 30
    return int(min(max(free // 4, 256 << 20), 8 << 30))


class Engine:
    """Continuous-batching generation over a paged KV cache, or recurrent state slots (see the module docstring).

    Args:
        model: a loaded :class:`~gemma_sessions.loading.Model`.
        kv_cache_bytes: KV budget in bytes (default: a quarter of free memory, 256 MiB .. 8 GiB); for RecurrentGemma
            the budget of its state slots (each holds one sequence of any length).
        max_batch: most sequences advanced together in one step.
        block_size: tokens per KV page.
        max_batched_tokens: tokens computed per step at most (the prefill chunk budget).
        kv_dtype: dtype of stored K/V (default: float32 for float32 models, else bfloat16).
        on_spill: called on the loop thread with (handle, snapshot) just before an idle session's KV is dropped
            under memory pressure (the durable store writes it to disk; the call must not block for long). The
            snapshot is ``export_kv(handle, spill_history(handle))``: with the attribute ``spill_history`` set (a
            callable on the loop thread: the history the handle's owner continues from, or None), a handle whose KV
            parted from its history (Gemma 4's dropped thoughts) spills its history's cached prefix.
        stop_ids: token ids that end a generation (default: ``model.stop_ids``, ``<eos>`` and ``<end_of_turn>``);
            the engine itself never reads the tokenizer.
        prefill_tokens_while_decoding: prompts' tokens a step computes at most while any request is decoding (default
            256, at most ``max_batched_tokens``): decoding requests' steps stay short, and a short turn's prompt is
            not held back until several prompts finish together in one long step (16 multi-turn clients on the
            270M: median time to first token ~35% lower for ~2-4% fewer tokens/s; bench/RESULTS.md).
        score_chunk: prompt tokens :meth:`score` computes at a time (default ``SCORE_CHUNK``, 1..256), fixed for the
            engine so that a prompt's scores never depend on the load. Larger chunks score faster (the products'
            weights are read once per chunk) and hold the other requests' steps back longer when scoring takes its
            turn (one chunk at a time); a server that mostly scores (an evaluation run) wants 128 or more.
    """

    def __init__(self, model, kv_cache_bytes: int | None = None, max_batch: int = 64, block_size: int = 16,
                 max_batched_tokens: int = 512, kv_dtype: torch.dtype | None = None,
                 on_spill: Callable[[KVHandle, KVSnapshot], None] | None = None,
                 stop_ids: Iterable[int] | None = None, prefill_tokens_while_decoding: int = 256,
                 score_chunk: int = SCORE_CHUNK):
        if min(max_batch, block_size, max_batched_tokens, prefill_tokens_while_decoding) < 1:
            raise InvalidRequestError("max_batch, block_size, max_batched_tokens and prefill_tokens_while_decoding "
                                      "must be >= 1")
        if not 1 <= score_chunk <= MAX_SCORE_CHUNK:
            raise InvalidRequestError(f"score_chunk must be in 1..{MAX_SCORE_CHUNK}")
        self.score_chunk = score_chunk
        self.model = model
        self.max_context = model.config.max_position_embeddings
        budget = kv_cache_bytes or default_kv_cache_bytes(model.device)
        if isinstance(model.net, PagedModel) and isinstance(model.config, PagedConfig):
            # Gemma 1/2/3 and Gemma 4: whatever the runner can step over pages (runner.PagedModel)
            layout = KVLayout.for_config(model.config, block_size)
            # KV in bf16 unless the model runs in exact float32 (halves memory, bandwidth and snapshot size).
            dtype = kv_dtype or (torch.float32 if model.weight_format == "float32" else torch.bfloat16)
            num_blocks = budget // layout.page_bytes(dtype)
            if num_blocks < layout.num_groups * 2:
                raise InvalidRequestError(f"kv_cache_bytes={budget} holds only {num_blocks} pages")
            self.cache = PagedKVCache(layout, num_blocks, dtype, model.device)
            self._run = run_step_greedy
            self._snapshot_type: type = KVSnapshot
            model.net.prepare_greedy()  # the greedy head's re-laid weights now, not in a first request's TTFT
            model.net.prepare_i16()  # likewise the layers' layout for batched steps (where qmatmul_i16 runs)
        elif isinstance(model.net, StateModel):
            # RecurrentGemma: fixed-size state slots instead of pages (a slot holds any length)
            slot_bytes = model.net.new_slots(1).slot_bytes()
            if budget // slot_bytes < 2:
                raise InvalidRequestError(f"kv_cache_bytes={budget} holds fewer than 2 state slots of {slot_bytes} B")
            self.cache = StateCache(model.net, budget // slot_bytes, model.device)
            self._run = run_state_step_greedy
            self._snapshot_type = StateSnapshot
        else:
            raise UnsupportedModelError(f"the engine cannot serve {model.config.architecture}")
        self.on_spill = on_spill
        self.spill_history: Callable[[KVHandle], Sequence[int] | None] | None = None
        self.scheduler = Scheduler(self.cache, max_batch, max_batched_tokens, self._fail, self._spill,
                                   prefill_tokens_while_decoding)
        self._stop_ids = set(model.stop_ids if stop_ids is None else stop_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._error: BaseException | None = None
        self._counters = {"steps": 0, "prefill_tokens": 0, "generated_tokens": 0, "requests": 0,
                          "failed": 0, "cancelled": 0, "busy_s": 0.0, "scored_tokens": 0}
        self._scoring: list[_ScoreJob] = []  # the loop thread's; the first computes
        self._score_credit = 0.0  # seconds scoring may take before the others' next step (SCORE_SHARE)
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="gemma-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ public API
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               kv: KVHandle | None = None, checkpoints: Sequence[int] = (),
               constraint: TokenConstraint | None = None) -> GenerationStream:
        """Queue a generation; returns its stream at once. Thread-safe.

        ``checkpoints``: prompt positions other sequences are likely to share (the end of a system prompt). A
        recurrent model snapshots its state there; paged KV shares every full block anyway and ignores them.
        ``constraint``: only the tokens it allows are generated (``constraints.JsonObjectConstraint``); it is
        this request's alone, and only the engine thread calls it.
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt) >= self.max_context:
            raise ContextLengthError(f"prompt has {len(prompt)} tokens; the context is {self.max_context}")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        params.check_vocab(vocab)
        req = Request(prompt, params, self._stop_ids, kv, self.max_context, tuple(int(c) for c in checkpoints),
                      constraint)
        if kv is not None:
            if kv.busy:
                raise InvalidRequestError("this KV handle is already in use by a running request")
            kv.busy = True
        self._send(("submit", req))
        return GenerationStream(req, self._wake)

    def score(self, prompt_ids: Sequence[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (the first token's: None), with the
        ``top`` likeliest alternatives at each position (0..20): OpenAI's ``echo`` with ``logprobs``, vLLM's
        ``prompt_logprobs``. Safe from any thread; blocks until done.

        The prefix cache holds no logits, so the whole prompt is computed, exactly (float32 logits, as ``generate``),
        on the loop thread, ``score_chunk`` tokens at a time between steps of the other requests, within
        ``SCORE_SHARE`` of their steps' time: they slow down by a third at most while a prompt is scored (and a
        scored prompt goes slower while they run), they never wait for a whole prompt. One prompt computes at a
        time, in a dense state of its length outside the KV budget; at most ``MAX_SCORING_JOBS`` wait
        (``EngineBusyError`` beyond)."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) > self.max_context:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; the context is {self.max_context}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top must be in [0, {MAX_TOP_LOGPROBS}]")
        job = _ScoreJob(ids, top)
        self._send(("score", job))
        return job.future.result()

    def new_kv(self) -> KVHandle:
        """A handle that keeps a sequence's KV between requests (a session's cache)."""
        return KVHandle()

    def fork_kv(self, handle: KVHandle) -> KVHandle:
        """A new handle sharing ``handle``'s cached blocks (copy on write). Thread-safe; waits for the loop."""
        return self._call(lambda: self._fork(handle))

    def release_kv(self, handle: KVHandle) -> None:
        """Drop a handle's KV (its full blocks stay in the prefix cache until evicted)."""
        self._send(("call", (self._release, handle, None)))

    def kv_tokens(self, handle: KVHandle) -> int:
        """Tokens whose KV the handle holds now."""
        return self._call(lambda: handle.seq.num_computed if handle.seq is not None else 0)

    def export_kv(self, handle: KVHandle, tokens: Sequence[int] | None = None) -> KVSnapshot | None:
        """A CPU copy of the handle's KV (None when it holds none). Thread-safe.

        ``tokens``: what the caller will continue from (a session's history). When the handle's computed tokens are
        not a prefix of them, the copy is of the longest block-aligned prefix of ``tokens`` the cache holds (None if
        none), so that a restore continues without recomputing what they share.

        NOTE: Gemma 4's chat template drops the thought channel of a model turn from history (even the empty one of a
        generation prompt with thinking off), so after a turn the history parts from the tokens the model saw just
        before the reply. In memory the next turn adopts the shared prefix from the prefix cache (``cache.start``);
        a copy of the handle's own sequence would hold only the last window of its sliding layers, none of it before
        that point, and could not be continued. The shared prefix is found the same way here: a sequence started on
        ``tokens`` (sharing the cached pages, including sliding pages the handle released but the prefix cache still
        holds), copied, then freed.
        """
        return self._call(lambda: self._export(handle, None if tokens is None else [int(t) for t in tokens]))

    def _export(self, handle: KVHandle, tokens: list[int] | None) -> KVSnapshot | StateSnapshot | None:
        seq = handle.seq
        if seq is None:
            return None
        if tokens is None or seq.tokens[:seq.num_computed] == tokens[:seq.num_computed]:
            return self.cache.export(seq)
        prefix = self.cache.adopt_prefix(tokens)
        try:
            return self.cache.export(prefix) if prefix.num_computed else None
        finally:
            self.cache.free(prefix)

    def rebase_kv(self, handle: KVHandle, tokens: Sequence[int]) -> int:
        """Make an idle handle hold the longest cached prefix of ``tokens`` when its KV no longer leads to them (a
        history that dropped part of what was computed: Gemma 4's thoughts), so the pages that history's next turn
        needs are held by the session instead of left to the prefix cache, where memory pressure would reclaim
        them first. A handle whose KV ``tokens`` continue, or whose history nothing cached covers, is left as it is.
        Returns the tokens the handle holds. Thread-safe; waits for the loop."""
        return self._call(lambda: self._rebase(handle, [int(t) for t in tokens]))

    def _rebase(self, handle: KVHandle, tokens: list[int]) -> int:
        seq = handle.seq
        if seq is None or handle.busy:
            return 0 if seq is None else seq.num_computed
        n = seq.num_computed
        if len(tokens) >= n and tokens[:n] == seq.tokens[:n]:
            return n
        prefix = self.cache.adopt_prefix(tokens)
        if not prefix.num_computed:
            self.cache.free(prefix)
            return n
        self.cache.free(seq)
        handle.seq = prefix
        return prefix.num_computed

    def import_kv(self, handle: KVHandle, snapshot: KVSnapshot | StateSnapshot) -> bool:
        """Give an idle handle the KV in ``snapshot``; False when memory cannot hold it now. Thread-safe.

        A snapshot with ``shareable=False`` becomes a private sequence: its blocks, and every block computed on top of
        them by this handle or its forks, are never shared through the prefix cache. Raises SessionFileError when
        the snapshot does not fit this engine (:meth:`check_snapshot`), ValueError for the other kind of snapshot
        (paged KV for a recurrent model or the reverse: a caller's mistake).
        """
        if isinstance(snapshot, self._snapshot_type):
            self.check_snapshot(snapshot)  # here, not on the loop thread (the cache checks the layout again there)
        return self._call(lambda: self._import(handle, snapshot))

    def check_snapshot(self, snapshot: KVSnapshot | StateSnapshot) -> None:
        """Raise SessionFileError, with the reason, unless ``snapshot`` fits this engine's cache: its kind, block size,
        layer groups, page shapes (kv heads, head dim) or recurrent state names / shapes / dtypes, its block
        positions against its token count, token ids in the vocabulary and fewer tokens than the context.

        Thread-safe without the loop thread (layouts are immutable). Values are not checked here: session files
        check theirs when decoded (``sessionfile.decode_session``).
        """
        self.cache.check_snapshot(snapshot)
        tokens, vocab = snapshot.tokens, self.model.config.vocab_size
        if len(tokens) >= self.max_context:
            raise SessionFileError(f"the snapshot holds {len(tokens)} tokens; the context is {self.max_context}")
        if any(type(t) is not int or not 0 <= t < vocab for t in tokens):
            raise SessionFileError(f"the snapshot's token ids must be ints in [0, {vocab})")

    def _import(self, handle: KVHandle, snapshot: KVSnapshot) -> bool:
        if handle.busy:
            raise InvalidRequestError("cannot restore KV into a handle that is in use")
        while True:
            try:
                seq = self.cache.import_snapshot(snapshot)
                break
            except CapacityError:
                if not self.scheduler.evict_one_parked():
                    return False
        self._release(handle)
        self.scheduler.park(handle, seq)
        return True

    def _spill(self, handle: KVHandle) -> None:
        if self.on_spill is None or handle.seq is None or not handle.seq.num_computed:
            return
        try:
            tokens = self.spill_history(handle) if self.spill_history is not None else None
            snap = self._export(handle, None if tokens is None else [int(t) for t in tokens])
            # none of the history cached (its released sliding pages reused): the handle's own copy, as before
            self.on_spill(handle, snap if snap is not None else self.cache.export(handle.seq))
        except Exception:  # a failed spill only costs a recompute later; never kill the loop for it
            log.exception("spilling a session's KV failed")

    def kv_bytes(self, handle: KVHandle) -> int:
        """Bytes of KV pages the handle holds now (shared pages counted in full)."""
        return self._call(lambda: self.cache.bytes_held(handle.seq) if handle.seq is not None else 0)

    def stats(self) -> dict:
        """Engine-wide statistics (a consistent snapshot taken on the loop thread)."""
        return self._call(self._stats)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no sequence holds (benchmarks: a cold start without a new engine). Paged KV
        only (a recurrent state cache has no prefix cache to reset). Thread-safe; waits for the loop."""
        self._call(lambda: self.cache.pool.reset_prefix_cache() if isinstance(self.cache, PagedKVCache) else None)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the loop thread between steps while the block runs: requests submitted meanwhile are admitted in one
        step when it ends (benchmarks of a burst of arrivals). Thread-safe; do not wait on results inside it."""
        go = threading.Event()
        self._send(("call", (go.wait, None, None)))
        try:
            yield
        finally:
            go.set()

    def reserve_memory(self) -> None:
        """Make the whole KV budget resident now, not as pages are first used: a server's memory is then what it
        was configured to use from its start (a supervisor sees its size at once; it does not grow with load)."""
        self._call(self.cache.reserve)

    @property
    def alive(self) -> bool:
        """The loop thread runs and accepts work (not closed, no fatal error). Any thread; never waits."""
        return self._thread.is_alive() and self._error is None and not self._closed

    def health(self) -> dict:
        """{"alive", "running", "waiting", "parked", "failed", "error"} read without the loop thread (never waits on a
        busy step; the counts may be a step old). ``error`` names the fatal error's type, or is None."""
        sched = self.scheduler
        return {"alive": self.alive, "running": len(sched.running), "waiting": len(sched.waiting),
                "parked": len(sched.parked), "failed": self._counters["failed"],
                "error": None if self._error is None else type(self._error).__name__}

    def cancel_all(self) -> int:
        """Cancel every running and waiting request (a graceful shutdown): each ends with finish_reason "cancelled"
        at the loop's next step, its KV parked as on any cancel. Returns how many. Thread-safe; waits for the loop to
        take the command (at most one step); 0 when the engine is not alive."""
        if not self.alive:
            return 0
        try:
            return self._call(self._cancel_all)
        except EngineClosedError:
            return 0

    def _cancel_all(self) -> int:
        requests = [*self.scheduler.running, *self.scheduler.waiting]
        for req in requests:
            req.cancelled = True
        return len(requests)

    def close(self) -> None:
        """Stop the loop; pending requests fail with EngineClosedError. Idempotent."""
        if not self._closed:
            self._closed = True
            self._inbox.put(("close", None))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ plumbing
    def _send(self, msg: tuple) -> None:
        if self._closed or self._error is not None:
            raise EngineClosedError("the engine is closed" if self._error is None else f"engine died: {self._error}")
        self._inbox.put(msg)

    def _wake(self) -> None:
        self._inbox.put(("wake", None))

    def _call(self, fn: Callable[[], object]):
        if threading.current_thread() is self._thread:
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("call", (fn, None, fut)))
        return fut.result()

    def _fork(self, handle: KVHandle) -> KVHandle:
        child = KVHandle()
        if handle.seq is not None:
            child.seq = self.cache.fork(handle.seq)
            self.scheduler.park(child, child.seq)
        return child

    def _release(self, handle: KVHandle) -> None:
        # NOTE: also when busy: a running request holds its sequence itself (handle.seq is None then), so a busy
        # handle's seq is KV parked for a request not admitted yet (``release_kv`` then ``submit``), which then
        # starts from the prefix cache instead of continuing KV its caller dropped
        self.scheduler.parked.pop(handle.id, None)
        if handle.seq is not None:
            self.cache.free(handle.seq)
            handle.seq = None

    # ------------------------------------------------------------------------------------------ loop thread
    def _loop(self) -> None:
        try:
            while True:
                if not self._drain(block=not (self.scheduler.running or self.scheduler.waiting or self._scoring)):
                    break
                t0 = time.perf_counter()
                self._step()
                if self._scoring:
                    self._score_turn(time.perf_counter() - t0)
        except BaseException as exc:  # the loop must never die silently: fail everyone, refuse new work
            log.exception("engine loop died")
            self._error = exc
            self._closed = True
            self._fail_all(EngineClosedError(f"engine loop died: {exc!r}"))
            return
        self._fail_all(EngineClosedError("the engine was closed"))

    def _drain(self, block: bool) -> bool:
        """Handle queued commands; returns False when the engine should stop."""
        while True:
            try:
                kind, value = self._inbox.get() if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if kind == "close":
                return False
            if kind == "submit":
                self._counters["requests"] += 1
                self.scheduler.waiting.append(value)
            elif kind == "score":
                if len(self._scoring) >= MAX_SCORING_JOBS:
                    value.future.set_exception(EngineBusyError(f"{MAX_SCORING_JOBS} prompts are already waiting to "
                                                               "be scored; try again later"))
                else:
                    self._scoring.append(value)
            elif kind == "call":
                fn, arg, fut = value
                try:
                    result = fn(arg) if arg is not None else fn()
                except BaseException as exc:  # reported to the caller, the loop goes on
                    if fut is not None:
                        fut.set_exception(exc)
                else:
                    if fut is not None:
                        fut.set_result(result)

    def _step(self) -> None:
        sched = self.scheduler
        self._reap_cancelled()
        sched.admit()  # (admission and scheduling fail a request alone when it raises)
        work = sched.schedule()
        if not work:
            return
        t0 = time.perf_counter()
        greedy = [not req.needs_logits for req, it in work if it.want_logits]
        try:
            logits, tokens = self._run(self.model.net, self.cache, [item for _, item in work], greedy)
            tokens = list(tokens)
            bad = self._check_rows(logits, tokens, greedy)
        except Exception as exc:  # the batch's requests fail, their KV dropped (it may be the cause); the loop goes on
            log.exception("a step of %d requests failed", len(work))
            for req, _ in work:
                self._fail(req, exc, drop_kv=True)
            return
        row = 0
        for req, item in work:
            r = row if item.want_logits else -1
            row += item.want_logits
            try:
                self._advance(req, item, r, r in bad, logits, tokens)
            except NumericalError as exc:
                log.warning("request %d: non-finite logits; it fails, its KV is dropped", req.id)
                self._fail(req, exc, drop_kv=True)
            except Exception as exc:  # e.g. the sampler refusing its probabilities: this request fails alone
                log.exception("request %d failed", req.id)
                self._fail(req, exc, drop_kv=True)
        self._counters["steps"] += 1
        self._counters["busy_s"] += time.perf_counter() - t0

    def _score_turn(self, stepped: float) -> None:
        """Score a chunk when it is scoring's turn: always while no request runs, else within ``SCORE_SHARE`` of
        the time the other requests' steps take (a scored prompt slows them by a third at most)."""
        if not (self.scheduler.running or self.scheduler.waiting):
            self._score_credit = 0.0
            self._score_chunk()
            return
        self._score_credit = min(self._score_credit + stepped * SCORE_SHARE, 1.0)
        if self._score_credit > 0:
            t0 = time.perf_counter()
            self._score_chunk()
            self._score_credit -= time.perf_counter() - t0

    def _score_chunk(self) -> None:
        """The first scoring job's next ``score_chunk`` tokens; a finished or failed job leaves the queue (its
        failure is its caller's alone)."""
        job = self._scoring[0]
        try:
            net = self.model.net
            if job.state is None:
                job.state = net.new_sequence(len(job.ids))
            start, end = job.done, min(job.done + self.score_chunk, len(job.ids))
            with torch.inference_mode():
                ids = torch.tensor(job.ids[start:end], dtype=torch.long, device=self.model.device)
                logits = net.step(ids, job.state, last_only=False)  # row r predicts token start + r + 1
                for r in range(min(end, len(job.ids) - 1) - start):
                    row = logits[r]
                    if not bool(torch.isfinite(row.sum())):
                        raise NumericalError("the model produced non-finite logits (NaN or inf) for this prompt")
                    job.out.append(token_logprob(row, job.ids[start + r + 1], job.top))
            job.done = end
            self._counters["scored_tokens"] += end - start
            if end < len(job.ids):
                return
            result: object = job.out
        except Exception as exc:  # this prompt fails alone
            log.exception("scoring a prompt of %d tokens failed", len(job.ids))
            result = exc
        self._scoring.pop(0)
        job.state = None
        if isinstance(result, Exception):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    @staticmethod
    def _check_rows(logits: list, tokens: list, greedy: list[bool]) -> set[int]:
        """Rows whose logits hold NaN / inf (a greedy row the head decided has no logits and is fine). Fills
        ``tokens`` for the other greedy rows the head did not decide: one argmax over their logits.

        NOTE: a row is tested by the finiteness of its sum, one reduction per row and no copy: any NaN or inf makes the
        sum NaN or inf. (Finite logits whose sum overflows float32, |logit| ~1e33, would count as bad too; no working
        model makes them.) ``torch.isfinite(logits).all(dim=-1)`` is exact but writes a bool per logit: on a 2-core
        machine, 262k-vocab rows, ~0.8 ms for 1 row and ~80 ms for 64 rows against 0.04 ms and ~4 ms for the sums.
        """
        have = [i for i, x in enumerate(logits) if x is not None]
        if not have:
            return set()
        finite = torch.isfinite(torch.stack([logits[i].sum() for i in have])).tolist()
        bad = {i for i, ok in zip(have, finite) if not ok}
        missing = [i for i in have if greedy[i] and tokens[i] is None and i not in bad]
        if missing:  # one argmax call instead of one per row
            for i, t in zip(missing, kernels.argmax(torch.stack([logits[i] for i in missing])).tolist()):
                tokens[i] = t
        return bad

    def _advance(self, req: Request, item: WorkItem, row: int, nonfinite: bool, logits: list, tokens: list) -> None:
        """Commit one request's computed tokens and sample its next token (``row`` < 0: it wants none yet)."""
        if nonfinite:  # before the commit: blocks of this step are never registered in the prefix cache
            raise NumericalError("the model produced non-finite logits (NaN or inf) for this request; its KV was "
                                 "dropped (a session recomputes it from its token ids)")
        self.cache.commit(item.seq, item.num_tokens)
        req.computed += item.num_tokens
        self._counters["prefill_tokens"] += item.num_tokens if item.num_tokens > 1 else 0
        if row >= 0:
            if not req.needs_logits:
                self._sample(req, tokens[row])
                return
            token = req.sampler(logits[row], req.output, req.constraint)
            if req.constraint is not None:
                req.constraint.advance(token)
            top = req.params.logprobs
            self._sample(req, token, None if top is None else token_logprob(logits[row], token, top))

    def _sample(self, req: Request, token: int, logprob: TokenLogprob | None = None) -> None:
        now = time.perf_counter()
        if not req.t_first:
            req.t_first = now
        if token in req.stop_ids:
            self._finish(req, "stop")
            return
        req.output.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        req.seq.tokens.append(token)
        self._counters["generated_tokens"] += 1
        req.emit(("token", token))
        if len(req.output) >= req.params.max_tokens or len(req.seq.tokens) >= req.max_context:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        req.t_done = time.perf_counter()
        req.finish_reason = reason
        self.scheduler.remove(req)
        self._retire(req)
        req.state = State.DONE
        logprobs = None if req.params.logprobs is None else list(req.logprobs)
        req.emit(("done", GenerationOutput(token_ids=list(req.output), finish_reason=reason, stats=req.stats(),
                                           logprobs=logprobs)))

    def _retire(self, req: Request) -> None:
        """Park the request's KV in its handle (a session keeps it between turns) or free it."""
        seq, req.seq = req.seq, None
        if req.handle is not None:
            req.handle.busy = False
            if seq is not None:
                self.scheduler.park(req.handle, seq)
        elif seq is not None:
            self.cache.free(seq)

    def _fail(self, req: Request, exc: BaseException, drop_kv: bool = False) -> None:
        """End ``req`` with ``exc``; ``drop_kv``: discard its KV instead of parking it (it may be what failed)."""
        self._counters["failed"] += 1
        self.scheduler.remove(req)
        req.t_done = time.perf_counter()
        if drop_kv:
            self._discard(req)
        else:
            self._retire(req)
        req.state = State.DONE
        req.emit(("error", exc))

    def _discard(self, req: Request) -> None:
        """Free a failed request's KV and drop it from the prefix cache; its handle is left empty (recompute)."""
        seq, req.seq = req.seq, None
        if req.handle is not None:
            req.handle.busy = False
        if seq is None:
            return
        try:
            self.cache.discard(seq)
        except Exception:  # bookkeeping broken by the failure: lose these pages rather than every request
            log.exception("freeing a failed request's KV failed; its pages stay unusable until a restart")

    def _reap_cancelled(self) -> None:
        sched = self.scheduler
        for req in [r for r in (*sched.running, *sched.waiting) if r.cancelled]:
            self._counters["cancelled"] += 1
            if req.seq is not None:
                req.seq.tokens = req.seq.tokens[:req.seq.num_computed]  # never park uncomputed tokens
            self._finish(req, "cancelled")

    def _fail_all(self, exc: BaseException) -> None:
        sched = self.scheduler
        for req in [*sched.running, *sched.waiting]:
            self._fail(req, exc)
        for job in self._scoring:
            job.future.set_exception(exc)
        self._scoring = []
        while True:
            try:
                kind, value = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                value.emit(("error", exc))
            elif kind == "call" and value[2] is not None:
                value[2].set_exception(exc)
            elif kind == "score":
                value.future.set_exception(exc)

    def _stats(self) -> dict:
        c, sched = self.cache, self.scheduler
        elapsed = time.perf_counter() - self._started
        stats = c.stats()
        return {
            "running": len(sched.running), "waiting": len(sched.waiting), "parked": len(sched.parked),
            **stats,
            "prefix_hit_rate": (stats["prefix_hit_tokens"] / stats["prefix_queried_tokens"]
                                if stats["prefix_queried_tokens"] else 0.0),
            "session_kv_evictions": sched.parked_evictions, "preemptions": sched.preemptions,
            "prompt_steps_held_for_prefix": sched.held_for_prefix, "scoring_jobs": len(self._scoring),
            "generated_tokens_per_s": self._counters["generated_tokens"] / elapsed if elapsed else 0.0,
            **self._counters,
        }
