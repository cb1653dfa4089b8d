"""One generation request, its per-request statistics, and the client-side stream over its tokens.

Contract: the engine thread fills a request's event queue (``("token", id)``, then one ``("done", output)`` or
``("error", exc)``); any other thread consumes it through :class:`GenerationStream`. A request that asked for
logprobs has its token's ``TokenLogprob`` recorded before the token's event is queued. Closing the stream (or
``cancel()``) marks the request cancelled; the engine frees its slot at its next step.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator

from ..sampling import Sampler, SamplingParams, TokenConstraint, TokenLogprob

_ids = itertools.count(1)


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestStats:
    """What one request cost. ``cached_tokens + prefilled_tokens == prompt_tokens + recomputed_tokens``."""

    prompt_tokens: int
    cached_tokens: int        # prompt tokens whose KV was already there (session's own or the prefix cache)
    prefilled_tokens: int     # prompt tokens computed by this request
    generated_tokens: int
    recomputed_tokens: int    # tokens computed again after a preemption
    preemptions: int
    queued_s: float
    ttft_s: float             # submit -> first generated token
    decode_tokens_per_s: float
    total_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationOutput:
    token_ids: list[int]
    finish_reason: str        # "stop" | "length" | "cancelled"
    stats: RequestStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, where SamplingParams.logprobs asked for them


class KVHandle:
    """A session's KV between turns (opaque to callers; only the engine thread touches ``seq``)."""

    __slots__ = ("id", "seq", "busy", "evictions", "__weakref__")

    def __init__(self) -> None:
        self.id = next(_ids)
        self.seq = None      # SeqKV while parked or running; None when dropped
        self.busy = False    # a request is using it
        self.evictions = 0   # times its KV was dropped under memory pressure


class Request:
    """Engine-side state of one generation (mutated only by the engine thread, except ``cancelled``)."""

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: set[int], handle: KVHandle | None,
                 max_context: int, checkpoints: tuple[int, ...] = (), constraint: TokenConstraint | None = None):
        self.id = next(_ids)
        self.prompt = prompt
        self.checkpoints = checkpoints  # prompt positions worth a state snapshot (a system prompt's end)
        self.params = params
        self.sampler = Sampler(params)
        self.constraint = constraint  # only tokens it allows are picked (the engine thread alone calls it)
        # the token comes from the logits row (sampling, penalties, logprobs, a constraint), not the greedy head
        self.needs_logits = params.needs_logits or constraint is not None
        self.stop_ids = set() if params.ignore_eos else stop_ids
        self.handle = handle
        self.max_context = max_context
        self.seq = None
        self.state = State.WAITING
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per output token when params.logprobs is not None
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.cached_tokens = -1  # set at first admission
        self.computed = 0        # tokens computed by this request (prompt and recomputation)
        self.preemptions = 0
        self.t_submit = time.perf_counter()
        self.t_admit = 0.0
        self.t_first = 0.0
        self.t_done = 0.0
        self.finish_reason = ""

    def emit(self, event: tuple) -> None:
        self.events.put(event)

    def left(self) -> int:
        """Tokens of the running request's sequence still to compute: 1 while it decodes, more while a prompt (or a
        recomputation after preemption) is prefilled."""
        return len(self.seq.tokens) - self.seq.num_computed

    def stats(self) -> RequestStats:
        n = len(self.output)
        cached = max(self.cached_tokens, 0)
        decode_s = self.t_done - self.t_first if self.t_first else 0.0
        prefilled = min(self.computed, len(self.prompt) - cached)
        return RequestStats(
            prompt_tokens=len(self.prompt), cached_tokens=cached, prefilled_tokens=prefilled,
            generated_tokens=n, recomputed_tokens=max(0, self.computed - prefilled - max(n - 1, 0)),
            preemptions=self.preemptions, queued_s=max(0.0, self.t_admit - self.t_submit),
            ttft_s=(self.t_first - self.t_submit) if self.t_first else 0.0,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=self.t_done - self.t_submit)


# How often a waiting result() or iterator looks whether the other took the end event.
_RESULT_POLL_S = 0.05


class GenerationStream:
    """Iterate the generated token ids of one request; ``result()`` waits for the end.

    Example::

        stream = engine.submit(prompt_ids, gs.SamplingParams(temperature=0, max_tokens=32))
        for token_id in stream: ...
        out = stream.result()          # GenerationOutput(token_ids, finish_reason, stats)
    """

    def __init__(self, request: Request, wake: Callable[[], None]):
        self._request = request
        self._wake = wake
        self._output: GenerationOutput | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[int]:
        while True:
            kind, value = self._next_event()
            if kind == "token":
                yield value
            elif kind == "done":
                return

    def _take(self, wait: float) -> tuple[str, object] | None:
        """One event of the engine's, None after ``wait`` seconds without one. The end and an error are kept on
        the stream, so the iterator and ``result()`` both see them whichever thread took them (each waits in short
        polls and looks again)."""
        try:
            kind, value = self._request.events.get(timeout=wait)
        except queue.Empty:
            return None
        if kind == "done":
            self._output = value
        elif kind == "error":
            self._error = value
        return kind, value

    def _next_event(self) -> tuple[str, object]:
        while True:
            if self._output is not None:
                return ("done", self._output)
            if self._error is not None:
                raise self._error
            event = self._take(_RESULT_POLL_S)
            if event is not None and event[0] == "token":
                return event

    def result(self, timeout: float | None = None) -> GenerationOutput:
        """Wait for the request to finish; returns its output or raises its error. Safe while another thread
        iterates the stream (e.g. a cancel that waits for the end): whichever takes the end event, both see it (the
        iterator then ends; tokens result() took on the way are not yielded)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._output is None:
                if self._error is not None:
                    raise self._error
                left = _RESULT_POLL_S if deadline is None else min(_RESULT_POLL_S, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError("generation still running")
                self._take(left)
            return self._output

    def token_logprobs(self, start: int = 0, end: int | None = None) -> list[TokenLogprob]:
        """The ``TokenLogprob`` of generated tokens [start, end) (empty unless ``SamplingParams.logprobs`` asked for
        them); a token's is there once the token has been yielded."""
        return self._request.logprobs[start:end]

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot at its next step. Idempotent."""
        if not self._request.cancelled:
            self._request.cancelled = True
            self._wake()

    close = cancel

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        if self._output is None:
            self.cancel()

