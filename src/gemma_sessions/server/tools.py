"""Tool (function) calling on Chat Completions for models without a tool format of their own (Gemma 1-3).

Contract: the tools go in the system prompt with the reply convention; the reply is constrained (``json_schema``) to
one JSON envelope, ``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` or, with ``tool_choice: "auto"``,
``{"response": "..."}``; the route turns it back into OpenAI's ``message.tool_calls`` (``finish_reason:
"tool_calls"``) or ``message.content``. So a call always names a given tool and its arguments always satisfy that
tool's ``parameters`` (as far as ``json_schema`` honours them; a keyword it cannot enforce is a 400). History is
rendered in the same convention: an assistant message's ``tool_calls`` as its envelope, a ``tool`` message as a user
turn ``{"tool_response": {"tool_call_id": ..., "content": ...}}``, and, while tools are on, an assistant text reply
as ``{"response": ...}`` (what the model wrote then). This is the "generic" convention llama.cpp's server uses for
models without a native tool format; ``ContentStream`` decodes the ``response`` string as it streams.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .protocol import OPENAI_NAME

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # calls one reply may make when parallel_tool_calls (OpenAI's default) is on
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: omitted, none taken


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Any  # a JSON schema (an object schema, as OpenAI's); NO_PARAMETERS when the tool gave none


def parse_tools(tools: list[Any]) -> list[Tool]:
    """OpenAI's ``tools`` -> Tool list; ValueError naming what is wrong."""
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"at most {MAX_TOOLS} tools")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}} (only function tools "
                             "are supported)")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not OPENAI_NAME.fullmatch(name):
            raise ValueError(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-'")
        if any(name == o.name for o in out):
            raise ValueError(f"tools[{i}].function.name {name!r} is given twice")
        description = f.get("description") or ""
        params = f.get("parameters", NO_PARAMETERS)
        if not isinstance(description, str) or not isinstance(params, (dict, bool)):
            raise ValueError(f"tools[{i}].function: description must be a string and parameters a JSON schema")
        out.append(Tool(name, description, params))
    return out


def chosen(tools: list[Tool], tool_choice: Any) -> tuple[str, list[Tool]]:
    """(mode, callable tools) of a ``tool_choice``: mode "none", "auto" or "required" (a named function: "required"
    with that one tool); ValueError for a choice that names nothing given."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, (tools if tool_choice != "none" else [])
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        match = [t for t in tools if t.name == name]
        if not match:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
        return "required", match
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                     "{'name': ...}}")


def system_text(tools: list[Tool], mode: str) -> str:
    """What the system prompt says about the tools and the reply convention."""
    listed = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                         for t in tools], ensure_ascii=False)
    calls = '{"tool_calls": [{"name": <tool name>, "arguments": <arguments as a JSON object>}]}'
    how = (f"Reply with one JSON object: {calls} to call tools, or {{\"response\": <your answer>}} to answer "
           "directly." if mode == "auto" else f"Reply with one JSON object calling the tools: {calls}.")
    return f"You can call these tools, described as JSON schemas:\n{listed}\n{how}"


def reply_schema(tools: list[Tool], mode: str, parallel: bool) -> dict:
    """The JSON schema of a reply: the envelope of calls to ``tools`` (each tool's parameters hoisted under
    ``$defs`` with its references rewritten), or with mode "auto" also ``{"response": string}``."""
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
        answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                  "additionalProperties": False}
        return {"$defs": defs, "anyOf": [envelope, answer]}
    return {"$defs": defs, **envelope}


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
    calls = []
    for c in tool_calls:
        args = c.function.arguments
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            pass  # kept as the string the client sent
        calls.append({"name": c.function.name, "arguments": args})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def response_text(text: str) -> str:
    return json.dumps({"response": text}, ensure_ascii=False)


def tool_result_text(tool_call_id: str | None, content: str) -> str:
    return json.dumps({"tool_response": {"tool_call_id": tool_call_id, "content": content}}, ensure_ascii=False)


def parse_reply(text: str) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of a reply: OpenAI's tool_calls (ids new) for a call envelope, the answer for a response
    envelope; a reply cut short (max_tokens) is (its answer so far, or its raw text when not an answer, None)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:  # cut short: an answer's text so far (as streamed), else the raw text
        stream = ContentStream()
        answer = stream.feed(text)
        return (answer if stream.answer else text), None
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        return None, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                      for c in value["tool_calls"]]
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return value["response"], None
    return text, None


_RESPONSE_OPEN = re.compile(r'\{\s*"response"\s*:\s*"')
_FIRST_KEY = re.compile(r'\{\s*"(.)')
_PAIR_REST = re.compile(r"(\\(u[0-9a-fA-F]{0,4})?)?")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class ContentStream:
    """Streams the ``response`` string of an auto-mode reply as it is generated: ``feed(delta)`` returns the answer
    text that became known (escapes decoded, none cut in half). Until the reply shows it is an answer (a call
    envelope, or not yet decided) it returns ""; ``answer`` tells which."""

    def __init__(self) -> None:
        self.text = ""  # the reply so far
        self.answer: bool | None = None  # None: not decided yet
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
