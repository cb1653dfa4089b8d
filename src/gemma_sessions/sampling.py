"""Sampling parameters, token sampling, and text-level stop handling.

Contract: ``SamplingParams`` is the frozen description of how to pick tokens and when to stop; ``Sampler`` turns
one logits row into one token id, deterministically for a given seed (each request owns its own generator, so
batching never changes a seeded stream); ``TextStream`` turns token ids into text deltas, holding back text that may
still become a stop string and never emitting half a UTF-8 character; ``TextDeltas`` is the loop every caller runs
over it (feed tokens until the stream ends or a stop string appears), and splits a thought channel's text (Gemma 4's
``<|channel>...<channel|>``) from the answer's.
"""

from __future__ import annotations

import array
import dataclasses
import math
import numbers
import secrets
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

import torch

from . import kernels
from .errors import InvalidRequestError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample and when to stop.

    ``temperature=0`` is greedy. ``top_k=0``, ``top_p=1`` and ``min_p=0`` disable those filters. ``seed=None``
    draws a fresh seed per request; the same seed gives the same tokens. ``stop`` strings (a tuple) end generation
    (the stop string itself is not returned); generation also ends on ``<end_of_turn>`` / ``<eos>``.

    ``presence_penalty`` and ``frequency_penalty`` (each in [-2, 2]) lower the logit of every token this generation
    has produced so far, OpenAI's way: ``logit[t] -= count[t] * frequency_penalty + (count[t] > 0) *
    presence_penalty`` (the prompt's tokens do not count). ``logit_bias``: (token id, bias in [-100, 100]) pairs
    added to those logits (at most ``MAX_LOGIT_BIAS``). ``logprobs``: None, or k in [0, 20]: each generated token
    comes with its log-probability and the k most likely tokens' (``TokenLogprob``), from the model's distribution
    (the log-softmax of its logits, before penalties, bias and temperature). Any of these makes a greedy request
    take its token from its logits row (``needs_logits``) instead of the exact greedy head; in the fast mode, in a
    batch of more than a few rows, that row holds the head's int8-activation logits, so a greedy token may then
    differ from the plain greedy request's where the top two logits nearly tie (it is always the reported top-1).

    ``reasoning``: the model's thinking mode on (Gemma 4's ``enable_thinking``); a model without one refuses it.
    NOTE: it changes the prompt, not how a token is picked, and lives here because a session's defaults are its
    SamplingParams (stored with it, overridden per turn the same way); the engine ignores it.
    """

    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    reasoning: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # NOTE: checked, never converted: a frozen object is not rewritten behind its back (``from_dict`` and the
        # callers that take lists build the tuple); a lone str would otherwise be taken as a tuple of characters
        checks = [
            (lambda: isinstance(self.stop, tuple), "stop must be a tuple of strings"),
            (lambda: _number_in(self.temperature, math.inf) and self.temperature >= 0, "temperature must be >= 0"),
            (lambda: _integer(self.top_k) and self.top_k >= 0, "top_k must be >= 0"),
            (lambda: _number_in(self.top_p, 1.0) and 0 < self.top_p, "top_p must be in (0, 1]"),
            (lambda: _number_in(self.min_p, 1.0) and 0 <= self.min_p, "min_p must be in [0, 1]"),
            (lambda: _integer(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be >= 1"),
            (lambda: all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (lambda: isinstance(self.reasoning, bool), "reasoning must be true or false"),
            (lambda: isinstance(self.ignore_eos, bool), "ignore_eos must be true or false"),
            (lambda: self.seed is None or _integer(self.seed), "seed must be an integer"),
            (lambda: _number_in(self.presence_penalty, 2.0), "presence_penalty must be a number in [-2, 2]"),
            (lambda: _number_in(self.frequency_penalty, 2.0), "frequency_penalty must be a number in [-2, 2]"),
            (lambda: _valid_bias(self.logit_bias), f"logit_bias must be at most {MAX_LOGIT_BIAS} (token id >= 0, "
                                                   "bias in [-100, 100]) pairs, each token id once"),
            (lambda: self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for ok, message in checks:  # in order: a later check may rely on an earlier one (stop a tuple)
            if not ok():
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or a bias change the logits before a token is picked."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def needs_logits(self) -> bool:
        """The token comes from the full logits row (sampling, penalties, a bias, logprobs); else (plain greedy)
        the exact greedy head's token will do."""
        return not self.greedy or self.adjusts_logits or self.logprobs is not None

    def check_vocab(self, vocab_size: int) -> None:
        """InvalidRequestError when ``logit_bias`` names a token past the vocabulary (checked once per request, by
        whoever runs it: the engine's ``submit``, ``generate``)."""
        if self.logit_bias and max(t for t, _ in self.logit_bias) >= vocab_size:
            raise InvalidRequestError(f"logit_bias: token ids must be in [0, {vocab_size})")

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["logit_bias"] = [list(pair) for pair in self.logit_bias]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """The inverse of ``to_dict`` (unknown keys ignored: a newer writer's fields); InvalidRequestError on any
        value the constructor would refuse."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if isinstance(kw.get("stop"), list):
            kw["stop"] = tuple(kw["stop"])
        bias = kw.get("logit_bias")
        if isinstance(bias, list) and len(bias) <= MAX_LOGIT_BIAS:
            kw["logit_bias"] = tuple(tuple(p) if isinstance(p, list) else p for p in bias)
        return cls(**kw)


# logit_bias pairs a request may give (OpenAI caps the map at 300 entries; tokenizers can add words of many tokens)
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20


def _integer(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number_in(value, bound: float) -> bool:
    """A finite real number (numpy's too; not a bool) in [-bound, bound]."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and \
        -bound <= value <= bound


def _valid_bias(pairs) -> bool:
    if not isinstance(pairs, tuple) or len(pairs) > MAX_LOGIT_BIAS:
        return False
    ok = all(isinstance(p, tuple) and len(p) == 2 and _integer(p[0]) and p[0] >= 0 and _number_in(p[1], 100.0)
             for p in pairs)
    return ok and len({p[0] for p in pairs}) == len(pairs)


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens' (``top``: (id, logprob) pairs, most likely
    first), from the model's distribution (see ``SamplingParams.logprobs``). The alternatives are kept as two packed
    arrays (int32 ids, float32 logprobs: ~0.4 kB a token with 20, against ~2.5 kB as Python pairs), since a request
    holds one per generated token until it ends."""

    token: int
    logprob: float
    top_ids: array.array = dataclasses.field(default_factory=lambda: array.array("i"))
    top_logprobs: array.array = dataclasses.field(default_factory=lambda: array.array("f"))

    @property
    def top(self) -> tuple[tuple[int, float], ...]:
        return tuple(zip(self.top_ids, self.top_logprobs))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The ``TokenLogprob`` of ``token`` under one logits row [vocab]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids, values = array.array("i"), array.array("f")
    if top > 0:
        best, idx = torch.topk(lp, min(top, lp.numel()))
        ids.frombytes(idx.to(torch.int32).numpy().tobytes())
        values.frombytes(best.numpy().tobytes())
    return TokenLogprob(int(token), float(lp[int(token)]), ids, values)


class TokenConstraint(Protocol):
    """Which next tokens keep a generation valid (``constraints.JsonObjectConstraint``). The engine's thread alone
    calls it, once per generated token: ``only()`` (the allowed tokens when few and known, else None), then
    ``allows`` for candidates in the sampler's order (the likeliest, then ``fallback()``: a few tokens among which
    one is allowed whenever any is), then ``advance`` with the token picked."""

    def only(self) -> Collection[int] | None: ...

    def fallback(self) -> Sequence[int]: ...

    def allows(self, token: int) -> bool: ...

    def advance(self, token: int) -> None: ...


# candidates a constrained step tries from its logits (most likely first) before the constraint's fallback tokens
CONSTRAINED_CANDIDATES = 256

GREEDY = SamplingParams(temperature=0.0)
# Smaller positive temperatures sample as this one (already all but greedy; float32 cannot divide by 1e-300).
MIN_TEMPERATURE = 1e-6


class Sampler:
    """Picks the next token from a logits row according to one request's parameters."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self._counts: dict[int, int] = {}  # generated tokens counted for the penalties
        self._counted = 0
        self._bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self._bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32))

    def __call__(self, logits: torch.Tensor, generated: Sequence[int] = (),
                 constraint: TokenConstraint | None = None) -> int:
        """logits: [vocab] float -> token id. ``generated``: the tokens this generation produced so far, in order
        (what the penalties count; the same list, grown, from call to call). ``constraint``: only tokens it allows
        are picked (the most likely allowed one when greedy; sampling over the allowed ones among the filters'
        candidates)."""
        p = self.params
        if p.adjusts_logits:
            logits = self._adjusted(logits, generated)
        if constraint is not None:
            return self._constrained(logits.float().cpu(), constraint)
        if p.greedy:
            return int(kernels.argmax(logits))
        values, indices = self._candidates(logits.float().cpu(), None)
        return self._draw(values, indices)

    def _candidates(self, logits: torch.Tensor, cap: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The temperature-scaled logits of the candidates top_k leaves (at most ``cap``), sorted descending."""
        p = self.params
        # the max first, and a temperature float32 can divide by: the top logit stays 0 and the others become very
        # negative or -inf, never NaN (a temperature of 1e-300 is 0 in float32)
        logits = (logits - logits.max()) / max(p.temperature, MIN_TEMPERATURE)
        k = min(p.top_k or logits.numel(), cap or logits.numel())
        if k < logits.numel():
            return torch.topk(logits, k)
        return torch.sort(logits, descending=True)

    def _draw(self, values: torch.Tensor, indices: torch.Tensor) -> int:
        """Sample among sorted candidates after top_p and min_p."""
        p = self.params
        probs = torch.softmax(values, dim=-1)  # sorted, descending
        keep = torch.ones_like(probs, dtype=torch.bool)
        if p.top_p < 1.0:  # smallest prefix whose mass reaches top_p (the first token is always kept)
            cum = torch.cumsum(probs, dim=-1)
            keep &= (cum - probs) < p.top_p
        if p.min_p > 0.0:
            keep &= probs >= p.min_p * probs[0]
        keep[0] = True  # whatever the filters' rounding (a top_p below float32's range), the top token stays
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs / probs.sum(), 1, generator=self.generator)
        return int(indices[choice])

    def _constrained(self, logits: torch.Tensor, constraint: TokenConstraint) -> int:
        only = constraint.only()
        if only is not None:  # a few known tokens (a stop once the object is complete): the likeliest
            ids = torch.tensor(sorted(only), dtype=torch.long)
            return int(ids[int(torch.argmax(logits[ids]))])
        if not self.params.greedy:
            values, indices = self._candidates(logits, CONSTRAINED_CANDIDATES)
            allowed = torch.tensor([constraint.allows(t) for t in indices.tolist()], dtype=torch.bool)
            if bool(allowed.any()):
                return self._draw(values[allowed], indices[allowed])
        # greedy, or no sampling candidate allowed: the most likely allowed token among the likeliest, then among
        # the constraint's fallback tokens (bounded work per step: the engine loop waits for it)
        order = torch.topk(logits, min(CONSTRAINED_CANDIDATES, logits.numel())).indices.tolist()
        spare = [t for t in constraint.fallback() if 0 <= t < logits.numel()]
        if spare:
            order += torch.tensor(spare)[torch.argsort(logits[spare], descending=True)].tolist()
        for t in order:
            if constraint.allows(t):
                return t
        raise InvalidRequestError("no token can continue the constrained reply")

    def _adjusted(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        p = self.params
        out = logits.float().cpu().clone()
        if self._bias is not None:
            ids, values = self._bias
            out[ids] += values
        if p.presence_penalty or p.frequency_penalty:
            if len(generated) < self._counted:  # a different list: count afresh
                self._counts, self._counted = {}, 0
            for t in generated[self._counted:]:
                self._counts[t] = self._counts.get(t, 0) + 1
            self._counted = len(generated)
            if self._counts:
                ids = torch.tensor(list(self._counts), dtype=torch.long)
                counts = torch.tensor(list(self._counts.values()), dtype=torch.float32)
                out[ids] -= counts * p.frequency_penalty + p.presence_penalty
        return out


class TextStream:
    """Token ids -> text deltas, with stop strings.

    ``feed(token_id)`` returns the text that is now safe to show; text that might be the start of a stop string is
    held back until it is ruled out. When a stop string appears, ``stopped`` becomes True and the text before it is
    the last delta.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._decoder = tokenizer.stream_decoder()
        self._stop = tuple(stop)
        self._pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def feed(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.feed(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back (called when generation ends for any reason but a stop string)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
            if hits:
                out, self._pending, self.stopped = self._pending[:min(hits)], "", True
                self.text += out
                return out
        hold = 0 if final else self._held_back()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:n]):
                    best = n
                    break
        return best


class ChannelText:
    """The text of one thought channel: its decoded tokens after the channel's name line (``thought\\n``).

    The first line is the channel's name when it is one word; otherwise (a model that skipped the name) it is text.
    """

    def __init__(self, tokenizer):
        self._decoder = tokenizer.stream_decoder()
        self._head: str | None = ""  # the first line while it is not complete; None after it

    def feed(self, token_id: int) -> str:
        return self._take(self._decoder.feed(token_id))

    def finish(self) -> str:
        return self._take(self._decoder.flush(), final=True)

    def _take(self, text: str, final: bool = False) -> str:
        if self._head is not None:
            self._head += text
            if "\n" not in self._head and not final:
                return ""
            head, self._head = self._head, None
            name, _, rest = head.partition("\n")
            text = rest if len(name.split()) == 1 else head  # a channel closed right after its name: no thought
        return text


class TextDeltas:
    """The text of a stream of generated token ids, delta by delta, ending at the first stop string.

    ``next_delta()`` returns the next non-empty delta of the answer, or None once the tokens ran out or a stop string
    appeared (``stopped``; ``on_stop`` is called at that moment, e.g. to cancel the generation). ``tokens`` are the
    ids consumed, ``text`` what was returned. Sessions, the server's stateless completions and ``generate`` all read
    generations through it.

    ``channel``: the (open, close) ids of a thought channel (Gemma 4's ``<|channel>`` / ``<channel|>``). Tokens from
    open to close are thoughts: ``next_part()`` returns them as ``("reasoning", text)`` beside ``("content", text)``
    (``next_delta`` skips them), never mixed into ``text``; ``reasoning`` is their text (each channel's name line
    dropped), ``reasoning_tokens`` how many ids they took. Stop strings apply to the answer only.

    Example::

        deltas = TextDeltas(engine.submit(ids, params), tokenizer, params.stop)
        while (delta := deltas.next_delta()) is not None:
            print(delta, end="")
    """

    def __init__(self, token_ids: Iterable[int], tokenizer, stop: Sequence[str] = (),
                 on_stop: Callable[[], None] | None = None, channel: tuple[int, int] | None = None):
        self._iter = iter(token_ids)
        self._tokenizer = tokenizer
        self._stream = TextStream(tokenizer, stop)
        self._on_stop = on_stop
        self._channel = channel
        self._thought: ChannelText | None = None  # the open channel
        self._thoughts: list[str] = []
        self._queued: list[tuple[str, str]] = []
        self.tokens: list[int] = []
        self.reasoning_tokens = 0
        self.done = False
        self.stopped = False

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def reasoning(self) -> str:
        return "".join(self._thoughts)

    def next_delta(self) -> str | None:
        while (part := self.next_part()) is not None:
            if part[0] == "content":
                return part[1]
        return None

    def next_part(self) -> tuple[str, str] | None:
        """The next non-empty ``("reasoning" | "content", text)``, or None at the end (see the class)."""
        while not self._queued and not self.done:
            try:
                token = next(self._iter)
            except StopIteration:
                self.done = True
                self._close_channel()
                self._queue("content", self._stream.finish())
                break
            self.tokens.append(token)
            if self._thought is not None or (self._channel is not None and token == self._channel[0]):
                self._feed_channel(token)
                continue
            self._queue("content", self._stream.feed(token))
            if self._stream.stopped:
                self.done = self.stopped = True
                if self._on_stop is not None:
                    self._on_stop()
        return self._queued.pop(0) if self._queued else None

    def _feed_channel(self, token: int) -> None:
        self.reasoning_tokens += 1
        if self._thought is None:  # the channel opens
            self._thought = ChannelText(self._tokenizer)
        elif token == self._channel[1]:
            self._close_channel()
        else:
            self._queue("reasoning", self._thought.feed(token))

    def _close_channel(self) -> None:
        if self._thought is not None:
            self._queue("reasoning", self._thought.finish())
            self._thought = None

    def _queue(self, kind: str, text: str) -> None:
        if text:
            if kind == "reasoning":
                self._thoughts.append(text)
            self._queued.append((kind, text))
