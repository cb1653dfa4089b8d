"""Sampling parameters, token sampling, and text-level stop handling.

Contract: ``SamplingParams`` is the frozen description of how to pick tokens and when to stop; ``Sampler`` turns
one logits row into one token id, deterministically for a given seed (each request owns its own generator, so
batching never changes a seeded stream); ``TextStream`` turns token ids into text deltas, holding back text that may
still become a stop string and never emitting half a UTF-8 character; ``TextDeltas`` is the loop every caller runs
over it (feed tokens until the stream ends or a stop string appears), and splits a thought channel's text (Gemma 4's
``<|channel>...<channel|>``) from the answer's.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterable, Sequence

import torch

from . import kernels
from .errors import InvalidRequestError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample and when to stop.

    ``temperature=0`` is greedy. ``top_k=0``, ``top_p=1`` and ``min_p=0`` disable those filters. ``seed=None``
    draws a fresh seed per request; the same seed gives the same tokens. ``stop`` strings (a tuple) end generation
    (the stop string itself is not returned); generation also ends on ``<end_of_turn>`` / ``<eos>``.

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

    def __post_init__(self) -> None:
        # NOTE: checked, never converted: a frozen object is not rewritten behind its back (``from_dict`` and the
        # callers that take lists build the tuple); a lone str would otherwise be taken as a tuple of characters
        checks = [
            (isinstance(self.stop, tuple), "stop must be a tuple of strings"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (isinstance(self.reasoning, bool), "reasoning must be true or false"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "stop" else v) for k, v in d.items() if k in fields})


GREEDY = SamplingParams(temperature=0.0)
# Smaller positive temperatures sample as this one (already all but greedy; float32 cannot divide by 1e-300).
MIN_TEMPERATURE = 1e-6


class Sampler:
    """Picks the next token from a logits row according to one request's parameters."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float -> token id."""
        p = self.params
        if p.greedy:
            return int(kernels.argmax(logits))
        logits = logits.float().cpu()
        # the max first, and a temperature float32 can divide by: the top logit stays 0 and the others become very
        # negative or -inf, never NaN (a temperature of 1e-300 is 0 in float32)
        logits = (logits - logits.max()) / max(p.temperature, MIN_TEMPERATURE)
        if p.top_k and p.top_k < logits.numel():
            values, indices = torch.topk(logits, p.top_k)
        else:
            values, indices = torch.sort(logits, descending=True)
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
