"""Session: one conversation on a shared engine, with its KV kept between turns.

Contract: ``send`` / ``stream`` run one turn: render the user's message to token ids, submit history + turn to the
engine with the session's KV handle (so only tokens not already cached are computed), stream text deltas, and
append the turn to history only once it completed. Turns on one session are serialised in arrival order (FIFO);
with ``wait=False`` a second concurrent turn raises ``SessionBusyError`` instead. All methods are thread-safe.

With a shared store (Redis, several replicas) a turn starts with ``store.sync``: a session another replica moved on is
reloaded from the store first (``store_version`` is the version this memory holds, the fencing token its writes
carry), and a turn whose ``idempotency_key`` was committed already answers with the recorded reply without generating.
The commit raises StaleSessionError (nothing changed) when another replica won the race.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from ..errors import GemmaSessionsError, SessionBusyError
from ..sampling import SamplingParams, TextDeltas, TokenConstraint
from .conversation import CONTEXT_POLICIES, Conversation, Message, check_text


@dataclasses.dataclass(frozen=True, kw_only=True)
class TurnStats:
    prompt_tokens: int        # tokens the model saw for this turn (whole history + new turn)
    cached_tokens: int        # of those, already in the KV cache (the session's own or a shared prefix)
    prefilled_tokens: int     # computed for this turn
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    dropped_turns: int = 0    # turns removed by the truncate_oldest context policy
    preemptions: int = 0
    recomputed_tokens: int = 0
    kv_source: str = "memory"  # where the history's KV came from: memory | snapshot | recompute | new
    reasoning_tokens: int = 0  # of the generated tokens, those in thought channels (markers included)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reply:
    text: str                 # the answer (thoughts never in it)
    token_ids: list[int]      # every id generated, thoughts included
    finish_reason: str        # "stop" | "length" | "cancelled"
    stats: TurnStats
    reasoning: str = ""       # the thoughts (Gemma 4 with reasoning on), apart from the answer


class FifoLock:
    """A lock granted in arrival order (threading.Lock makes no fairness promise)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def acquire(self, blocking: bool = True) -> bool:
        me = object()
        with self._cond:
            if not blocking and self._queue:
                return False
            self._queue.append(me)
            while self._queue[0] is not me:
                self._cond.wait()
            return True

    def release(self) -> None:
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()

    def locked(self) -> bool:
        with self._cond:
            return bool(self._queue)

    def __enter__(self) -> FifoLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_metadata(metadata: dict | None) -> dict:
    """A copy of ``metadata`` if it is a flat JSON object of valid text (InvalidRequestError otherwise)."""
    from ..errors import InvalidRequestError

    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidRequestError("metadata must be an object")
    for k, v in metadata.items():
        check_text(k)
        if isinstance(v, str):
            check_text(v)
        elif isinstance(v, float) and not math.isfinite(v):
            raise InvalidRequestError(f"metadata value of {k!r} must be finite")
        elif v is not None and not isinstance(v, (bool, int, float)):
            raise InvalidRequestError(f"metadata value of {k!r} must be a string, number, boolean or null")
    return dict(metadata)


class Session:
    """One conversation. Create through :meth:`SessionManager.create`.

    Example::

        s = manager.create(system="You are terse.", sampling=gs.SamplingParams(temperature=0, max_tokens=64))
        reply = s.send("Hello")            # reply.text, reply.token_ids, reply.stats
        for delta in s.stream("And then?"):
            print(delta, end="")
        reply = s.send("Why?", reasoning=True)   # a thinking model: reply.reasoning holds the thoughts

    ``sampling.reasoning`` is the session's thinking switch (off by default); ``reasoning=`` on a turn overrides it
    for that turn (Gemma 4 renders it in the system turn, so a change re-renders the history's start: recomputed).
    A model without a thinking mode refuses reasoning on (InvalidRequestError).
    """

    def __init__(self, manager, *, system: str | None = None, sampling: SamplingParams | None = None,
                 context_policy: str = "truncate_oldest", max_context: int | None = None,
                 session_id: str | None = None, metadata: dict | None = None, created_at: float | None = None,
                 owner: str = "", persistent: bool = True):
        if context_policy not in CONTEXT_POLICIES:
            from ..errors import InvalidRequestError

            raise InvalidRequestError(f"context_policy must be one of {CONTEXT_POLICIES}")
        self.manager = manager
        self.engine = manager.engine
        self.id = session_id or uuid.uuid4().hex  # 128 random bits: unguessable
        self.created_at = created_at or time.time()
        self.sampling = sampling or SamplingParams()
        self.context_policy = context_policy
        model_ctx = self.engine.max_context
        self.max_context = min(max_context or model_ctx, model_ctx)
        self.metadata = check_metadata(metadata)
        self.owner = owner  # the API key (hash) that owns it; never taken from metadata or a file
        self.persistent = persistent  # False: never written to the store, not listed (store: false responses)
        self.conversation = Conversation(self.engine.model.tokenizer, None if system is None else check_text(system),
                                         reasoning=self.sampling.reasoning)
        self.kv = self.engine.new_kv()
        self.turn_stats: list[TurnStats] = []
        self._turn_lock = FifoLock()
        self._data_lock = threading.Lock()
        self.deleted = False
        self.store_version = 0  # the store's version of this session that memory holds (a shared store's fence)

    # ------------------------------------------------------------------------------------------ views
    @property
    def system(self) -> str | None:
        return self.conversation.system

    @property
    def messages(self) -> list[Message]:
        with self._data_lock:
            return list(self.conversation.messages)

    @property
    def token_ids(self) -> list[int]:
        """Exactly the tokens the model has seen and produced, in order."""
        with self._data_lock:
            return self.conversation.token_ids

    @property
    def busy(self) -> bool:
        return self._turn_lock.locked()

    @property
    def stats(self) -> dict:
        with self._data_lock:
            turns = list(self.turn_stats)
            n_tokens = len(self.conversation.token_ids)
            n_replies = sum(1 for m in self.conversation.messages if m.role == "model")
        prompt = sum(t.prompt_tokens for t in turns)
        cached = sum(t.cached_tokens for t in turns)
        return {
            "turns": n_replies, "turns_run": len(turns), "tokens": n_tokens, "prompt_tokens": prompt, "cached_tokens": cached,
            "prefilled_tokens": sum(t.prefilled_tokens for t in turns),
            "generated_tokens": sum(t.generated_tokens for t in turns),
            "cache_hit_rate": cached / prompt if prompt else 0.0,
            "kv_tokens_held": self.engine.kv_tokens(self.kv), "kv_bytes_held": self.engine.kv_bytes(self.kv),
            "evictions": self.kv.evictions, "dropped_turns": self.conversation.dropped_turns,
            "ttft_s": [round(t.ttft_s, 4) for t in turns],
            "decode_tokens_per_s": [round(t.decode_tokens_per_s, 1) for t in turns],
        }

    # ------------------------------------------------------------------------------------------ items
    def add_message(self, role: str, text: str) -> Message:
        """Append a message without generating (waits for a running turn)."""
        with self._turn_lock:
            self.manager._sync(self)
            messages, msg = self.conversation.with_message(role, text)
            self._adopt(messages)
        return msg

    def remove_message(self, message_id: str) -> Message:
        """Remove one message from the history (its KV is recomputed from the changed history)."""
        from ..errors import SessionNotFoundError

        with self._turn_lock:
            self.manager._sync(self)
            try:
                messages, msg = self.conversation.without_message(message_id)
            except KeyError:
                raise SessionNotFoundError(f"no item {message_id!r} in session {self.id}") from None
            self._adopt(messages)
        return msg

    def _adopt(self, messages: list[Message]) -> None:
        """Store first, then memory: a failed store write leaves both as they were (caller holds the turn lock)."""
        self.manager._history_changed(self, messages)
        with self._data_lock:
            self.conversation.replace(messages)

    # ------------------------------------------------------------------------------------------ turns
    def prompt_tokens(self, text: str | Callable[[Session], str], *, before: Sequence[tuple[str, str]] = (),
                      keep_messages: int | None = None, max_tokens: int = 1, reasoning: bool | None = None) -> int:
        """The prompt tokens a turn with ``text`` would have, planned as a turn is (old turns dropped when the
        context needs it, for a reply of ``max_tokens``), after the history's first ``keep_messages`` messages (all
        by default) and the ``before`` messages ((role, text)) added; changes nothing (it does not wait for a running
        turn: it counts the history as it is). ``text`` may be a function of the session, as for ``stream``."""
        with self._data_lock:
            conv = self.conversation.copy()
        if keep_messages is not None:
            conv.replace(conv.messages[:keep_messages])
        for role, message in before:
            conv.replace(conv.with_message(role, message)[0])
        if callable(text):
            text = text(self)
        params = self.sampling if reasoning is None else self.sampling.replace(reasoning=reasoning)
        return len(conv.plan_turn(text, max_tokens, self.max_context, self.context_policy,
                                  reasoning=params.reasoning).prompt)

    def send(self, text: str, *, sampling: SamplingParams | None = None, wait: bool = True,
             reasoning: bool | None = None, idempotency_key: str | None = None,
             constraint: TokenConstraint | None = None) -> Reply:
        """Run one turn to completion and return the reply (``idempotency_key``, ``constraint``: see :meth:`stream`)."""
        stream = self.stream(text, sampling=sampling, wait=wait, reasoning=reasoning, idempotency_key=idempotency_key,
                             constraint=constraint)
        for _ in stream:
            pass
        return stream.reply

    def stream(self, text: str | Callable[[Session], str], *, sampling: SamplingParams | None = None,
               wait: bool = True,
               reasoning: bool | None = None, idempotency_key: str | None = None,
               constraint: TokenConstraint | None = None) -> TurnStream:
        """Start a turn and iterate its answer's text deltas; ``.reply`` holds the result once iteration ends
        (``next_part`` gives thoughts too). ``reasoning``: thinking on or off for this turn (default: the sampling's).

        ``idempotency_key``: names this request (the server passes the ``Idempotency-Key`` header; default a fresh
        uuid). With a store that keeps keys (Redis) a key is committed at most once per session: a retry of a
        committed key gets the recorded reply, without generating and without appending again.

        ``constraint``: only the tokens it allows are generated (``constraints.JsonObjectConstraint``: the reply is
        one JSON object); a turn's own.

        Closing the iterator early cancels the turn (nothing is appended to the history).

        ``text`` may be a function of the session, called once the turn holds it and its history is current: for a
        message that depends on the history (the server tells a conversation of tools it was not told of yet).
        """
        params = sampling or self.sampling
        if reasoning is not None:
            params = params.replace(reasoning=reasoning)
        if not self._turn_lock.acquire(blocking=wait):
            raise SessionBusyError(f"session {self.id} is already running a turn")
        try:
            return TurnStream(self, text, params, idempotency_key or uuid.uuid4().hex, constraint)
        except BaseException:
            self._turn_lock.release()
            raise

    async def astream(self, text: str, *, sampling: SamplingParams | None = None, wait: bool = True,
                      reasoning: bool | None = None, idempotency_key: str | None = None) -> AsyncIterator[str]:
        """Async variant of :meth:`stream` (the engine work runs on its thread; deltas hop to the event loop)."""
        import asyncio

        loop = asyncio.get_running_loop()
        stream = await loop.run_in_executor(None, lambda: self.stream(text, sampling=sampling, wait=wait,
                                                                      reasoning=reasoning,
                                                                      idempotency_key=idempotency_key))
        try:
            while True:
                delta = await loop.run_in_executor(None, stream.next_delta)
                if delta is None:
                    return
                yield delta
        finally:
            stream.close()

    def _release_turn(self) -> None:
        self._turn_lock.release()


class TurnStream:
    """Iterator of text deltas for one turn (holds the session's turn lock until it ends)."""

    def __init__(self, session: Session, text: str | Callable[[Session], str], params: SamplingParams,
                 idempotency_key: str,
                 constraint: TokenConstraint | None = None):
        self._done = True  # until the engine request exists, there is nothing to cancel
        self._end = threading.RLock()  # the turn ends once: completed by its reader or aborted by a closer
        self.session = session
        self.idempotency_key = idempotency_key
        self._engine_stream = None
        self._replay: list[tuple[str, str]] | None = None
        self.reply: Reply | None = None
        self.reply_id = "msg_" + uuid.uuid4().hex  # the id its reply's message will have (a replay's: the recorded)
        conv = session.conversation
        t0 = time.perf_counter()
        recorded = session.manager._sync(session, idempotency_key)
        if recorded is not None:  # this request was committed already (a retry): answer with what it answered
            self._start_replay(recorded)
            return
        if callable(text):
            text = text(session)
        self._kv_source = session.manager._before_turn(session)
        self._restore_s = time.perf_counter() - t0  # counted in the turn's time to first token
        with session._data_lock:
            plan = conv.plan_turn(text, params.max_tokens, session.max_context, session.context_policy,
                                  reasoning=params.reasoning)
        prompt = list(plan.prompt)
        system_end = conv.system_end(prompt, plan.reasoning)
        self.params = params.replace(max_tokens=plan.max_tokens)
        self._plan = plan
        self._engine_stream = session.engine.submit(prompt, self.params, kv=session.kv,
                                                    checkpoints=() if system_end is None else (system_end,),
                                                    constraint=constraint)
        self._deltas = TextDeltas(self._engine_stream, conv.tokenizer, self.params.stop,
                                  on_stop=self._engine_stream.cancel,  # a stop string ends the generation at once
                                  channel=conv.format.channel)
        self._done = False

    def _start_replay(self, recorded: dict) -> None:
        """Answer with a reply the store recorded under this turn's idempotency key (its thoughts, then its text)."""
        stats = TurnStats(**recorded["stats"])
        if isinstance(recorded.get("id"), str):  # (a record from before replies' ids were kept has none)
            self.reply_id = recorded["id"]
        self._replay = [(k, recorded[k]) for k in ("reasoning", "content") if recorded[k]]
        self._replayed = Reply(text=recorded["content"], token_ids=list(recorded["token_ids"]),
                               finish_reason=recorded["finish_reason"], stats=stats, reasoning=recorded["reasoning"])
        self._done = False

    def __iter__(self) -> Iterator[str]:
        while (delta := self.next_delta()) is not None:
            yield delta

    @property
    def n_tokens(self) -> int:
        """Tokens the deltas so far took (thoughts included); 0 for a replayed turn."""
        return 0 if self._replay is not None else len(self._deltas.tokens)

    def token_logprobs(self, start: int, end: int) -> list:
        """``TokenLogprob`` of generated tokens ``[start, end)`` (asked with ``SamplingParams.logprobs``); none for
        a replayed turn (the store keeps no logprobs)."""
        if self._replay is not None or self._engine_stream is None:
            return []
        return self._engine_stream.token_logprobs(start, end)

    def next_delta(self) -> str | None:
        """The next non-empty text delta of the answer, or None when the turn is over (then ``reply`` is set)."""
        while (part := self.next_part()) is not None:
            if part[0] == "content":
                return part[1]
        return None

    def next_part(self) -> tuple[str, str] | None:
        """The next non-empty ``("reasoning" | "content", text)`` delta, or None when the turn is over (then
        ``reply`` is set). Thoughts come as "reasoning", never inside the answer's "content"."""
        try:
            if self._done:
                return None
            if self._replay is not None:
                if self._replay:
                    return self._replay.pop(0)
                self.reply = self._replayed
                self._finish()
                return None
            part = self._deltas.next_part()
            if part is not None:
                return part
            result = self._engine_stream.result()  # after a stop string: once the engine took the cancel
            self._complete("stop" if self._deltas.stopped else result.finish_reason)
            return None
        except BaseException:
            self._abort()
            raise

    def _complete(self, finish_reason: str) -> None:
        with self._end:
            if not self._done:  # (a close from another thread ended it first: nothing is appended)
                self._completed(finish_reason)

    def _completed(self, finish_reason: str) -> None:
        s = self.session
        out = self._engine_stream.result().stats
        stats = TurnStats(prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens,
                          prefilled_tokens=out.prefilled_tokens, generated_tokens=len(self._deltas.tokens),
                          ttft_s=out.ttft_s + self._restore_s, decode_tokens_per_s=out.decode_tokens_per_s, total_s=out.total_s + self._restore_s,
                          dropped_turns=self._plan.dropped, preemptions=out.preemptions,
                          recomputed_tokens=out.recomputed_tokens, kv_source=self._kv_source,
                          reasoning_tokens=self._deltas.reasoning_tokens)
        text, tokens = self._deltas.text, list(self._deltas.tokens)
        if finish_reason != "cancelled":
            messages = s.conversation.with_turn(self._plan, text, tokens, self.reply_id)
            recorded = {"content": text, "token_ids": tokens, "finish_reason": finish_reason,
                        "reasoning": self._deltas.reasoning, "stats": dataclasses.asdict(stats), "id": self.reply_id}
            # durable first; may raise (StaleSessionError: another replica moved the session on; nothing changed)
            s.manager._turn_completed(s, messages, self._plan.dropped, stats, self.idempotency_key, recorded)
            with s._data_lock:
                s.conversation.replace(messages, self._plan.dropped, reasoning=self._plan.reasoning)
                s.turn_stats.append(stats)
                history = s.conversation.token_ids
            computed = [*self._plan.prompt, *tokens[:-1]]  # the last sampled token is never fed back
            if history[:len(computed)] != computed:  # the history dropped what was computed (Gemma 4's thoughts)
                s.engine.rebase_kv(s.kv, history)  # hold its cached prefix, not KV no next turn can continue
        self.reply = Reply(text=text, token_ids=tokens, finish_reason=finish_reason, stats=stats,
                           reasoning=self._deltas.reasoning)
        self._finish()

    def _abort(self) -> None:
        with self._end:  # (a reader completing the turn meanwhile finishes first; then there is nothing to abort)
            if not self._done and self._engine_stream is None:  # a replay: nothing runs
                self._finish()
            elif not self._done:
                self._engine_stream.cancel()
                try:  # wait until the engine has let go of the session's KV handle (at its next step)
                    self._engine_stream.result(timeout=60)
                except (GemmaSessionsError, TimeoutError):
                    pass
                self._finish()

    def _finish(self) -> None:
        with self._end:
            if not self._done:
                self._done = True
                self.session._release_turn()

    def close(self) -> None:
        """Cancel the turn if it is still running (nothing is added to the history)."""
        self._abort()

    def __del__(self) -> None:
        self._abort()
