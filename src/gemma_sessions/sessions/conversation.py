"""Conversation history as exact token ids, rendered in Gemma's turn format, and its context policy.

Contract: a :class:`Conversation` is the list of completed turns, each with its text (for display) and the exact
token ids the model saw or produced. ``token_ids`` is their concatenation after the conversation's prefix (``<bos>``;
for Gemma 4 also its system turn); it is never rebuilt by re-tokenizing stored text. Gemma 1-3 have no system role:
the system prompt is put at the start of the first user turn (as their chat template does), which is the only turn
ever re-rendered (after older turns are dropped).

    <bos><start_of_turn>user\\n{system}\\n\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n...

Gemma 4 (``chat_format.Gemma4Format``) has a system turn, rendered from the system prompt and the thinking switch
(``reasoning``: the value of the last turn; a turn that changes it re-renders that prefix, so the whole history is
recomputed once), and a history without thought channels: a reply is kept as its answer's own ids.

Only the chat format emits control tokens; user text is encoded as plain text, so ``<start_of_turn>`` typed by a
user stays text (no prompt injection). ``chat_format.py`` holds the formats; this module owns history and a
stateless chat (the server's chat completions) is rendered here too, by ``render_chat``.

Changes are computed on copies (``plan_turn``, ``with_turn``, ``with_message``, ``without_message``) and adopted
with ``replace`` only after the durable store took them, so memory and store change together or not at all.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence

from ..errors import ContextLengthError, InvalidRequestError
from .chat_format import GemmaFormat, chat_format

CONTEXT_POLICIES = ("truncate_oldest", "error")
ROLES = ("user", "model")
# Tokens kept free for the reply when old turns must be dropped to fit the context (at most a quarter of the
# context; see Conversation.plan_turn).
REPLY_RESERVE = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Message:
    role: str            # "user" or "model" ("assistant" is accepted on input and stored as "model")
    text: str
    created_at: float
    token_ids: tuple[int, ...]   # the turn's exact tokens, control tokens included
    id: str = dataclasses.field(default_factory=lambda: "msg_" + uuid.uuid4().hex)

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        return {"id": self.id, "role": self.role, "text": self.text, "created_at": self.created_at,
                "token_ids": list(self.token_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> Message:
        return cls(role=d["role"], text=d["text"], created_at=float(d["created_at"]),
                   token_ids=tuple(int(t) for t in d["token_ids"]), id=d.get("id") or "msg_" + uuid.uuid4().hex)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TurnPlan:
    """What the next turn will run, computed on a copy: the conversation changes only when the turn completes.

    A turn that fails, is refused or is cancelled leaves the history exactly as it was, even when the plan
    dropped old turns to fit the context.
    """

    history: tuple[Message, ...]   # the turns kept (the first one re-rendered when older ones were dropped)
    user: Message
    max_tokens: int                # what the reply may use: the asked maximum or what the context has left
    dropped: int                   # whole turns (user + reply) dropped from the start
    prompt: tuple[int, ...]        # history + user turn + generation prompt, as token ids
    reasoning: bool = False        # thinking on for this turn (Gemma 4): its prompt's system turn and generation prompt


def check_text(text: object) -> str:
    """``text`` if it is a str that encodes as UTF-8 (no lone surrogates), else InvalidRequestError."""
    if not isinstance(text, str):
        raise InvalidRequestError("a message must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError("text must be valid Unicode (it has a lone surrogate)") from None
    return text


def render_turn(tokenizer, role: str, text: str) -> list[int]:
    """``<start_of_turn>{role}\\n{text}<end_of_turn>\\n`` as token ids (text encoded as plain text; Gemma 1-3)."""
    return GemmaFormat(tokenizer).turn(role, text)


def generation_prompt(tokenizer) -> list[int]:
    """``<start_of_turn>model\\n``: what the model continues from (Gemma 1-3)."""
    return GemmaFormat(tokenizer).generation_prompt()


def render_chat(tokenizer, messages: Sequence[tuple[str, str]], reasoning: bool = False) -> list[int]:
    """A whole stateless chat ``[(role, text)]`` -> prompt ids ending in the generation prompt.

    Roles: ``user``; ``model`` or ``assistant``; ``system`` or ``developer``, whose texts (joined by a blank line) go
    where the model's format puts a system prompt (the first user turn; Gemma 4's system turn), as in a
    :class:`Conversation`. ``reasoning``: thinking on (InvalidRequestError for a model without a thinking mode).
    Raises InvalidRequestError without a user or model turn.
    """
    fmt = chat_format(tokenizer)
    system = "\n\n".join(text for role, text in messages if role in ("system", "developer"))
    turns = [(role, text) for role, text in messages if role in ("user", "model", "assistant")]
    if not turns:
        raise InvalidRequestError("messages need at least one user message")
    ids = fmt.prefix(system or None, reasoning)
    first_user = fmt.system_in_first_user
    for role, text in turns:
        if role == "user" and first_user and system:
            text = f"{system}\n\n{text}"
        first_user = first_user and role != "user"
        ids += fmt.turn("user" if role == "user" else "model", text)
    return ids + fmt.generation_prompt(reasoning)


def close_reply(tokenizer, reply_ids: list[int]) -> list[int]:
    """A model turn's tokens in history: the generation prompt, the reply, ``<end_of_turn>\\n`` (Gemma 1-3)."""
    return GemmaFormat(tokenizer).close_reply(reply_ids)


class Conversation:
    """Completed turns of one session (mutable; the owning Session serialises access)."""

    def __init__(self, tokenizer, system: str | None = None, reasoning: bool = False):
        self.format = chat_format(tokenizer)  # InvalidRequestError when the tokenizer has no turn markers
        self.format.check_reasoning(reasoning)
        self.tokenizer = tokenizer
        self.system = system or None
        self.reasoning = reasoning  # thinking on in the history's prefix (the last turn's value)
        self.messages: list[Message] = []
        self.dropped_turns = 0

    @property
    def token_ids(self) -> list[int]:
        return self._ids(self.messages, self.reasoning)

    def copy(self) -> Conversation:
        """An independent copy (messages are immutable: shared)."""
        out = Conversation(self.tokenizer, self.system, self.reasoning)
        out.messages = list(self.messages)
        out.dropped_turns = self.dropped_turns
        return out

    def _ids(self, messages: Sequence[Message], reasoning: bool) -> list[int]:
        ids = self.format.prefix(self.system, reasoning)
        for m in messages:
            ids.extend(m.token_ids)
        return ids

    def user_message(self, text: str, first: bool | None = None) -> Message:
        """The next user turn (the system prompt goes at the start of the first one)."""
        check_text(text)
        if not text.strip():
            raise InvalidRequestError("a message must be non-empty text")
        first = not self.messages if first is None else first
        first = first and self.format.system_in_first_user
        body = f"{self.system}\n\n{text}" if first and self.system else text
        return Message(role="user", text=text, created_at=time.time(), token_ids=tuple(self.format.turn("user", body)))

    def system_end(self, prompt: list[int], reasoning: bool | None = None) -> int | None:
        """Where the system prompt ends in ``prompt`` (every session with this system prompt shares the tokens
        before it), or None. A recurrent model snapshots its state there."""
        if not self.system:
            return None
        head = self.format.system_head(self.system, self.reasoning if reasoning is None else reasoning)
        return len(head) if prompt[:len(head)] == head else None

    def prompt_for(self, user: Message, history: Sequence[Message] | None = None,
                   reasoning: bool | None = None) -> list[int]:
        """Token ids the model sees for the next reply (after ``history``, by default the whole history; thinking
        ``reasoning``, by default the history's)."""
        reasoning = self.reasoning if reasoning is None else reasoning
        return [*self._ids(self.messages if history is None else history, reasoning), *user.token_ids,
                *self.format.generation_prompt(reasoning)]

    def plan_turn(self, text: str, max_tokens: int, max_context: int, policy: str,
                  reasoning: bool | None = None) -> TurnPlan:
        """Plan the next turn so that its prompt fits the context; changes nothing (see :class:`TurnPlan`).

        The reply gets ``max_tokens`` or what the context has left, whichever is less. Old turns are dropped only
        when the prompt would leave less than ``min(max_tokens, REPLY_RESERVE, max_context // 4)`` tokens for the
        reply: a long
        ``max_tokens`` alone never costs history. ``truncate_oldest`` drops the oldest whole turns (user + reply)
        and keeps the system prompt by re-rendering the new first user turn; ``error`` raises
        ContextLengthError instead. ``reasoning``: thinking on for this turn (default: as the history's last turn).
        """
        reasoning = self.reasoning if reasoning is None else reasoning
        self.format.check_reasoning(reasoning)
        user = self.user_message(text)
        reserve = max(1, min(max_tokens, REPLY_RESERVE, max_context // 4))
        history = list(self.messages)
        dropped = 0
        while len(self.prompt_for(user, history, reasoning)) + reserve > max_context:
            if policy == "error" or not history:
                break
            del history[:2]
            dropped += 1
            history = self._rerendered(history)
        if dropped and not history:
            user = self.user_message(text, first=True)  # it is the first turn now: it carries the system prompt
        left = max_context - len(self.prompt_for(user, history, reasoning))
        if left < reserve or left < 1:
            what = "the conversation" if history else "the message alone"
            raise ContextLengthError(f"{what} needs {max_context - left + reserve} tokens "
                                     f"(prompt and reply); the context is {max_context}")
        return TurnPlan(history=tuple(history), user=user, max_tokens=min(max_tokens, left), dropped=dropped,
                        prompt=tuple(self.prompt_for(user, history, reasoning)), reasoning=reasoning)

    def with_turn(self, plan: TurnPlan, reply_text: str, reply_ids: list[int],
                  message_id: str | None = None) -> list[Message]:
        """The history after ``plan``'s turn completed with this reply (the conversation is not changed; adopt it
        with ``replace(..., reasoning=plan.reasoning)``). ``reply_ids``: every id generated, thoughts included; the
        format keeps what its template keeps (Gemma 4: the answer's ids, without thought channels). ``message_id``:
        the reply message's id (default a new one)."""
        return [*plan.history, plan.user, self._reply(reply_text, reply_ids, plan.reasoning, message_id)]

    def append_turn(self, user: Message, reply_text: str, reply_ids: list[int]) -> Message:
        """Append a completed turn in place (for references and tests: a Session goes through ``with_turn``)."""
        reply = self._reply(reply_text, reply_ids, self.reasoning)
        self.messages.extend([user, reply])
        return reply

    def _reply(self, text: str, reply_ids: list[int], reasoning: bool, message_id: str | None = None) -> Message:
        reply = Message(role="model", text=text, created_at=time.time(),
                        token_ids=tuple(self.format.close_reply(reply_ids, reasoning)))
        return reply if message_id is None else dataclasses.replace(reply, id=message_id)

    def with_message(self, role: str, text: str) -> tuple[list[Message], Message]:
        """(history with one more message, that message): a user turn, or a model turn written by the caller."""
        if role == "user":
            msg = self.user_message(text)
        elif role == "model":
            check_text(text)
            msg = Message(role="model", text=text, created_at=time.time(),
                          token_ids=tuple(self.format.turn("model", text)))
        else:
            raise InvalidRequestError(f"role must be one of {ROLES}, got {role!r}")
        return [*self.messages, msg], msg

    def without_message(self, message_id: str) -> tuple[list[Message], Message]:
        """(history without that message, the message); KeyError when there is none."""
        for i, m in enumerate(self.messages):
            if m.id == message_id:
                rest = self.messages[:i] + self.messages[i + 1:]
                return (self._rerendered(rest) if i == 0 else rest), m
        raise KeyError(message_id)

    def replace(self, messages: list[Message], dropped: int = 0, reasoning: bool | None = None) -> None:
        """Adopt a history computed by ``with_turn`` / ``with_message`` / ``without_message`` (and the thinking
        switch its turn ran with)."""
        self.messages = list(messages)
        self.dropped_turns += dropped
        if reasoning is not None:
            self.reasoning = reasoning

    def _rerendered(self, messages: list[Message]) -> list[Message]:
        """``messages`` whose first user turn carries the system prompt (after the turns before it went)."""
        if messages and self.system and messages[0].role == "user" and self.format.system_in_first_user:
            first = messages[0]
            body = f"{self.system}\n\n{first.text}"
            return [dataclasses.replace(first, token_ids=tuple(self.format.turn("user", body))), *messages[1:]]
        return messages
