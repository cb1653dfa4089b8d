"""Conversation history as exact token ids, rendered in Gemma's turn format, and its context policy.

Contract: a :class:`Conversation` is the list of completed turns, each with its text (for display) and the exact
token ids the model saw or produced. ``token_ids`` is their concatenation after ``<bos>``; it is never rebuilt by
re-tokenizing stored text. Gemma has no system role: the system prompt is put at the start of the first user
turn (as Gemma's chat template does), which is the only turn ever re-rendered (after older turns are dropped).

    <bos><start_of_turn>user\\n{system}\\n\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n...

Only ``render_turn`` emits control tokens; user text is encoded as plain text, so ``<start_of_turn>`` typed by a
user stays text (no prompt injection).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from ..errors import ContextLengthError, InvalidRequestError

CONTEXT_POLICIES = ("truncate_oldest", "error")
ROLES = ("user", "model")


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


def render_turn(tokenizer, role: str, text: str) -> list[int]:
    """``<start_of_turn>{role}\\n{text}<end_of_turn>\\n`` as token ids (text encoded as plain text)."""
    return [tokenizer.start_of_turn_id, *tokenizer.encode(f"{role}\n{text}"), tokenizer.end_of_turn_id,
            *tokenizer.encode("\n")]


def generation_prompt(tokenizer) -> list[int]:
    """``<start_of_turn>model\\n``: what the model continues from."""
    return [tokenizer.start_of_turn_id, *tokenizer.encode("model\n")]


def close_reply(tokenizer, reply_ids: list[int]) -> list[int]:
    """A model turn's tokens in history: the generation prompt, the reply, ``<end_of_turn>\\n``."""
    return [*generation_prompt(tokenizer), *reply_ids, tokenizer.end_of_turn_id, *tokenizer.encode("\n")]


class Conversation:
    """Completed turns of one session (mutable; the owning Session serialises access)."""

    def __init__(self, tokenizer, system: str | None = None):
        if tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None:
            raise InvalidRequestError("this tokenizer has no <start_of_turn>/<end_of_turn>: it cannot chat")
        self.tokenizer = tokenizer
        self.system = system or None
        self.messages: list[Message] = []
        self.dropped_turns = 0

    @property
    def token_ids(self) -> list[int]:
        ids = [self.tokenizer.bos_id]
        for m in self.messages:
            ids.extend(m.token_ids)
        return ids

    def user_message(self, text: str) -> Message:
        """The next user turn (the system prompt goes at the start of the first one)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError("a message must be non-empty text")
        first = not self.messages
        body = f"{self.system}\n\n{text}" if first and self.system else text
        return Message(role="user", text=text, created_at=time.time(),
                       token_ids=tuple(render_turn(self.tokenizer, "user", body)))

    def system_end(self, prompt: list[int]) -> int | None:
        """Where the system prompt ends in ``prompt`` (every session with this system prompt shares the tokens
        before it), or None. A recurrent model snapshots its state there."""
        if not self.system:
            return None
        tok = self.tokenizer
        head = [tok.bos_id, tok.start_of_turn_id, *tok.encode(f"user\n{self.system}\n\n")]
        return len(head) if prompt[:len(head)] == head else None

    def prompt_for(self, user: Message) -> list[int]:
        """Token ids the model sees for the next reply."""
        return [*self.token_ids, *user.token_ids, *generation_prompt(self.tokenizer)]

    def append_turn(self, user: Message, reply_text: str, reply_ids: list[int]) -> Message:
        reply = Message(role="model", text=reply_text, created_at=time.time(),
                        token_ids=tuple(close_reply(self.tokenizer, reply_ids)))
        self.messages.extend([user, reply])
        return reply

    def add_message(self, role: str, text: str) -> Message:
        """Append a message without generating (a user turn, or a model turn written by the caller)."""
        if role == "user":
            msg = self.user_message(text)
        elif role == "model":
            if not isinstance(text, str):
                raise InvalidRequestError("a message must be text")
            msg = Message(role="model", text=text, created_at=time.time(),
                          token_ids=tuple(render_turn(self.tokenizer, "model", text)))
        else:
            raise InvalidRequestError(f"role must be one of {ROLES}, got {role!r}")
        self.messages.append(msg)
        return msg

    def remove_message(self, message_id: str) -> Message:
        for i, m in enumerate(self.messages):
            if m.id == message_id:
                del self.messages[i]
                if i == 0:
                    self._rerender_first()
                return m
        raise KeyError(message_id)

    def fit(self, user: Message, max_tokens: int, max_context: int, policy: str) -> tuple[Message, int, int]:
        """Make the next prompt fit the context: (user message, max new tokens, turns dropped).

        ``truncate_oldest`` drops the oldest whole turns (user + reply) and keeps the system prompt, by re-rendering
        the new first user turn; ``error`` raises ContextLengthError and changes nothing.
        """
        need = len(self.prompt_for(user)) + max_tokens
        if need <= max_context:
            return user, max_tokens, 0
        if policy == "error":
            raise ContextLengthError(f"the conversation needs {need} tokens; the context is {max_context}")
        dropped = 0
        while self.messages and len(self.prompt_for(user)) + max_tokens > max_context:
            del self.messages[:2]
            dropped += 1
            self._rerender_first()
        if not self.messages and dropped:
            user = self.user_message(user.text)  # it is the first turn now: it carries the system prompt
        left = max_context - len(self.prompt_for(user))
        if left < 1:
            raise ContextLengthError(f"the message alone needs {max_context - left} tokens; "
                                     f"the context is {max_context}")
        self.dropped_turns += dropped
        return user, min(max_tokens, left), dropped

    def _rerender_first(self) -> None:
        if self.messages and self.system and self.messages[0].role == "user":
            first = self.messages[0]
            body = f"{self.system}\n\n{first.text}"
            self.messages[0] = dataclasses.replace(
                first, token_ids=tuple(render_turn(self.tokenizer, "user", body)))
