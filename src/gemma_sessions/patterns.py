"""JSON Schema ``pattern`` (and the string ``format``s that are patterns) as a character automaton that
``json_schema`` steps one decoded character at a time, answering on every prefix whether the string can still be
completed (within the schema's ``minLength`` / ``maxLength``), so a constrained reply never runs into a dead end.

Contract: ``Pattern(source)`` compiles a regular expression or raises :class:`PatternError` naming what it cannot
honour; ``start`` is the state before any character, ``step(state, ch)`` the state after one (0: no match can
follow), ``accepts(state)`` whether the characters so far match, ``live(state, lo, hi)`` whether some completion of
``lo`` to ``hi`` more characters matches, ``viable(state, first, last, lo, hi)`` whether one character in
``[first, last]`` leads to a live state (a JSON escape or a UTF-8 character still being read). States are ints (sets of
automaton states as bits): hashable, so parse readings that agree compare equal. A compiled pattern is immutable
apart from its memo tables, and shared by the matchers of many requests.

Syntax (ECMA-262, as JSON Schema says, without flags): literals, ``.``, classes ``[...]`` / ``[^...]`` with ranges,
``\\d \\w \\s`` and their negations, escapes ``\\t \\n \\r \\f \\v \\0 \\xHH \\uHHHH \\cX`` and escaped punctuation,
groups ``(...)`` ``(?:...)`` ``(?<name>...)``, ``|``, quantifiers ``* + ? {n} {n,} {n,m}`` (lazy or not: the same
strings). A pattern is unanchored (it matches a string containing a match) unless an alternative starts with ``^``
or ends with ``$``. Characters are code points (as Python's ``re``, which the tests' reference validator uses).
Refused, by name: backreferences, lookaround, word boundaries, ``^`` / ``$`` inside the pattern, Unicode property
escapes, empty classes.

What is generated is a subset of what the pattern accepts under ECMA, Python's ``re`` and Rust's ``regex`` (pydantic's)
alike: ``\\d`` and ``\\w`` are ASCII, ``\\s`` the whitespace the engines share, and ``\\D \\W \\S`` (and a negated class
with them) ASCII characters outside those.
"""

from __future__ import annotations

import bisect
import collections
import math

from .errors import InvalidRequestError

MAX_PATTERN_LENGTH = 1000  # characters of one pattern
MAX_PATTERN_STATES = 512   # automaton states of one pattern (a counted repeat is copied that many times)
MAX_REPEAT = 1000          # the largest count in {n,m}
MAX_MEMO = 8192            # states whose transitions or liveness one pattern keeps (then it starts over)

_INF = math.inf
_MAX_CP = 0x10FFFF
_ALL = ((0, 0xD7FF), (0xE000, _MAX_CP))  # code points a valid UTF-8 string holds (no surrogates)
_ASCII = ((0, 0x7F),)
_DIGIT = ((0x30, 0x39),)
_WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
          (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))
_LINE_ENDS = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
_CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B}


class PatternError(InvalidRequestError):
    """A pattern this server cannot constrain a string to."""


# ------------------------------------------------------------------------------------------------- character sets
def _norm(ranges) -> tuple[tuple[int, int], ...]:
    """Sorted, merged ranges, without surrogates."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, 0xD7FF)), (max(lo, 0xE000), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
    return tuple((a, b) for a, b in out)


def _complement(ranges) -> tuple[tuple[int, int], ...]:
    out, at = [], 0
    for lo, hi in _norm(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= _MAX_CP:
        out.append((at, _MAX_CP))
    return _norm(out)


def _intersect(a, b) -> tuple[tuple[int, int], ...]:
    return _norm((max(x, y), min(p, q)) for x, p in a for y, q in b if max(x, y) <= min(p, q))


_CLASSES = {"d": _DIGIT, "w": _WORD, "s": _norm(_SPACE),
            "D": _intersect(_complement(_DIGIT), _ASCII), "W": _intersect(_complement(_WORD), _ASCII),
            "S": _intersect(_complement(_SPACE), _ASCII)}
_DOT = _complement(_LINE_ENDS)


# ------------------------------------------------------------------------------------------------------------ parser
class _Parser:
    """ECMA-262 pattern text -> a tree: ("set", ranges) | ("cat", [t]) | ("alt", [t]) | ("rep", t, lo, hi)."""

    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    def fail(self, why: str) -> PatternError:
        return PatternError(f"pattern {self.text!r}: {why} (at character {self.at})")

    def peek(self) -> str | None:
        return self.text[self.at] if self.at < len(self.text) else None

    def top(self) -> tuple:
        """The whole pattern: each top-level alternative anchored where it says, else padded with ``.*``-likes."""
        alts = []
        while True:
            start = self.peek() == "^"
            self.at += start
            items = self.sequence(top=True)
            end = self.peek() == "$"
            self.at += end
            anything = ("rep", ("set", _ALL), 0, _INF)
            alts.append(("cat", ([] if start else [anything]) + items + ([] if end else [anything])))
            if self.peek() is None:
                return ("alt", alts)
            if self.peek() != "|":
                raise self.fail("^ and $ are only taken at the start and end of the pattern or of an alternative")
            self.at += 1

    def alternation(self) -> tuple:
        alts = [("cat", self.sequence())]
        while self.peek() == "|":
            self.at += 1
            alts.append(("cat", self.sequence()))
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def sequence(self, top: bool = False) -> list:
        items: list = []
        while (c := self.peek()) is not None and c not in "|)":
            if c in "^$":
                if top and c == "$" and (self.at + 1 == len(self.text) or self.text[self.at + 1] == "|"):
                    break
                raise self.fail("^ and $ are only taken at the start and end of the pattern or of an alternative")
            if c in "*+?":
                raise self.fail(f"{c!r} has nothing to repeat")
            if c == "{" and self.quantifier(peek=True) is not None:
                raise self.fail("a {n,m} count has nothing to repeat")
            atom = self.atom()
            while (q := self.quantifier()) is not None:
                atom = ("rep", atom, *q)
            items.append(atom)
        if self.peek() == ")" and top:
            raise self.fail("unbalanced ')'")
        return items

    def quantifier(self, peek: bool = False) -> tuple[int, float] | None:
        c, start = self.peek(), self.at
        if c in ("*", "+", "?"):
            q: tuple[int, float] = {"*": (0, _INF), "+": (1, _INF), "?": (0, 1)}[c]
            self.at += 1
        elif c == "{":
            close = self.text.find("}", self.at)
            body = self.text[self.at + 1:close] if close > 0 else ""
            lo_text, comma, hi_text = body.partition(",")
            if not lo_text and comma and hi_text.isdigit():
                raise self.fail("{,n} is a count in Python's re and text in ECMA: write {0,n}")
            if not lo_text.isdigit() or not (hi_text.isdigit() or hi_text == ""):
                return None  # not a count: a literal "{" (as ECMA's Annex B and Python's re read it)
            lo, hi = int(lo_text), (int(hi_text) if hi_text else (_INF if comma else int(lo_text)))
            if lo > hi:
                raise self.fail("a {n,m} count with n above m")
            if max(lo, hi if hi != _INF else 0) > MAX_REPEAT:
                raise self.fail(f"a count above {MAX_REPEAT}")
            q = (lo, hi)
            self.at = close + 1
        else:
            return None
        if peek:
            self.at = start
            return q
        if self.peek() == "?":
            self.at += 1  # lazy: the same strings match
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self.quantifier(peek=True) is not None):
            raise self.fail("a quantifier cannot follow a quantifier")
        return q

    def atom(self) -> tuple:
        c = self.text[self.at]
        self.at += 1
        if c == ".":
            return ("set", _DOT)
        if c == "[":
            return ("set", self.char_class())
        if c == "(":
            if self.text.startswith("?:", self.at):
                self.at += 2
            elif self.text.startswith("?<", self.at) and self.text[self.at + 2:self.at + 3] not in ("=", "!"):
                close = self.text.find(">", self.at)
                if close < 0 or not self.text[self.at + 2:close].isidentifier():
                    raise self.fail("a group name must be a name")
                self.at = close + 1
            elif self.peek() == "?":
                raise self.fail("lookaround and inline flags are not supported")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("unbalanced '('")
            self.at += 1
            return inner
        if c == "\\":
            return ("set", self.escape(in_class=False))
        return ("set", _norm([(ord(c), ord(c))]))

    def escape(self, in_class: bool) -> tuple[tuple[int, int], ...]:
        if self.at >= len(self.text):
            raise self.fail("a pattern cannot end with a backslash")
        c = self.text[self.at]
        self.at += 1
        if c in _CLASSES:
            return _CLASSES[c]
        if c in _CHAR_ESCAPES:
            return ((_CHAR_ESCAPES[c],) * 2,)
        if c == "b" and in_class:
            return ((0x08, 0x08),)
        if c == "0" and not (self.peek() or "").isdigit():
            return ((0, 0),)
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.text[self.at:self.at + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"\\{c} needs {n} hex digits")
            self.at += n
            return _norm([(int(digits, 16),) * 2]) or self._surrogate()
        if c == "c" and (self.peek() or "").isascii() and (self.peek() or "").isalpha():
            self.at += 1
            return ((ord(self.text[self.at - 1]) % 32,) * 2,)
        if c.isdigit():
            raise self.fail("backreferences are not supported")
        if c in "bB":
            raise self.fail("word boundaries (\\b, \\B) are not supported")
        if c in "pP":
            raise self.fail("Unicode property escapes are not supported")
        if c.isalnum() or c == "_":
            raise self.fail(f"the escape \\{c} is not supported")
        return _norm([(ord(c), ord(c))])

    def _surrogate(self):
        raise self.fail("a lone surrogate cannot be in a valid string")

    def char_class(self) -> tuple[tuple[int, int], ...]:
        negate = self.peek() == "^"
        self.at += negate
        if self.peek() == "]":
            raise self.fail("an empty class ([] or [^]) is not supported")
        ranges: list[tuple[int, int]] = []
        shorthand = False
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("unbalanced '['")
            if c == "]":
                self.at += 1
                break
            lo = self.class_atom()
            if len(lo) != 1 or lo[0][0] != lo[0][1]:  # a class escape (\d...) or a surrogate-free set
                shorthand = shorthand or any(lo == _CLASSES[k] for k in _CLASSES)
                ranges.extend(lo)
                continue
            if self.peek() == "-" and self.text[self.at + 1:self.at + 2] not in ("]", ""):
                self.at += 1
                hi = self.class_atom()
                if len(hi) != 1 or hi[0][0] != hi[0][1]:
                    raise self.fail("a class range must be between two characters")
                if hi[0][0] < lo[0][0]:
                    raise self.fail("a class range out of order")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        out = _norm(ranges)
        if negate:
            out = _complement(out)
            if shorthand:  # \d \w \s inside: outside them in ASCII only (the engines differ beyond it)
                out = _intersect(out, _ASCII)
        if not out:
            raise self.fail("a class that matches no character")
        return out

    def class_atom(self) -> tuple[tuple[int, int], ...]:
        c = self.text[self.at]
        self.at += 1
        if c == "\\":
            return self.escape(in_class=True)
        return ((ord(c), ord(c)),) if not 0xD800 <= ord(c) <= 0xDFFF else self._surrogate()


# --------------------------------------------------------------------------------------------------------- automaton
class Pattern:
    """A compiled pattern (see the module's docstring). States are ints: bit s set when automaton state s is live
    (every set is closed under the automaton's empty moves)."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise PatternError("a pattern must be a string")
        if len(source) > MAX_PATTERN_LENGTH:
            raise PatternError(f"a pattern has at most {MAX_PATTERN_LENGTH} characters")
        self.source = source
        tree = _Parser(source).top()
        self._eps: list[list[int]] = []
        self._moves: list[list[tuple[tuple[tuple[int, int], ...], int]]] = []
        begin, self._final = self._build(tree)
        n = len(self._eps)
        closure = [self._closure(s) for s in range(n)]
        self._char_moves = [[(r, closure[t]) for r, t in self._moves[s]] for s in range(n)]
        self._any = [0] * n  # states after any one character, from state s
        for s in range(n):
            for _, t in self._char_moves[s]:
                self._any[s] |= t
        self.start = closure[begin]
        self._accept = 1 << self._final
        self._dist = self._distances()  # fewest characters from a state to a match (inf: none)
        self._cells: dict[int, tuple[list[int], list[int], list[int]]] = {}
        self._next_any: dict[int, int] = {}
        self._nearest: dict[int, float] = {}

    # construction
    def _state(self) -> int:
        if len(self._eps) >= MAX_PATTERN_STATES:
            raise PatternError(f"pattern {self.source!r} needs more than {MAX_PATTERN_STATES} automaton states "
                               "(counted repeats are copied)")
        self._eps.append([])
        self._moves.append([])
        return len(self._eps) - 1

    def _build(self, t: tuple) -> tuple[int, int]:
        """Thompson's construction: (entry, exit) states of tree t."""
        kind = t[0]
        if kind == "set":
            a, b = self._state(), self._state()
            self._moves[a].append((t[1], b))
            return a, b
        if kind == "cat":
            a = b = self._state()
            for item in t[1]:
                x, y = self._build(item)
                self._eps[b].append(x)
                b = y
            return a, b
        if kind == "alt":
            a, b = self._state(), self._state()
            for item in t[1]:
                x, y = self._build(item)
                self._eps[a].append(x)
                self._eps[y].append(b)
            return a, b
        _, inner, lo, hi = t
        a = b = self._state()
        for _ in range(lo):
            x, y = self._build(inner)
            self._eps[b].append(x)
            b = y
        if hi == _INF:
            x, y = self._build(inner)
            self._eps[b].append(x)
            self._eps[y].append(x)
            end = self._state()
            self._eps[b].append(end)
            self._eps[y].append(end)
            return a, end
        end = self._state()
        for _ in range(int(hi) - lo):
            x, y = self._build(inner)
            self._eps[b].append(x)
            self._eps[b].append(end)
            b = y
        self._eps[b].append(end)
        return a, end

    def _closure(self, s: int) -> int:
        seen, todo = 1 << s, [s]
        while todo:
            for t in self._eps[todo.pop()]:
                if not seen >> t & 1:
                    seen |= 1 << t
                    todo.append(t)
        return seen

    def _distances(self) -> list[float]:
        """0-1 BFS back from the final state: empty moves cost 0, character moves 1."""
        n = len(self._eps)
        back: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for s in range(n):
            for t in self._eps[s]:
                back[t].append((s, 0))
            for _, t in self._moves[s]:
                back[t].append((s, 1))
        dist: list[float] = [_INF] * n
        dist[self._final] = 0
        queue = collections.deque([self._final])
        while queue:
            s = queue.popleft()
            for p, w in back[s]:
                if dist[s] + w < dist[p]:
                    dist[p] = dist[s] + w
                    queue.appendleft(p) if w == 0 else queue.append(p)
        return dist

    # stepping
    def _transitions(self, state: int) -> tuple[list[int], list[int], list[int]]:
        """The state's moves as cells: (starts, ends, next states), sorted, disjoint; a character in no cell ends
        every match."""
        got = self._cells.get(state)
        if got is not None:
            return got
        by_class: dict[tuple, int] = {}  # moves on the same class go to the union of their targets
        for s in _bits(state):
            for r, t in self._char_moves[s]:
                by_class[r] = by_class.get(r, 0) | t
        moves = list(by_class.items())
        cuts = sorted({lo for r, _ in moves for lo, _ in r} | {hi + 1 for r, _ in moves for _, hi in r})
        starts, ends, nexts = [], [], []
        for a, b in zip(cuts, cuts[1:]):
            nxt = 0
            for r, t in moves:
                if any(lo <= a <= hi for lo, hi in r):
                    nxt |= t
            if nxt:
                if nexts and nexts[-1] == nxt and ends[-1] == a - 1:
                    ends[-1] = b - 1
                else:
                    starts.append(a), ends.append(b - 1), nexts.append(nxt)
        got = (starts, ends, nexts)
        _remember(self._cells, state, got)
        return got

    def step(self, state: int, ch: int) -> int:
        starts, ends, nexts = self._transitions(state)
        i = bisect.bisect_right(starts, ch) - 1
        return nexts[i] if i >= 0 and ch <= ends[i] else 0

    def accepts(self, state: int) -> bool:
        return bool(state & self._accept)

    def matches(self, text: str) -> bool:
        """Whether the whole of ``text`` is a string the pattern accepts."""
        state = self.start
        for ch in text:
            state = self.step(state, ord(ch))
            if not state:
                return False
        return self.accepts(state)

    def live(self, state: int, lo: float, hi: float) -> bool:
        """Whether some ``lo`` to ``hi`` more characters (hi may be inf) complete a match. The states ``lo``
        characters on (any characters), then the nearest match from them within ``hi - lo``: exact."""
        if hi < lo or not state:
            return False
        for _ in range(int(lo)):
            state = self._after_any(state)
            if not state:
                return False
        return self._nearest_match(state) <= hi - lo

    def viable(self, state: int, first: int, last: int, lo: float, hi: float) -> bool:
        """Whether a character in ``[first, last]`` leads to a state that is ``live(.., lo, hi)``."""
        starts, ends, nexts = self._transitions(state)
        i = max(bisect.bisect_right(starts, first) - 1, 0)
        while i < len(starts) and starts[i] <= last:
            a, b = max(starts[i], first), min(ends[i], last)
            if a <= b and _intersect(((a, b),), _ALL) and self.live(nexts[i], lo, hi):
                return True
            i += 1
        return False

    def _after_any(self, state: int) -> int:
        got = self._next_any.get(state)
        if got is None:
            got = 0
            for s in _bits(state):
                got |= self._any[s]
            _remember(self._next_any, state, got)
        return got

    def _nearest_match(self, state: int) -> float:
        got = self._nearest.get(state)
        if got is None:
            got = min((self._dist[s] for s in _bits(state)), default=_INF)
            _remember(self._nearest, state, got)
        return got


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _remember(memo: dict, key, value) -> None:
    if len(memo) >= MAX_MEMO:
        memo.clear()
    memo[key] = value


# ----------------------------------------------------------------------------------------------------------- formats
_YEAR = r"(?:000[1-9]|00[1-9]\d|0[1-9]\d\d|[1-9]\d{3})"
_MONTH_DAY = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
              r"|02-(?:0[1-9]|1\d|2[0-8]))")
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
FORMATS = {
    "date": f"^{_YEAR}-{_MONTH_DAY}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_YEAR}-{_MONTH_DAY}T{_TIME}$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "ipv4": rf"^{_OCTET}(?:\.{_OCTET}){{3}}$",
    "email": rf"^[A-Za-z0-9]+(?:[._+-][A-Za-z0-9]+)*@{_LABEL}(?:\.{_LABEL})*\.[A-Za-z]{{2,24}}$",
}
"""The string ``format``s whose strings are generated as a pattern (a subset of the valid ones: days every year has,
upper-case ``T`` / ``Z``, an address without quoted parts); other formats are annotations, as JSON Schema says."""
