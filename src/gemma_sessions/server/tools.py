"""Tool (function) calling on Chat Completions and Responses for models without a tool format of their own
(Gemma 1-3).

Contract: the tools go in the system prompt with the reply convention; the reply is constrained (``json_schema``) to
one JSON envelope, ``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` or, with ``tool_choice: "auto"``,
``{"response": "..."}``; the route turns it back into OpenAI's ``message.tool_calls`` (``finish_reason:
"tool_calls"``) or ``message.content``. So a call always names a given tool and its arguments always satisfy that
tool's ``parameters`` (as far as ``json_schema`` honours them; a keyword it cannot enforce is a 400). History is
rendered in the same convention: an assistant message's ``tool_calls`` as its envelope, a ``tool`` message as a user
turn ``{"tool_response": {"tool_call_id": ..., "content": ...}}``, and, while tools are on, an assistant text reply
as ``{"response": ...}`` (what the model wrote then). This is the "generic" convention llama.cpp's server uses for
models without a native tool format; ``ContentStream`` decodes the ``response`` string as it streams, and
``CallStream`` writes each call's arguments as they stream (the text the whole reply's arguments read as).

Responses (a session's history, see ``server/app.py``): a stored reply keeps the envelope the model wrote, and a
tool result is a user turn in the same convention (``input_turns``); ``envelope``, ``tool_result`` and ``call_items``
read stored turns back as OpenAI's items, with ``call_id``s derived from the message id, so they are the same every
time a reply is read.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..json_schema import check_nesting
from .protocol import OPENAI_NAME, content_text, input_items

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # calls one reply may make when parallel_tool_calls (OpenAI's default) is on
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: omitted, none taken


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Any  # a JSON schema (an object schema, as OpenAI's); NO_PARAMETERS when the tool gave none


def parse_tools(tools: list[Any], flat: bool = False) -> list[Tool]:
    """OpenAI's ``tools`` -> Tool list; ValueError naming what is wrong. Chat Completions nests a function
    (``{"type": "function", "function": {"name": ...}}``); Responses (``flat``) does not (``{"type": "function",
    "name": ...}``)."""
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"at most {MAX_TOOLS} tools")
    shape = "{'type': 'function', 'name': ...}" if flat else "{'type': 'function', 'function': {...}}"
    where = "" if flat else ".function"
    out: list[Tool] = []
    for i, t in enumerate(tools):
        f = t if flat else (t.get("function") if isinstance(t, dict) else None)
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise ValueError(f"tools[{i}] must be {shape} (only function tools are supported)")
        if flat and "name" not in t and "function" in t:
            raise ValueError(f"tools[{i}] has Chat Completions' shape; Responses take {shape}")
        name = f.get("name")
        if not isinstance(name, str) or not OPENAI_NAME.fullmatch(name):
            raise ValueError(f"tools[{i}]{where}.name must be 1 to 64 letters, digits, '_' or '-'")
        if any(name == o.name for o in out):
            raise ValueError(f"tools[{i}]{where}.name {name!r} is given twice")
        description = f.get("description") or ""
        params = f.get("parameters", NO_PARAMETERS)
        if params is None:  # Responses' SDK sends null for a tool without parameters
            params = NO_PARAMETERS
        if not isinstance(description, str) or not isinstance(params, (dict, bool)):
            raise ValueError(f"tools[{i}]{where}: description must be a string and parameters a JSON schema")
        check_nesting(params, f"tools[{i}]{where}.parameters")  # (before the schema is copied and rebased)
        out.append(Tool(name, description, params))
    return out


def chosen(tools: list[Tool], tool_choice: Any) -> tuple[str, list[Tool]]:
    """(mode, callable tools) of a ``tool_choice``: mode "none", "auto" or "required" (a named function: "required"
    with that one tool); ValueError for a choice that names nothing given."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, (tools if tool_choice != "none" else [])
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":  # Chat's shape, or Responses' flat one
        return "required", [_named(tools, tool_choice)]
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        spec = tool_choice.get("allowed_tools", tool_choice)  # Chat nests it; Responses does not
        mode, listed = (spec.get("mode"), spec.get("tools")) if isinstance(spec, dict) else (None, None)
        if mode not in ("auto", "required") or not isinstance(listed, list) or not listed:
            raise ValueError("tool_choice allowed_tools needs a mode ('auto' or 'required') and a non-empty list of "
                             "tools")
        names = {_named(tools, t).name for t in listed}
        return mode, [t for t in tools if t.name in names]
    raise ValueError("tool_choice must be 'none', 'auto', 'required', name a function ({'type': 'function', "
                     "'name': ...}, or Chat's {'type': 'function', 'function': {'name': ...}}) or list the allowed "
                     "tools ({'type': 'allowed_tools', 'mode': ..., 'tools': [...]})")


def _named(tools: list[Tool], ref: Any) -> Tool:
    """The tool a reference names (``{"type": "function", "name": ...}`` or Chat's nested ``function.name``)."""
    if not isinstance(ref, dict) or ref.get("type") != "function":
        raise ValueError("tool_choice can only name function tools")
    nested = ref.get("function")
    name = ref["name"] if "name" in ref else (nested.get("name") if isinstance(nested, dict) else None)
    match = [t for t in tools if t.name == name]
    if not match:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
    return match[0]


TOOLS_HEAD = "You can call these tools, described as JSON schemas:"
_CALLS = '{"tool_calls": [{"name": <tool name>, "arguments": <arguments as a JSON object>}]}'
TOOLS_HOW = {"auto": f'Reply with one JSON object: {_CALLS} to call tools, or {{"response": <your answer>}} to answer '
                     'directly.',
             "required": f"Reply with one JSON object calling the tools: {_CALLS}."}


def system_text(tools: list[Tool], mode: str, answer: Any = None) -> str:
    """What the system prompt says about the tools and the reply convention (``mode``: auto, or required;
    ``answer``: the JSON schema an answer's value follows, for a request with a JSON format, else None)."""
    listed = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                         for t in tools], ensure_ascii=False)
    shape = "" if answer is None or mode != "auto" else \
        f"An answer is a JSON value of this schema: {json.dumps(answer, ensure_ascii=False)}\n"
    return f"{TOOLS_HEAD}\n{listed}\n{shape}{TOOLS_HOW[mode]}"


def _announcement_end(text: str, start: int) -> int:
    """Where the tools' text that starts at ``start`` in ``text`` ends, or -1."""
    ends = [i + len(how) for how in TOOLS_HOW.values() if (i := text.find(how, start)) >= 0]
    return min(ends) if ends else -1


def announced(text: str | None) -> str | None:
    """The tools' text (``system_text``) a system prompt or a user turn's text carries (the last one), else None."""
    start = text.rfind(TOOLS_HEAD) if text else -1
    end = _announcement_end(text, start) if start >= 0 else -1
    return text[start:end] if end >= 0 else None


def without_announcement(text: str) -> str:
    """A user turn's text without the tools' text a Responses turn put before it (``announced``)."""
    if text.startswith(TOOLS_HEAD):
        end = _announcement_end(text, 0)
        if end >= 0 and text.startswith("\n\n", end):
            return text[end + 2:]
    return text


def reply_schema(tools: list[Tool], mode: str, parallel: bool, answer: Any = None) -> dict:
    """The JSON schema of a reply: the envelope of calls to ``tools`` (each tool's parameters hoisted under
    ``$defs`` with its references rewritten), or with mode "auto" also ``{"response": string}`` (``answer``: the
    schema of the response's value instead, for a request with a JSON format, hoisted the same way)."""
    defs: dict[str, Any] = {}
    calls = []
    for i, t in enumerate(tools):
        key = f"tool{i}"
        defs[key] = _rebase(copy.deepcopy(t.parameters), f"#/$defs/{key}")
        calls.append({"type": "object", "properties": {"name": {"const": t.name},
                                                       "arguments": {"$ref": f"#/$defs/{key}"}},
                      "required": ["name", "arguments"], "additionalProperties": False})
    envelope = {"type": "object", "properties": {"tool_calls": {
        "type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
        "maxItems": MAX_PARALLEL_CALLS if parallel else 1}}, "required": ["tool_calls"], "additionalProperties": False}
    if mode == "auto":
        value: Any = {"type": "string"}
        if answer is not None:
            defs["answer"] = _rebase(copy.deepcopy(answer), "#/$defs/answer")
            value = {"$ref": "#/$defs/answer"}
        reply = {"type": "object", "properties": {"response": value}, "required": ["response"],
                 "additionalProperties": False}
        return {"$defs": defs, "anyOf": [envelope, reply]}
    return {"$defs": defs, **envelope}


def answer_schema(fmt: tuple[str, Any] | None) -> Any:
    """The schema of an answer's value for a request's JSON format (``json_format()`` of its body), or None."""
    if fmt is None:
        return None
    if fmt[0] == "json_object":
        return {"type": "object"}
    check_nesting(fmt[1], "the format's schema")  # (before it is copied and rebased under the tools' envelope)
    return fmt[1]


_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # keywords whose values map names to schemas
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
_SCHEMA_ONE = ("items", "additionalProperties")


def _rebase(schema: Any, base: str) -> Any:
    """A tool's parameters moved to ``base``: its in-document references ("#...") now point below ``base``."""
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        schema["$ref"] = base + ref[1:]
    for word in _SCHEMA_MAPS:
        if isinstance(schema.get(word), dict):
            for k in schema[word]:
                schema[word][k] = _rebase(schema[word][k], base)
    for word in _SCHEMA_LISTS:
        if isinstance(schema.get(word), list):
            schema[word] = [_rebase(s, base) for s in schema[word]]
    for word in _SCHEMA_ONE:
        if word in schema:
            schema[word] = _rebase(schema[word], base)
    return schema


def call_text(tool_calls: list[Any]) -> str:
    """An assistant message's ``tool_calls`` (``protocol.ToolCall``) as the envelope the model writes (arguments
    parsed when they are JSON)."""
    return calls_text([(c.function.name, c.function.arguments) for c in tool_calls])


def calls_text(calls: list[tuple[str, Any]]) -> str:
    """``[(name, arguments)]`` as the envelope the model writes (arguments parsed when they are a JSON string)."""
    out = []
    for name, args in calls:
        if isinstance(args, str):
            parsed = _loads(args)
            args = parsed if parsed is not None or args.strip() == "null" else args  # else kept as the string sent
        out.append({"name": name, "arguments": args})
    return json.dumps({"tool_calls": out}, ensure_ascii=False)


def response_text(text: str, structured: bool = False) -> str:
    """An assistant's answer as the envelope the model wrote; ``structured``: the answer is JSON (a request with a
    JSON format), its value goes in as such when it parses."""
    value = _loads(text) if structured else None
    return json.dumps({"response": text if value is None else value}, ensure_ascii=False)


def tool_result_text(tool_call_id: str | None, content: str) -> str:
    return json.dumps({"tool_response": {"tool_call_id": tool_call_id, "content": content}}, ensure_ascii=False)


def parse_reply(text: str, structured: bool = False) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of a reply: OpenAI's tool_calls (ids new) for a call envelope, the answer for a response
    envelope (``structured``: its value as JSON text); a reply cut short (max_tokens) is (its answer so far, or its
    raw text when not an answer, None)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # cut short: an answer's text so far (as streamed), the calls begun (their
        stream = ContentStream(structured)  # arguments so far, as streamed), else the raw text
        answer = stream.feed(text)
        if stream.answer:
            return answer, None
        begun = partial_calls(text)
        if begun:
            return None, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                           "function": {"name": name, "arguments": args}} for name, args in begun]
        return text, None
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        return None, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                       "function": {"name": c["name"], "arguments": arguments_text(c["arguments"])}}
                      for c in value["tool_calls"]]
    if isinstance(value, dict) and len(value) == 1 and "response" in value:
        return _answer_text(value["response"], structured), None
    return text, None


def _loads(text: str) -> Any:
    """``json.loads``, None for text that is not JSON (or nests deeper than the parser's recursion allows)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _answer_text(value: Any, structured: bool) -> str:
    """An answer's value as the client gets it: a string as itself, else (and always for a JSON format) as JSON."""
    return value if isinstance(value, str) and not structured else json.dumps(value, ensure_ascii=False)


def envelope(text: str, structured: bool = False) -> tuple[str | None, list[tuple[str, Any]] | None]:
    """(answer, calls) of a whole reply in the convention: ``(answer, None)`` for ``{"response": ...}`` (its text;
    JSON text for a value that is not a string, or always when ``structured``), ``(None, [(name, arguments)])`` for
    a call envelope, ``(None, None)`` for anything else (a reply cut short, or one not in the convention)."""
    value = _loads(text) if text.lstrip().startswith("{") else None
    if not isinstance(value, dict) or len(value) != 1:
        return None, None
    if "response" in value:
        return _answer_text(value["response"], structured), None
    calls = value.get("tool_calls")
    if (isinstance(calls, list) and calls and all(isinstance(c, dict) and set(c) == {"name", "arguments"}
                                                  and isinstance(c["name"], str) for c in calls)):
        return None, [(c["name"], c["arguments"]) for c in calls]
    return None, None


def tool_result(text: str) -> tuple[str, str] | None:
    """(call_id, output) of a user turn that is a tool result in the convention (``tool_result_text``), else None."""
    if not text.startswith('{"tool_response"'):
        return None
    value = _loads(text)
    inner = value.get("tool_response") if isinstance(value, dict) and len(value) == 1 else None
    if (isinstance(inner, dict) and set(inner) == {"tool_call_id", "content"}
            and isinstance(inner["tool_call_id"], str) and isinstance(inner["content"], str)):
        return inner["tool_call_id"], inner["content"]
    return None


def call_items(message_id: str, calls: list[tuple[str, str]], status: str = "completed") -> list[dict]:
    """Responses ``function_call`` output items of one reply (``[(name, arguments text)]``); their ids and
    ``call_id``s are derived from the stored message's id (the same whenever the reply is read, and known while it
    streams: ``call_item``)."""
    return [call_item(message_id, i, name, args, status) for i, (name, args) in enumerate(calls)]


def call_item(message_id: str, i: int, name: str, arguments: str, status: str = "completed") -> dict:
    base = message_id.removeprefix("msg_")
    return {"type": "function_call", "id": f"fc_{base}_{i}", "call_id": f"call_{base}_{i}", "name": name,
            "arguments": arguments, "status": status}


def arguments_text(args: Any) -> str:
    """A call's arguments as a client gets them (``CallStream`` writes the same text as it streams)."""
    return json.dumps(args, ensure_ascii=False)


def partial_calls(text: str) -> list[tuple[str, str]]:
    """``[(name, arguments so far)]`` of the calls a reply cut short had begun (those whose name is whole)."""
    stream = CallStream()
    stream.feed(text)
    return [(name, args) for name, args in stream.calls if name is not None]


MAX_CALL_ID = 128


def input_turns(value: str | list[Any] | None, tools_on: bool = False,
                structured: bool = False) -> list[tuple[str, str]]:
    """Responses ``input`` / conversation items -> [(role, text)] (roles user | model | system), function items in
    the convention: consecutive ``function_call`` items are one model turn (their envelope), a
    ``function_call_output`` a user turn (``tool_result_text``); ``reasoning`` items are left out. ``tools_on``: an
    assistant message is rendered as the envelope the model wrote (``{"response": ...}``; ``structured``: with its
    JSON value). ValueError naming what is wrong."""
    if not isinstance(value, list):
        return input_items(value)
    out: list[tuple[str, str]] = []
    calls: list[tuple[str, Any]] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "reasoning":  # a stateless client's echo of earlier thoughts: history keeps none (Gemma 4's
            continue             # template drops them once the turn is over)
        if kind != "function_call" and calls:
            out.append(("model", calls_text(calls)))
            calls = []
        if kind == "function_call":
            name, args = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not OPENAI_NAME.fullmatch(name) or not isinstance(args, str):
                raise ValueError(f"input[{i}]: a function_call needs a function name and arguments as a string")
            _call_id(item, i)
            calls.append((name, args))
        elif kind == "function_call_output":
            try:
                output = content_text(item.get("output"))
            except ValueError as exc:
                raise ValueError(f"input[{i}].output: {exc}") from None
            out.append(("user", tool_result_text(_call_id(item, i), output)))
        else:
            role, text = input_items([item])[0]
            out.append((role, response_text(text, structured) if role == "model" and tools_on else text))
    if calls:
        out.append(("model", calls_text(calls)))
    return out


def _call_id(item: dict, i: int) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID:
        raise ValueError(f"input[{i}].call_id must be a string of 1 to {MAX_CALL_ID} characters")
    return call_id


_RESPONSE_OPEN = re.compile(r'\{\s*"response"\s*:\s*"')
_FIRST_KEY = re.compile(r'\{\s*"(.)')
_PAIR_REST = re.compile(r"(\\(u[0-9a-fA-F]{0,4})?)?")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class ContentStream:
    """Streams the ``response`` string of an auto-mode reply as it is generated: ``feed(delta)`` returns the answer
    text that became known (escapes decoded, none cut in half). Until the reply shows it is an answer (a call
    envelope, or not yet decided) it returns ""; ``answer`` tells which. ``structured`` (a request with a JSON
    format): nothing streams, the answer's JSON comes whole at the end (``parse_reply``)."""

    def __init__(self, structured: bool = False) -> None:
        self.text = ""  # the reply so far
        self.answer: bool | None = False if structured else None  # None: not decided yet
        self._at = 0  # in text: the next raw character of the answer string to decode
        self._closed = False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.answer is None:  # the envelope's first key says which: "response" or "tool_calls"
            m = _RESPONSE_OPEN.match(self.text)
            if m:
                self.answer, self._at = True, m.end()
            else:
                key = _FIRST_KEY.match(self.text)
                if key and key.group(1) != "r" or self.text and not self.text.startswith("{"):
                    self.answer = False
        if not self.answer or self._closed:
            return ""
        out = []
        raw, i = self.text, self._at
        while i < len(raw):
            ch = raw[i]
            if ch == '"':
                self._closed = True
                break
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            if i + 1 >= len(raw):
                break  # the escape's rest is still to come
            kind = raw[i + 1]
            if kind == "u":
                if i + 6 > len(raw):
                    break
                code = int(raw[i + 2:i + 6], 16)
                if 0xD800 <= code < 0xDC00:  # a surrogate pair's first half: decoded with its second
                    rest = raw[i + 6:i + 12]
                    if len(rest) < 6 and _PAIR_REST.fullmatch(rest):
                        break  # its second half may still be coming
                    try:
                        pair = json.loads(f'"{raw[i:i + 12]}"')
                    except json.JSONDecodeError:
                        pair = ""
                    if len(pair) == 1:
                        out.append(pair)
                        i += 12
                        continue
                if 0xD800 <= code < 0xE000:  # a lone half: no character (U+FFFD, as a UTF-8 decoder would)
                    code = 0xFFFD
                out.append(chr(code))
                i += 6
                continue
            out.append(_ESCAPES.get(kind, kind))
            i += 2
        self._at = i
        return "".join(out)


_BLANK = " \t\n\r"
_NUMBER = "+-.eE0123456789"
_LITERALS = ("true", "false", "null")


class _Frame:
    __slots__ = ("kind", "role", "key", "expect_key", "count", "index")

    def __init__(self, kind: str, role: str | None, index: int = -1):
        self.kind, self.role, self.index = kind, role, index  # kind "{" or "["; index: a call's
        self.key: str | None = None
        self.expect_key = kind == "{"
        self.count = 0  # an array's elements so far


class CallStream:
    """The calls of a reply in the convention as its text streams: ``feed(delta)`` returns ``(call index, name,
    arguments text)`` pieces: a call's first piece comes once its name is whole and carries the name (else None);
    the arguments come as the text ``json.dumps(arguments, ensure_ascii=False)`` gives for the whole value (its
    separators, its escapes, its numbers), piece by piece, so the pieces of a finished call add up to the
    ``arguments`` the whole reply reads as (``parse_reply``, ``call_items``; a value with a repeated key, which
    ``json.loads`` collapses, is the one exception). ``calls``: ``[name, arguments text]`` so far (the name None
    until it is whole). The text is valid JSON so far (the constraint holds the reply to the envelope)."""

    def __init__(self) -> None:
        self.calls: list[list[str | None]] = []
        self._frames: list[_Frame] = []
        self._token: str | None = None        # a number or literal being read
        self._string: str | None = None       # the role of the string being read ("key", "name", "args" or "")
        self._chars: list[str] = []           # a key's or a name's characters
        self._escape: str | None = None       # an escape being read, from its backslash
        self._high: int | None = None         # a \u high surrogate waiting for its low half
        self._capture: tuple[int, int] | None = None  # (call, depth): the arguments value being written
        self._call_index = -1                  # the call whose object, name or arguments is being read
        self._out: list[tuple[int, str | None, str]] = []

    def feed(self, delta: str) -> list[tuple[int, str | None, str]]:
        for ch in delta:
            self._char(ch)
        out, self._out = self._out, []
        merged: list[tuple[int, str | None, str]] = []
        for i, name, text in out:  # one piece per call and delta
            if merged and merged[-1][0] == i and name is None:
                merged[-1] = (i, merged[-1][1], merged[-1][2] + text)
            else:
                merged.append((i, name, text))
        return merged

    # ----------------------------------------------------------------------------------------- characters
    def _char(self, ch: str) -> None:
        if self._string is not None:
            self._string_char(ch)
            return
        if self._token is not None:
            if ch in _NUMBER or ch.isalpha():
                self._token += ch
                if self._token in _LITERALS:
                    self._scalar()
                return
            self._scalar()
        if ch in _BLANK:
            return
        if ch == '"':
            self._open_string()
        elif ch in "{[":
            role = self._value_role()
            if self._capture is not None:
                self._write(ch)
            kept = role if (role, ch) in (("root", "{"), ("calls", "["), ("call", "{")) else None
            self._frames.append(_Frame(ch, kept, self._call_index if kept == "call" else -1))
        elif ch in "}]":
            if self._frames:
                self._frames.pop()
            if self._capture is not None:
                self._write(ch)
                self._value_done()
        elif ch == ":":
            if self._frames:
                self._frames[-1].expect_key = False
            if self._capture is not None:
                self._write(": ")
        elif ch == ",":
            if self._frames and self._frames[-1].kind == "{":
                self._frames[-1].expect_key = True
            if self._capture is not None:
                self._write(", ")
        else:  # a number or a literal begins
            self._value_role()
            self._token = ch

    def _value_role(self) -> str | None:
        """Where the value that begins now stands (starting the capture of a call's arguments)."""
        if self._capture is not None:
            return "args"
        if not self._frames:
            return "root"
        f = self._frames[-1]
        if f.kind == "[":
            f.count += 1
            if f.role == "calls":
                self._call_index = f.count - 1
                return "call"
            return None
        if f.role == "root" and f.key == "tool_calls":
            return "calls"
        if f.role == "call" and f.key == "arguments":
            while len(self.calls) <= f.index:
                self.calls.append([None, ""])
            self._capture = (f.index, len(self._frames))
            return "args"
        if f.role == "call" and f.key == "name":
            self._call_index = f.index
            return "name"
        return None

    def _scalar(self) -> None:
        token, self._token = self._token, None
        if self._capture is not None:
            self._write(token if token in _LITERALS else json.dumps(json.loads(token)))
            self._value_done()

    def _value_done(self) -> None:
        if self._capture is not None and len(self._frames) == self._capture[1]:
            self._capture = None

    # ----------------------------------------------------------------------------------------- strings
    def _open_string(self) -> None:
        f = self._frames[-1] if self._frames else None
        if self._capture is None and f is not None and f.kind == "{" and f.expect_key:
            self._string = "key"
        else:
            role = self._value_role()
            self._string = role if role in ("name", "args") else ""
        self._chars = []
        if self._string == "args":
            self._write('"')

    def _string_char(self, ch: str) -> None:
        if self._escape is not None:
            self._escape += ch
            if self._escape[1] != "u":
                self._flush_high()
                self._piece(_ESCAPES.get(self._escape[1], self._escape[1]))
                self._escape = None
            elif len(self._escape) == 6:
                code, self._escape = int(self._escape[2:], 16), None
                if self._high is not None and 0xDC00 <= code < 0xE000:
                    pair, self._high = 0x10000 + ((self._high - 0xD800) << 10) + (code - 0xDC00), None
                    self._piece(chr(pair))
                    return
                self._flush_high()
                if 0xD800 <= code < 0xDC00:
                    self._high = code
                else:
                    self._piece(chr(code))
            return
        if ch == "\\":
            self._escape = ch
            return
        self._flush_high()
        if ch == '"':
            self._close_string()
        else:
            self._piece(ch)

    def _flush_high(self) -> None:
        if self._high is not None:  # a lone half: kept as the code point, as json.loads keeps it
            high, self._high = self._high, None
            self._piece(chr(high))

    def _piece(self, text: str) -> None:
        if self._string == "args":
            self._write(json.encoder.encode_basestring(text)[1:-1])
        elif self._string in ("key", "name"):
            self._chars.append(text)

    def _close_string(self) -> None:
        role, self._string = self._string, None
        text = "".join(self._chars)
        if role == "key":
            self._frames[-1].key = text
        elif role == "name":
            i = self._call_index
            while len(self.calls) <= i:
                self.calls.append([None, ""])
            self.calls[i][0] = text
            self._out.append((i, text, self.calls[i][1]))  # (arguments read before the name: none in the
            # convention, whose schema puts the name first)
        elif role == "args":
            self._write('"')
            self._value_done()

    def _write(self, text: str) -> None:
        i = self._capture[0]
        self.calls[i][1] += text
        if self.calls[i][0] is not None:  # (else they go out with the name)
            self._out.append((i, None, text))
