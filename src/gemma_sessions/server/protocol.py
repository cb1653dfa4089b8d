"""Request schemas of the HTTP API (pydantic) and OpenAI-shaped error bodies.

Contract: every request body is validated here before any work starts; unknown fields are ignored (clients send
more than we use), but a known field that asks for what this server does not do (tools, JSON schemas:
``unsupported()``) is refused by the route rather than ignored; wrong types and values are 400s in OpenAI's error
shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from ..sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def check_strings(value: Any) -> None:
    """ValueError if any string in a parsed JSON value (keys too) is not valid Unicode (a lone surrogate)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (it has a lone surrogate)") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


class _Body(_Lenient):
    """A request body: refused as a whole when any string in it is not valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        check_strings(data)
        return data


# choices one request may ask for (n): each is a generation of its own; the prompt is computed once
MAX_CHOICES = 16
# OpenAI's metadata: at most 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                          Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)]
# Seeds are int64, as in OpenAI's API.
Seed = Annotated[int, Field(ge=-(1 << 63), lt=1 << 63)]
# OpenAI's reasoning efforts. Gemma 4's thinking is a switch: "none" and "minimal" turn it off, any other effort on
# (vLLM and llama.cpp map Gemma 4's enable_thinking the same way); leaving it out keeps the default (off).
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
EFFORTS_OFF = ("none", "minimal")


def thinking_of(effort: str | None) -> bool | None:
    """An effort -> the thinking switch: None (not asked), False ("none", "minimal") or True."""
    return None if effort is None else effort not in EFFORTS_OFF


class ToolCallFunction(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; an object is taken as it is


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=64)  # an assistant's calls (server.tools)
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        return content_text(self.content)


def content_text(content: Any) -> str:
    """Text of an OpenAI content field: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of text parts")
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
            raise ValueError("only text content parts are supported")
        text = part.get("text", "")
        if not isinstance(text, str):
            raise ValueError("a text part's text must be a string")
        parts.append(text)
    return "".join(parts)


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Body):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and (len(v) > 4 or not all(isinstance(s, str) and s for s in v)):
            raise ValueError("stop: at most 4 non-empty strings")
        return v


class PenaltyFields(SamplingFields):
    """Chat Completions' and Completions' fields beyond the sampling filters (see ``SamplingParams``)."""

    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit() or len(key) > 9:
                raise ValueError("logit_bias keys must be token ids (non-negative integers as strings)")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return v

    def penalty_changes(self) -> dict:
        """SamplingParams fields: the penalties and the bias."""
        return dict(presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                    logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))


class ChatCompletionRequest(PenaltyFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    reasoning_effort: Effort | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None  # function tools (server.tools; checked by the route)
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    # refused unless they ask for nothing (unsupported(): a reply that ignored them would mislead the client)
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def json_format(self) -> tuple[str, Any] | None:
        """("json_object", None) or ("json_schema", schema) when response_format constrains the reply, else None."""
        return _json_format(self.response_format, (self.response_format or {}).get("json_schema"))

    def logprobs_asked(self) -> int | None:
        """SamplingParams.logprobs: None, or how many alternatives each token reports."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a field that asks for what this server does not do, else None."""
        if self.functions or self.function_call not in (None, "none"):
            return "functions", "the deprecated functions / function_call are not supported: send them as tools"
        bad = _bad_format(self.response_format, (self.response_format or {}).get("json_schema"),
                          "response_format.json_schema")
        if bad:
            return "response_format", bad
        if any(m != "text" for m in self.modalities or ()) or self.audio is not None:
            return "modalities", "this server answers in text only"
        if self.web_search_options is not None:
            return "web_search_options", "this server does not search the web"
        return None


class CompletionRequest(PenaltyFields):
    """The legacy Completions API: a raw prompt (``<bos>`` first, no chat template) continued."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]  # (a list of one token list: lm-eval's tokenized batch)
    max_tokens: int | None = Field(default=None, ge=0)  # 0: only with echo (score the prompt, generate nothing)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(default=None, ge=1, le=1)  # (n best of more: not supported)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)) and len(v) != 1:
            raise ValueError("one prompt per request (send several requests: the server batches them)")
        if isinstance(v, list) and (not v or isinstance(v[0], list) and not v[0]):
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _zero_tokens_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo (the prompt is all the reply)")
        return self

    def prompt_ids_or_text(self) -> str | list[int]:
        """The one prompt: its text, or its token ids."""
        p = self.prompt
        return p[0] if isinstance(p, list) and isinstance(p[0], (str, list)) else p

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server"
        return None


def _format_type(fmt: Any) -> Any:
    """The ``type`` of an OpenAI format object (``response_format``, ``text.format``); "text" when absent."""
    return fmt.get("type", "text") if isinstance(fmt, dict) else ("text" if fmt is None else fmt)


OPENAI_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # a schema's or a function's name, as OpenAI checks it


def _bad_format(fmt: Any, spec: Any, where: str) -> str | None:
    """Why a format object (and its json_schema ``spec``: Chat's ``response_format.json_schema``, Responses'
    ``text.format`` itself) cannot be honoured, else None. The schema itself is compiled by the route."""
    kind = _format_type(fmt)
    if kind not in ("text", "json_object", "json_schema"):
        return f"format {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'"
    if kind != "json_schema":
        return None
    if not isinstance(spec, dict):
        return f"{where} must be an object with a 'name' and a 'schema'"
    if not isinstance(spec.get("name"), str) or not OPENAI_NAME.fullmatch(spec["name"]):
        return f"{where}.name must be 1 to 64 letters, digits, '_' or '-'"
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        return f"{where}.strict must be a boolean"
    if not isinstance(spec.get("schema", True), (dict, bool)):
        return f"{where}.schema must be a JSON schema (an object)"
    return None


def _json_format(fmt: Any, spec: Any) -> tuple[str, Any] | None:
    kind = _format_type(fmt)
    if kind == "json_object":
        return kind, None
    if kind == "json_schema":  # no schema: any JSON text
        return kind, spec.get("schema", True)
    return None


class TokenizeRequest(_Body):
    """``/tokenize`` (vLLM's shape): a raw prompt, or chat messages rendered as the chat route renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True  # a prompt's <bos> (chat messages always start with it, as the chat route's)
    reasoning_effort: Effort | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


class Reasoning(_Lenient):
    effort: Effort | None = None  # "summary" and the rest are accepted and ignored


class ConversationRef(_Lenient):
    id: str


OUTPUT_LOGPROBS = "message.output_text.logprobs"  # Responses' include value for the output tokens' logprobs


class ResponseRequest(SamplingFields):
    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    conversation: str | ConversationRef | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    background: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    metadata: Metadata | None = None
    reasoning: Reasoning | None = None
    # checked by unsupported(); function tools (server.tools), text.format (json_format()) and logprobs
    # (logprobs_asked()) served
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    include: list[str] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a field that asks for what this server does not do, else None."""
        fmt = (self.text or {}).get("format")
        bad = _bad_format(fmt, fmt, "text.format")
        if bad:
            return "text", bad
        other = [i for i in self.include or () if "logprobs" in i and i != OUTPUT_LOGPROBS]
        if other:
            return "include", f"include {other[0]!r} is not supported (logprobs: {OUTPUT_LOGPROBS!r})"
        if self.tools and self.tool_choice != "none" and self.logprobs_asked() is not None:  # (server.tools' envelope)
            return "include", "output logprobs are not given while tools are on (tool_choice 'none' ends that)"
        if self.background and not self.store:
            return "background", "a background response is kept until it is read: it needs store: true"
        if self.background and self.stream:
            return "stream", "a background response is not streamed here: poll GET /v1/responses/{id}"
        if self.background and self.logprobs_asked() is not None:
            return "include", "a background response keeps no logprobs (the kept response has none)"
        return None

    def logprobs_asked(self) -> int | None:
        """SamplingParams.logprobs: how many alternatives each output token reports when ``include`` asks for
        the output's logprobs (``top_logprobs``, 0 when absent), else None."""
        return (self.top_logprobs or 0) if OUTPUT_LOGPROBS in (self.include or ()) else None

    def json_format(self) -> tuple[str, Any] | None:
        """("json_object", None) or ("json_schema", schema) when text.format constrains the reply, else None."""
        fmt = (self.text or {}).get("format")
        return _json_format(fmt, fmt)


class ConversationCreate(_Body):
    items: list[dict[str, Any]] | None = Field(default=None, max_length=20)
    metadata: Metadata | None = None


class ConversationUpdate(_Body):
    metadata: Metadata


class ItemsCreate(_Body):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=20)


def input_items(value: str | list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """Responses ``input`` / conversation items -> [(role, text)] with roles user | model | system."""
    if value is None:
        return []
    if isinstance(value, str):
        return [("user", value)]
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise ValueError("input items must be objects")
        kind = item.get("type", "message")
        if kind != "message":
            raise ValueError(f"input item type {kind!r} is not supported")
        role = item.get("role")
        roles = {"user": "user", "assistant": "model", "system": "system", "developer": "system"}
        if role not in roles:
            raise ValueError(f"unknown role {role!r}")
        out.append((roles[role], content_text(item.get("content"))))
    return out
