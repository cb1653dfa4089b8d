"""Gemma's turn formats as token ids: Gemma 1/2/3 (``<start_of_turn>``) and Gemma 4 (``<|turn>``, a system turn, a
thinking switch and a thought channel).

Contract: ``chat_format(tokenizer)`` is the format the tokenizer's vocabulary names (Gemma 4's when it has ``<|turn>``
and ``<turn|>``, else Gemma's), refined by the model's own chat template where the model ships one
(``Tokenizer.chat_template``: read for what it says, never run). Every method returns token ids; text is encoded as
plain text, so control tokens typed by a user stay text. A format renders only what the template renders: a
:class:`~.conversation.Conversation` keeps the ids, and ids are never rebuilt from stored text.

Gemma 1/2/3 (no system role: the system prompt opens the first user turn)::

    <bos><start_of_turn>user\\n{system}\\n\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n

Gemma 4, from Google's published ``chat_template.jinja`` ("Google Gemma 4 Canonical Chat Template", shipped beside the
checkpoints; the same text is in the GGUFs' ``tokenizer.chat_template``), user and system text trimmed as the template's
``| trim`` does::

    <bos>[<|turn>system\\n[<|think|>\\n]{system}<turn|>\\n]          a system turn when there is a system prompt or
                                                                  thinking is on ({%- if enable_thinking or ... %})
    <|turn>user\\n{text}<turn|>\\n
    <|turn>model\\n{answer}<turn|>\\n                                history: strip_thinking() drops every
                                                                  <|channel>...<channel|> span of a model turn
    <|turn>model\\n[<|channel>thought\\n<channel|>]                  the generation prompt; the empty thought channel
                                                                  when thinking is off (the current template; older
                                                                  revisions lack it: read from the template)

With thinking on the model writes ``<|channel>thought\\n{thoughts}<channel|>{answer}<turn|>``; ``<turn|>`` ends the
turn (``Model.stop_ids``). The same format is checked in transformers' tests (DiffusionGemma's chat-template test,
on Gemma 4's processor: ``<bos><|turn>user\\n...<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>`` with
thinking off) and used by llama.cpp, which renders the GGUF's template with its Jinja engine and reads thoughts
between ``<|channel>thought\\n`` and ``<channel|>`` (common/chat.cpp, ``common_chat_params_init_gemma4``).

NOTE: because the template drops thoughts (and the empty thought channel of the generation prompt) from history, the
history after a Gemma 4 turn is not the tokens the model saw: it is ``<|turn>model\\n`` + the answer's own ids +
``<turn|>\\n``. The session's ids are that history (what the next prompt renders), so the next turn's KV reuse stops
where they part: the engine keeps what still matches (``KVCache.resume`` fails, ``start`` adopts the longest cached
prefix, block aligned) and recomputes the answer. The thought tokens' KV is not kept for the session: their blocks
stay in the prefix cache until evicted, and a snapshot that holds them (the store's, a session file's) is cut to the
part that is history before it is restored (``sessionfile.prefix_snapshot``). A template that keeps thoughts (no
``strip_thinking``) keeps every generated id, and then a turn extends the last one's KV whole.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from ..errors import InvalidRequestError

NO_THINKING = "this model has no thinking mode: reasoning must be off"


class GemmaFormat:
    """Gemma 1/2/3: ``<start_of_turn>role\\n...<end_of_turn>\\n``; the system prompt opens the first user turn."""

    family = "gemma"
    thinking = False                # no thinking switch
    system_in_first_user = True
    channel: tuple[int, int] | None = None  # no thought channel

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def check_reasoning(self, reasoning: bool) -> None:
        if reasoning and not self.thinking:
            raise InvalidRequestError(NO_THINKING)

    def prefix(self, system: str | None, reasoning: bool) -> list[int]:
        """What every conversation starts with: ``<bos>`` (the system prompt is in the first user turn)."""
        return [self.tokenizer.bos_id]

    def system_head(self, system: str, reasoning: bool) -> list[int]:
        """The tokens every conversation with this system prompt starts with."""
        tok = self.tokenizer
        return [tok.bos_id, tok.start_of_turn_id, *tok.encode(f"user\n{system}\n\n")]

    def turn(self, role: str, text: str) -> list[int]:
        """``<start_of_turn>{role}\\n{text}<end_of_turn>\\n`` (text encoded as plain text)."""
        tok = self.tokenizer
        return [tok.start_of_turn_id, *tok.encode(f"{role}\n{text}"), tok.end_of_turn_id, *tok.encode("\n")]

    def generation_prompt(self, reasoning: bool = False) -> list[int]:
        """``<start_of_turn>model\\n``: what the model continues from."""
        self.check_reasoning(reasoning)
        return [self.tokenizer.start_of_turn_id, *self.tokenizer.encode("model\n")]

    def close_reply(self, reply_ids: Sequence[int], reasoning: bool = False) -> list[int]:
        """A model turn's tokens in history: the generation prompt, the reply, ``<end_of_turn>\\n``."""
        tok = self.tokenizer
        return [*self.generation_prompt(reasoning), *reply_ids, tok.end_of_turn_id, *tok.encode("\n")]


class Gemma4Format(GemmaFormat):
    """Gemma 4: a system turn, ``<|turn>role\\n...<turn|>\\n``, a thinking switch and a thought channel.

    ``thinking``: the template has the switch (``<|think|>``; without a template: the vocabulary has it and the
    channel markers). ``empty_thought``: the generation prompt with thinking off ends in an empty thought channel.
    ``drops_thoughts``: history drops thought channels (the template's ``strip_thinking``).
    """

    family = "gemma4"
    system_in_first_user = False

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        tok = tokenizer
        markers = (tok.think_id, tok.channel_open_id, tok.channel_close_id)
        self.channel = None if None in markers[1:] else (tok.channel_open_id, tok.channel_close_id)
        template = tok.chat_template
        if template is None or "<|turn>" not in template:  # none, or not Gemma 4's: the published one's behaviour
            self.thinking, self.empty_thought, self.drops_thoughts = None not in markers, True, True
        else:
            self.thinking = "<|think|>" in template and None not in markers
            self.empty_thought = any(s in template for s in ("<|channel>thought\\n<channel|>",
                                                              "<|channel>thought\n<channel|>"))
            self.drops_thoughts = "strip_thinking" in template or ".split('<channel|>')" in template
        self.empty_thought = self.empty_thought and self.channel is not None
        self.drops_thoughts = self.drops_thoughts and self.channel is not None

    def prefix(self, system: str | None, reasoning: bool) -> list[int]:
        """``<bos>``, then the system turn when there is a system prompt or thinking is on."""
        self.check_reasoning(reasoning)
        tok = self.tokenizer
        if not system and not reasoning:
            return [tok.bos_id]
        # each text between two control tokens is one segment, as the tokenizer sees the rendered template:
        # "system\n{system}", or "system\n" <|think|> "\n{system}"
        body = (system or "").strip()
        if reasoning:
            text = [*tok.encode("system\n"), tok.think_id, *tok.encode("\n" + body)]
        else:
            text = tok.encode("system\n" + body)
        return [tok.bos_id, tok.turn_open_id, *text, tok.turn_close_id, *tok.encode("\n")]

    def system_head(self, system: str, reasoning: bool) -> list[int]:
        return self.prefix(system, reasoning)

    def turn(self, role: str, text: str) -> list[int]:
        """``<|turn>{role}\\n{text, trimmed}<turn|>\\n``."""
        tok = self.tokenizer
        return [tok.turn_open_id, *tok.encode(f"{role}\n{text.strip()}"), tok.turn_close_id, *tok.encode("\n")]

    def generation_prompt(self, reasoning: bool = False) -> list[int]:
        """``<|turn>model\\n``, then ``<|channel>thought\\n<channel|>`` when thinking is off (``empty_thought``)."""
        self.check_reasoning(reasoning)
        tok = self.tokenizer
        ids = [tok.turn_open_id, *tok.encode("model\n")]
        if not reasoning and self.empty_thought:
            ids += [tok.channel_open_id, *tok.encode("thought\n"), tok.channel_close_id]
        return ids

    def close_reply(self, reply_ids: Sequence[int], reasoning: bool = False) -> list[int]:
        """The reply as history renders it: ``<|turn>model\\n`` + the answer's ids (thought channels dropped) +
        ``<turn|>\\n`` when the template drops thoughts; else every id the model saw and produced."""
        tok = self.tokenizer
        if not self.drops_thoughts:
            return [*self.generation_prompt(reasoning), *reply_ids, tok.turn_close_id, *tok.encode("\n")]
        answer, _ = split_thoughts(reply_ids, self.channel)
        return [tok.turn_open_id, *tok.encode("model\n"), *answer, tok.turn_close_id, *tok.encode("\n")]


def split_thoughts(ids: Sequence[int], channel: tuple[int, int] | None) -> tuple[list[int], int]:
    """(the ids outside thought channels, how many ids the channels took, markers included).

    A channel runs from ``<|channel>`` to ``<channel|>``, or to the end when the reply stopped inside it (then the
    whole rest is thought). A ``<channel|>`` outside a channel is the model's answer, kept as produced.
    """
    if channel is None:
        return list(ids), 0
    open_id, close_id = channel
    answer: list[int] = []
    inside, n = False, 0
    for t in ids:
        if inside or t == open_id:
            n += 1
            inside = t != close_id
        else:
            answer.append(t)
    return answer, n


_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chat_format(tokenizer) -> GemmaFormat:
    """The turn format of ``tokenizer``'s model (made once per tokenizer); InvalidRequestError when it has none."""
    fmt = _FORMATS.get(tokenizer)
    if fmt is None:
        if getattr(tokenizer, "turn_open_id", None) is not None and tokenizer.turn_close_id is not None:
            fmt = Gemma4Format(tokenizer)
        elif tokenizer.start_of_turn_id is not None and tokenizer.end_of_turn_id is not None:
            fmt = GemmaFormat(tokenizer)
        else:
            raise InvalidRequestError("this tokenizer has no <start_of_turn>/<end_of_turn> nor <|turn>/<turn|>: "
                                      "it cannot chat")
        _FORMATS[tokenizer] = fmt
    return fmt
