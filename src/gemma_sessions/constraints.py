"""Token constraints: which next tokens keep a generation valid (OpenAI's ``response_format``: ``json_object``,
``json_schema``).

Contract: a constraint is the engine's ``TokenConstraint`` (``allows(token)``, ``advance(token)``, ``only()``); the
engine knows no text, so the constraint holds the tokenizer and judges each candidate by the bytes it would add.
:class:`JsonPrefix` is an incremental byte-level check that what was generated is the start of one valid JSON text
(RFC 8259); :class:`JsonObjectConstraint` asks for one JSON object and then a stop token,
:class:`JsonSchemaConstraint` for one JSON text a schema accepts (``json_schema``) and then a stop. The sampler tries
candidates in its own order (most likely first), so a constrained greedy token is the most likely allowed one.
Whitespace outside strings is capped (``MAX_BLANKS`` bytes in a row), so a model cannot stall in blank space, and a
JSON-object reply opens with its ``{``.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .json_schema import JsonSchema

MAX_BLANKS = 16
MAX_DEPTH = 64  # nesting a constrained reply may reach (Python's json reads far deeper; a cap keeps the stack small)
_BLANK = frozenset(b" \t\r\n")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = (b"true", b"false", b"null")

# states
(_VALUE, _ARR_FIRST, _OBJ_KEY_OR_END, _OBJ_KEY, _COLON, _COMMA_OR_END, _STRING, _ESCAPE, _UNICODE, _NUMBER, _LITERAL,
 _DONE) = range(12)


class JsonPrefix:
    """Feed bytes; ``feed`` is False as soon as they cannot begin a valid JSON text (the state is then spoiled: feed
    a ``copy()`` to test a candidate). ``complete``: one whole value was read (only blanks may follow)."""

    __slots__ = ("stack", "state", "blanks", "aux", "key", "object_only")

    def __init__(self, object_only: bool = False) -> None:
        self.stack: list[int] = []  # containers: ord("{") or ord("[")
        self.state = _VALUE
        self.blanks = 0  # blank bytes in a row outside strings
        self.aux = b""   # a number's or a literal's bytes so far; a \u escape's hex digits
        self.key = False  # the string being read is an object key
        self.object_only = object_only  # the top-level value must be an object

    def copy(self) -> JsonPrefix:
        c = JsonPrefix.__new__(JsonPrefix)
        c.stack, c.state, c.blanks, c.aux, c.key, c.object_only = (list(self.stack), self.state, self.blanks,
                                                                  self.aux, self.key, self.object_only)
        return c

    @property
    def complete(self) -> bool:
        return self.state == _DONE or (self.state == _NUMBER and not self.stack and _number_ends(self.aux))

    @property
    def finished(self) -> bool:
        """Complete, and nothing but blank space may follow (a top-level number may still grow)."""
        return self.state == _DONE

    def feed(self, data: bytes) -> bool:
        return all(self._byte(b) for b in data)

    # ------------------------------------------------------------------------------------------------ one byte
    def _byte(self, b: int) -> bool:
        s = self.state
        if s == _STRING:
            if b == 0x22:  # "
                self._value_done(key=self.key)
            elif b == 0x5C:
                self.state = _ESCAPE
            elif b < 0x20:
                return False
            return True
        if s == _ESCAPE:
            if b == 0x75:  # u
                self.state, self.aux = _UNICODE, b""
                return True
            if b in _ESCAPES:
                self.state = _STRING
                return True
            return False
        if s == _UNICODE:
            if b not in _HEX:
                return False
            self.aux += bytes((b,))
            if len(self.aux) == 4:
                self.state, self.aux = _STRING, b""
            return True
        if s == _NUMBER:
            if _number_continues(self.aux + bytes((b,))):
                self.aux += bytes((b,))
                return True
            if not _number_ends(self.aux):
                return False
            self._value_done()
            return self._byte(b)  # the byte after the number, read in the state after a value
        if s == _LITERAL:
            word = self.aux + bytes((b,))
            if not any(lit.startswith(word) for lit in _LITERALS):
                return False
            self.aux = word
            if word in _LITERALS:
                self._value_done()
            return True
        if b in _BLANK:
            if self.object_only and s == _VALUE and not self.stack:  # the reply opens with its "{"
                return False
            self.blanks += 1
            return self.blanks <= MAX_BLANKS
        self.blanks = 0
        if s == _DONE:
            return False
        if s == _VALUE:
            return self._start_value(b)
        if s == _ARR_FIRST:
            if b == 0x5D:  # ] of []
                self.stack.pop()
                self._value_done()
                return True
            return self._start_value(b)
        if s == _OBJ_KEY_OR_END and b == 0x7D:  # } of {}
            self.stack.pop()
            self._value_done()
            return True
        if s in (_OBJ_KEY_OR_END, _OBJ_KEY):
            if b != 0x22:
                return False
            self.state, self.key = _STRING, True
            return True
        if s == _COLON:
            if b != 0x3A:
                return False
            self.state = _VALUE
            return True
        if s == _COMMA_OR_END:
            top = self.stack[-1]
            if b == 0x2C:  # ,
                self.state = _OBJ_KEY if top == 0x7B else _VALUE
                return True
            if b == (0x7D if top == 0x7B else 0x5D):
                self.stack.pop()
                self._value_done()
                return True
        return False

    def _start_value(self, b: int) -> bool:
        if self.object_only and not self.stack and b != 0x7B:
            return False
        if len(self.stack) >= MAX_DEPTH and b in (0x7B, 0x5B):
            return False
        if b == 0x7B:  # {
            self.stack.append(b)
            self.state = _OBJ_KEY_OR_END
        elif b == 0x5B:  # [
            self.stack.append(b)
            self.state = _ARR_FIRST
        elif b == 0x22:
            self.state, self.key = _STRING, False
        elif b == 0x2D or b in _DIGITS:
            self.state, self.aux = _NUMBER, bytes((b,))
        elif any(lit[0] == b for lit in _LITERALS):
            self.state, self.aux = _LITERAL, bytes((b,))
        else:
            return False
        return True

    def _value_done(self, key: bool = False) -> None:
        self.aux = b""
        if key:
            self.state, self.key = _COLON, False
        elif not self.stack:
            self.state = _DONE
        else:
            self.state = _COMMA_OR_END


# RFC 8259's number, whole, and read as a prefix (a '.' or an exponent may still be waiting for its digits)
_NUMBER_RE = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_PREFIX_RE = re.compile(rb"-?(?:(?:0|[1-9][0-9]*)(?:\.(?:[0-9]+(?:[eE][+-]?[0-9]*)?)?|[eE][+-]?[0-9]*)?)?")


def _number_continues(word: bytes) -> bool:
    """``word`` is the start of a JSON number."""
    return _NUMBER_PREFIX_RE.fullmatch(word) is not None


def _number_ends(word: bytes) -> bool:
    """``word`` is a whole JSON number (it may end here)."""
    return _NUMBER_RE.fullmatch(word) is not None


class JsonConstraint:
    """One JSON text that ``matcher`` accepts, then one of ``stop_ids`` (the engine's ``TokenConstraint``). The
    matcher is fed bytes (``feed``, ``copy``, ``complete``, ``finished``: :class:`JsonPrefix`'s interface, or
    ``json_schema.SchemaMatcher``'s). ``token_bytes(id)``: the bytes a token adds to the text (the tokenizer's
    ``token_bytes(id, skip_special=False)``); ``special``: ids that are never text (control tokens), allowed only as
    the stop once the text is complete; ``single_bytes``: the tokens of one byte each (a byte-fallback vocabulary has
    all 256), which can spell any continuation (``fallback``)."""

    def __init__(self, matcher, token_bytes, stop_ids: Iterable[int], special: Iterable[int] = (),
                 single_bytes: Iterable[int] = ()) -> None:
        self._bytes = token_bytes
        self._stop = frozenset(int(t) for t in stop_ids)
        self._special = frozenset(int(t) for t in special) | self._stop
        self._single = tuple(int(t) for t in single_bytes)
        self.json = matcher
        self._after_first: dict[int, object] = {}  # first byte -> the matcher after it (None: refused); this step

    def only(self) -> frozenset[int] | None:
        """The allowed tokens when they are few and known (the stops, once nothing but a stop may follow), else
        None."""
        return self._stop if self.json.finished else None

    def fallback(self) -> tuple[int, ...]:
        """Tokens to try when none of the likely ones is allowed: the single bytes (every continuation starts with
        one), so the sampler never scans the whole vocabulary."""
        return self._single

    def allows(self, token: int) -> bool:
        if token in self._special:
            return token in self._stop and self.json.complete
        if self.json.finished:
            return False
        data = self._bytes(token)
        if not data:
            return False
        # candidates of a step share first bytes: each first byte is judged once (most candidates end there)
        after = self._after_first.get(data[0], self)  # (self: that byte not judged yet this step)
        if after is self:
            m = self.json.copy()
            after = self._after_first[data[0]] = m if m.feed(data[:1]) else None
        return after is not None and (len(data) == 1 or after.copy().feed(data[1:]))

    def advance(self, token: int) -> None:
        if token not in self._special:
            self.json.feed(self._bytes(token))
        self._after_first = {}


class JsonObjectConstraint(JsonConstraint):
    """One JSON object, then a stop (``response_format: json_object``); the arguments are :class:`JsonConstraint`'s
    after its matcher."""

    def __init__(self, token_bytes, stop_ids: Iterable[int], special: Iterable[int] = (),
                 single_bytes: Iterable[int] = ()) -> None:
        super().__init__(JsonPrefix(object_only=True), token_bytes, stop_ids, special, single_bytes)


class JsonSchemaConstraint(JsonConstraint):
    """One JSON text that a compiled ``json_schema.JsonSchema`` accepts, then a stop (``response_format:
    json_schema``); every prefix it allows can still be completed, so the reply never runs into a dead end."""

    def __init__(self, schema: JsonSchema, token_bytes, stop_ids: Iterable[int], special: Iterable[int] = (),
                 single_bytes: Iterable[int] = ()) -> None:
        super().__init__(schema.matcher(), token_bytes, stop_ids, special, single_bytes)


_VOCAB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (control ids, one-byte ids)
_VOCAB_LOCK = threading.Lock()


def json_constraint(model, schema: Any = None) -> JsonConstraint:
    """A new constraint for one generation of ``model`` (a ``Model``: its tokenizer and stop ids): one JSON object
    (``schema`` None), or one JSON text ``schema`` accepts (a ``json_schema.JsonSchema``, or a schema to compile:
    ``SchemaError`` on what it cannot honour). Each generation needs its own; the vocabulary scan is done once per
    tokenizer."""
    tok = model.tokenizer

    def token_bytes(token: int) -> bytes:  # ids past the tokenizer's vocabulary (padding rows) are no text
        return tok.token_bytes(token, skip_special=False) if token < tok.vocab_size else b""

    with _VOCAB_LOCK:
        vocab = _VOCAB.get(tok)
        if vocab is None:
            control = frozenset(i for i in range(tok.vocab_size) if tok.is_control(i))
            vocab = _VOCAB[tok] = (control, tuple(i for i in range(tok.vocab_size)
                                                  if i not in control and len(token_bytes(i)) == 1))
    control, single = vocab
    if schema is None:
        return JsonObjectConstraint(token_bytes, model.stop_ids, control, single)
    from .json_schema import JsonSchema  # (here: json_schema imports this module's caps)
    compiled = schema if isinstance(schema, JsonSchema) else JsonSchema(schema)
    return JsonSchemaConstraint(compiled, token_bytes, model.stop_ids, control, single)
