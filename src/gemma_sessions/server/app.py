"""The HTTP server: OpenAI Chat Completions, Responses and Conversations over sessions, plus native routes.

Contract: a thin shell over ``SessionManager`` and ``Engine``. A conversation *is* a session (``conv_<id>``): its KV
stays warm between calls and survives restarts through the store. Stateless chat completions still reuse the
prefix cache (``usage.prompt_tokens_details.cached_tokens``). With API keys configured, every conversation,
response and session belongs to the key that made it; any other key gets 404. Every error is OpenAI-shaped.
Chat Completions honours ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` and ``logprobs`` /
``top_logprobs`` (see ``SamplingParams``) and function ``tools`` (``server.tools``); Chat and Responses honour
``json_object`` and ``json_schema`` formats (``constraints``, ``json_schema``). A field that asks for what this
server does not do (tools on Responses, a schema keyword it cannot enforce) is a 400 naming it, never silently
ignored. Responses give their output's logprobs with ``include: ["message.output_text.logprobs"]``.

Hardening (what one request can and cannot do to the others):
- Bodies are read through :class:`Guard` (pure ASGI, before any route): the API key is checked before a byte of
  the body is read, and the body is counted while it streams in, whatever its transfer encoding, so no body over
  its limit (``max_body_bytes``; ``max_import_bytes`` for session imports) is ever held in memory.
- Rendering and tokenizing run on the thread pool, never on the event loop; a request's text is bounded in
  characters (``max_input_chars``) before it is tokenized, and in tokens by the context.
- Every request's output is capped by ``max_output_tokens``; a client that goes away cancels its generation,
  streaming or not. ``store: false`` responses leave no session behind.
- While draining (shutdown), new requests get 503 with Retry-After; ``/health`` answers without waiting on the
  engine loop and is 503 when the loop is dead, so a supervisor can restart the process.

NOTE: blocking work (engine waits, store commits) runs on a dedicated thread pool, never on the event loop; the pool
is large because each streaming client parks one thread on its token queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors as E
from ..constraints import JsonConstraint, json_constraint
from ..json_schema import JsonSchema, SchemaError
from ..sampling import SamplingParams, TextDeltas
from ..sessions.chat_format import chat_format
from ..sessions.conversation import render_chat
from .metrics import Metrics
from . import tools, web
from .protocol import (ChatCompletionRequest, CompletionRequest, ConversationCreate, ConversationUpdate,
                       DetokenizeRequest, ItemsCreate, ResponseRequest, SamplingFields, TokenizeRequest, error_body,
                       thinking_of)

log = logging.getLogger("gemma_sessions.server")
IMPORT_PATH = "/v1/sessions/import"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers, self.code = status, message, param, headers or {}, code


_STATUS = [(E.SessionNotFoundError, 404), (E.SessionBusyError, 409), (E.InvalidRequestError, 400),
           (E.CapacityError, 400), (E.SessionFileError, 400), (E.EngineClosedError, 503), (E.EngineBusyError, 503),
           (E.TokenizerError, 400), (E.StoreUnavailableError, 503), (E.StaleSessionError, 409),
           (E.GemmaSessionsError, 500)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask of the server (each a `serve` flag; see the README)."""

    max_body_bytes: int = 4 << 20        # any request body, counted as it streams in
    max_import_bytes: int = 256 << 20    # a session file sent to POST /v1/sessions/import (exports round-trip)
    max_output_tokens: int = 4096        # every request's max_tokens / max_output_tokens is capped to this
    max_input_chars: int | None = None   # text of one request before tokenizing (default: 8 x the context)
    max_waiting: int = 256               # queued requests before new ones get 503


def status_of(exc: BaseException) -> int:
    return next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)


class ServerState:
    def __init__(self, manager, model_name: str, api_keys: Iterable[str], limits: Limits):
        self.manager = manager
        self.engine = manager.engine
        self.tokenizer = self.engine.model.tokenizer
        try:
            fmt = chat_format(self.tokenizer)
        except E.InvalidRequestError:  # no turn markers: every chat request says so
            fmt = None
        self.thinking = fmt is not None and fmt.thinking  # the model has a thinking mode (Gemma 4)
        self.channel = None if fmt is None else fmt.channel  # its thought channel's (open, close) ids
        self.model_name = model_name
        self.keys = {key_hash(k) for k in api_keys if k}
        self.limits = limits
        self.max_input_chars = limits.max_input_chars or 8 * self.engine.max_context
        self.metrics = Metrics()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=512, thread_name_prefix="gemma-http")
        self.created = int(time.time())
        self.draining = False
        self.replica: bytes | None = None  # X-Replica on every response (create_app's replica_name)
        self.background: dict[str, _Background] = {}  # response id -> its running generation (event loop only)
        store = manager.store
        self.shared_store = store is not None and store.shared  # other processes write responses too

    async def json_format(self, fmt: tuple[str, Any] | None, param: str) -> Callable[[], JsonConstraint] | None:
        """What makes each choice's constraint for a request's format (``json_format()`` of its body; None: plain
        text). A schema is compiled once, here: 400 on what it cannot honour."""
        if fmt is None:
            return None
        schema = None
        if fmt[0] == "json_schema":
            try:
                schema = await self.run(JsonSchema, fmt[1])
            except SchemaError as exc:
                raise ApiError(400, f"json_schema: {exc}", param) from exc
        return functools.partial(json_constraint, self.engine.model, schema)

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def owner_of(self, authorization: str) -> str | None:
        """The owner (key hash) an Authorization header names; "" without keys; None when refused."""
        if not self.keys:
            return ""
        key = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
        owner = key_hash(key) if key else None
        return owner if owner in self.keys else None

    def owner(self, request: Request) -> str:
        owner = self.owner_of(request.headers.get("authorization", ""))
        if owner is None:
            raise ApiError(401, "missing or invalid API key")
        return owner

    def check_load(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica or later",
                           headers={"Retry-After": "5"})
        if self.engine.health()["waiting"] >= self.limits.max_waiting:
            raise ApiError(503, "the server is overloaded; retry shortly", headers={"Retry-After": "1"})

    def check_chars(self, texts: Iterable[str], param: str) -> None:
        n = sum(len(t) for t in texts)
        if n > self.max_input_chars:
            raise ApiError(400, f"the input has {n} characters; at most {self.max_input_chars} are accepted "
                           f"(the context is {self.engine.max_context} tokens)", param, code="context_length_exceeded")

    def check_messages(self, messages) -> None:
        """Chat messages' text is bounded (``check_chars``), and only text parts are accepted: else a 400."""
        try:
            self.check_chars([m.text() for m in messages], "messages")
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from exc

    def max_tokens(self, asked: int | None, default: int) -> int:
        return min(asked or default, self.limits.max_output_tokens)

    def reasoning(self, effort: str | None, param: str) -> bool | None:
        """The thinking switch a request's effort asks for (None: not asked). Reasoning on for a model without a
        thinking mode is a 400 naming ``param``, as OpenAI answers ``reasoning_effort`` on a non-reasoning model;
        "none" and "minimal" ask for nothing it lacks, so they pass."""
        on = thinking_of(effort)
        if on and not self.thinking:
            raise ApiError(400, f"{param}: this model has no thinking mode (use 'none' or leave it out)", param)
        return on

    def session(self, sid: str, owner: str):
        s = self.manager.get(sid)
        if s.owner != owner or not s.persistent:
            raise E.SessionNotFoundError(f"no session {sid!r}")
        return s

    def response(self, rid: str, owner: str) -> dict:
        r = self.manager.response(rid)
        if r is None or r["owner"] != owner:
            raise ApiError(404, f"no response {rid!r}", param="response_id")
        return r


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ helpers


def sampling_from(req: SamplingFields, base: SamplingParams, max_tokens: int | None) -> SamplingParams:
    changes = {k: v for k, v in dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                     min_p=req.min_p, seed=req.seed, max_tokens=max_tokens).items()
               if v is not None}
    if req.stop is not None:
        changes["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    return base.replace(**changes)


def public_metadata(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if not k.startswith("_")}


def conv_id(sid: str) -> str:
    return f"conv_{sid}"


def sid_of(cid: str) -> str:
    if not cid.startswith("conv_"):
        raise E.SessionNotFoundError(f"no conversation {cid!r}")
    return cid[5:]


def item_of(m, text: str | None = None) -> dict:
    """A stored message as a Responses ``message`` item (``text``: its text as shown, by default the stored one)."""
    role = "assistant" if m.role == "model" else "user"
    part = "output_text" if role == "assistant" else "input_text"
    content = {"type": part, "text": m.text if text is None else text,
               **({"annotations": []} if part == "output_text" else {})}
    return {"type": "message", "id": m.id, "status": "completed", "role": role, "content": [content]}


def items_of(m, tools_on: bool | None, structured: bool = False) -> list[dict]:
    """A stored message as Responses items, read in ``server.tools``' convention: a reply that called tools as its
    ``function_call`` items, an answer's envelope as its text, a tool result as a ``function_call_output``, a user
    turn without the tools' text a turn put before it. ``tools_on``: the reply was made with tools (True), without
    (False: its text as it is), or unknown (None: a reply that reads as an envelope is one; a conversation's
    listing, where a conversation that never had tools passes False). ``structured``: the request had a JSON
    format, so an answer is its JSON value's text."""
    if m.role == "user":
        text = tools.without_announcement(m.text)
        result = tools.tool_result(text)
        if result is not None:
            return [{"type": "function_call_output", "id": m.id, "call_id": result[0], "output": result[1],
                     "status": "completed"}]
        return [item_of(m, text)]
    if tools_on is False:
        return [item_of(m)]
    answer, calls = tools.envelope(m.text, structured)
    if calls:
        return tools.call_items(m.id, [(name, tools.arguments_text(args)) for name, args in calls])
    if answer is None and tools_on is not False:  # cut short: the calls begun, the answer so far, or the text
        text, begun = tools.parse_reply(m.text, structured)
        if begun:
            return tools.call_items(m.id, [(c["function"]["name"], c["function"]["arguments"]) for c in begun],
                                    "incomplete")
        if tools_on:
            answer = text
    return [item_of(m, answer)]


def tools_announced(session) -> str | None:
    """The tools' text the session's history gave last (a Responses turn's, else its system prompt's), or None."""
    for m in reversed(session.messages):
        if m.role == "user" and m.text.startswith(tools.TOOLS_HEAD):
            return tools.announced(m.text)
    return tools.announced(session.system)


def conversation_object(s) -> dict:
    return {"id": conv_id(s.id), "object": "conversation", "created_at": int(s.created_at),
            "metadata": public_metadata(s.metadata)}


def sse(event: dict, name: str | None = None) -> str:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(event, ensure_ascii=False)}\n\n"


class EngineText:
    """Text deltas of one stateless engine request (stop strings applied), for chat completions."""

    def __init__(self, engine, tokenizer, prompt: list[int], params: SamplingParams,
                 channel: tuple[int, int] | None = None, constraint=None):
        self.stream = engine.submit(prompt, params, constraint=constraint)
        self.deltas = TextDeltas(self.stream, tokenizer, params.stop, on_stop=self.stream.cancel, channel=channel)
        self.finish_reason: str | None = None  # set once next_delta returned None
        self.tokenizer = tokenizer
        self.wants_logprobs = params.logprobs is not None
        self._logprobs_sent = 0
        self.logprob_chars = 0  # characters of the tokens whose logprobs went out (Completions' text_offset)

    @property
    def n_tokens(self) -> int:
        return len(self.deltas.tokens)

    def next_delta(self) -> str | None:
        """The answer's next delta (thoughts are kept apart: ``deltas.reasoning``)."""
        while (part := self.next_part()) is not None:
            if part[0] == "content":
                return part[1]
        return None

    def next_part(self) -> tuple[str, str] | None:
        """The next ("reasoning" | "content", text), or None at the end."""
        part = self.deltas.next_part()
        if part is None and self.finish_reason is None:
            reason = self.stream.result().finish_reason  # after a stop string: once the engine took the cancel
            self.finish_reason = "stop" if self.deltas.stopped else reason
        return part

    def new_logprobs(self) -> dict | None:
        """OpenAI's ``logprobs`` object for the tokens the deltas took since the last call (None unless asked)."""
        if not self.wants_logprobs:
            return None
        end = self.n_tokens
        items = self.stream.token_logprobs(self._logprobs_sent, end)
        self._logprobs_sent = end
        return {"content": [logprob_entry(self.tokenizer, x) for x in items], "refusal": None}

    def close(self) -> None:
        if self.finish_reason is None:
            self.stream.cancel()


def logprob_entry(tokenizer, x) -> dict:
    """One ``TokenLogprob`` in OpenAI's shape (a log-probability below -9999, or -inf, is given as -9999, as
    OpenAI does: JSON has no infinities)."""
    def one(token: int, lp: float) -> dict:
        raw = tokenizer.token_bytes(token, skip_special=False)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(lp, -9999.0), "bytes": list(raw)}
    return {**one(x.token, x.logprob), "top_logprobs": [one(t, lp) for t, lp in x.top]}


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(state: ServerState, next_delta: Callable[[], str | None],
                   request: Request | None) -> list[str] | None:
    """Every text delta of a generation, or None when the client went away first (the caller cancels it); with no
    ``request`` (a background response) no one can go away."""
    gone = asyncio.ensure_future(_client_gone(request) if request is not None else asyncio.Event().wait())
    parts: list[str] = []
    try:
        while not gone.done():
            delta = await state.run(next_delta)
            if delta is None:
                return parts
            parts.append(delta)
        return None
    finally:
        gone.cancel()


async def _start_choices(state: ServerState, prompt: list[int], params: SamplingParams, n: int,
                         channel: tuple[int, int] | None,
                         constraint: Callable[[], JsonConstraint] | None = None) -> list[EngineText]:
    """``n`` generations of one prompt (choice i seeded ``seed + i`` when a seed is given; each with its own
    ``constraint()`` when one is given). They are submitted together: the engine computes the shared prompt once (the
    later ones wait for its blocks)."""
    gens: list[EngineText] = []
    try:
        for i in range(n):
            p = params if params.seed is None or i == 0 else params.replace(seed=(params.seed + i + (1 << 63)) % (
                1 << 64) - (1 << 63))
            own = await state.run(constraint) if constraint is not None else None
            gens.append(await state.run(EngineText, state.engine, state.tokenizer, prompt, p, channel, own))
    except BaseException:
        for g in gens:
            g.close()
        raise
    return gens


async def _collect_all(state: ServerState, gens: list[EngineText], request: Request) -> list[tuple] | None:
    """Every choice's (text deltas, output), its turn counted in the metrics; None when the client went away
    first. Every generation is closed after."""
    try:
        done = []
        for g in gens:
            parts = await _collect(state, g.next_delta, request)
            if parts is None:
                return None
            out = await state.run(g.stream.result)
            state.metrics.observe_turn(out.stats.prompt_tokens, out.stats.cached_tokens, g.n_tokens, out.stats.ttft_s)
            done.append((parts, out))
        return done
    finally:
        for g in gens:
            g.close()  # a client that went away cancels its generations


async def _merged_parts(state: ServerState, gens: list[EngineText]) -> AsyncIterator[tuple[int, str | None, str]]:
    """(choice, kind, delta) of every choice as they come, then (choice, None, "") as each ends; a choice's error
    is raised here."""
    if len(gens) == 1:  # the common case: no tasks
        while (part := await state.run(gens[0].next_part)) is not None:
            yield 0, part[0], part[1]
        yield 0, None, ""
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: EngineText) -> None:
        try:
            while (part := await state.run(g.next_part)) is not None:
                queue.put_nowait((i, part, None))
            queue.put_nowait((i, None, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, part, exc = await queue.get()
            if exc is not None:
                raise exc
            if part is None:
                left -= 1
                yield i, None, ""
            else:
                yield i, part[0], part[1]
    finally:
        for t in tasks:
            t.cancel()


def _total_usage(gens: list[EngineText], outs: list, reasoning: bool = True) -> dict:
    """Usage of n choices of one prompt: the prompt once (its cached tokens: the first choice's), every choice's
    generated tokens."""
    n = sum(g.n_tokens for g in gens)
    return _chat_usage(outs[0].stats, n, sum(g.deltas.reasoning_tokens for g in gens) if reasoning else 0)


def chat_prompt(tokenizer, messages, reasoning: bool = False, tools_system: str | None = None,
                structured: bool = False) -> list[int]:
    """OpenAI chat messages -> Gemma prompt ids, rendered where sessions render theirs (``render_chat``). An
    assistant message's ``reasoning_content`` is not rendered: the template drops thoughts from history. Tool calls
    and tool results are rendered in ``server.tools``' convention; ``tools_system``: the tools' part of the system
    prompt, when tools are on (then assistant text replies are rendered as the envelope the model wrote; with their
    JSON value when ``structured``: the request has a JSON format)."""
    turns = []
    for m in messages:
        if m.role == "tool":
            turns.append(("user", tools.tool_result_text(m.tool_call_id, m.text())))
        elif m.role == "assistant" and m.tool_calls:
            turns.append(("assistant", tools.call_text(m.tool_calls)))
        elif m.role == "assistant" and tools_system:
            turns.append(("assistant", tools.response_text(m.text(), structured)))
        else:
            turns.append((m.role, m.text()))
    if tools_system:
        turns.append(("system", tools_system))
    return render_chat(tokenizer, turns, reasoning)


# ------------------------------------------------------------------------------------------------ app


def create_app(manager, *, model_name: str = "gemma3-270m", api_keys: Iterable[str] = (),
               limits: Limits | None = None, on_shutdown: Callable | None = None,
               replica_name: str | None = None) -> FastAPI:
    """Build the FastAPI app over a SessionManager (its engine and store). ``replica_name``: sent as
    ``X-Replica`` on every response (errors, streams and /health too), so a client behind a balancer sees who
    served it."""
    state = ServerState(manager, model_name, api_keys, limits or Limits())
    state.replica = replica_name.encode("ascii") if replica_name else None
    app = FastAPI(title="gemma-sessions", version="0.1.0")
    app.state.gs = state

    @app.on_event("shutdown")
    async def _shutdown() -> None:
        state.draining = True
        jobs = list(state.background.values())  # background responses end here, recorded as failed
        for job in jobs:
            await state.run(job.turn.close)
        if jobs:
            await asyncio.wait([j.task for j in jobs], timeout=10)
        if on_shutdown is not None:
            await state.run(on_shutdown)
        state.pool.shutdown(wait=False)

    app.add_middleware(Guard, state=state)
    _install_errors(app)
    _install_basic_routes(app, state)
    _install_chat(app, state)
    _install_completions(app, state)
    _install_responses(app, state)
    _install_conversations(app, state)
    _install_sessions(app, state)
    web.install(app, state)  # the page at / and the JSON it reads
    return app


class Guard:
    """Pure ASGI middleware in front of every route (see the module docstring): draining, the API key before
    the body, the body's size while it streams in, request metrics, and an OpenAI-shaped 500 for a bug."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.state.replica is not None:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-replica", self.state.replica)]}
            await send(message)

        try:
            refused = await self._refuse(scope)
            if refused is None:
                body = await self._read_body(scope, receive)
                refused = body if isinstance(body, JSONResponse) else None
            if refused is not None:
                await refused(scope, receive, send_status)
            else:
                await self.app(scope, _replay(body, receive), send_status)
        except Exception:  # a bug: log it, answer in OpenAI's shape if nothing was sent yet
            log.exception("unhandled error")
            if status[0] == 500:
                await _error(500, "internal server error")(scope, receive, send_status)
        self.state.metrics.requests.labels(route=_route_label(scope["path"]), status=str(status[0])).inc()

    async def _refuse(self, scope) -> JSONResponse | None:
        path, state = scope["path"], self.state
        if not path.startswith("/v1/"):
            return None
        if state.draining:
            return _error(503, "the server is shutting down; retry later", headers={"Retry-After": "5"})
        auth = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"authorization"), "")
        if state.owner_of(auth) is None:
            return _error(401, "missing or invalid API key")
        return None

    async def _read_body(self, scope, receive) -> bytes | JSONResponse:
        limit = self.state.limits.max_import_bytes if scope["path"] == IMPORT_PATH else \
            self.state.limits.max_body_bytes
        size = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if size is not None and (not size.isdigit() or int(size) > limit):
            return _error(413 if size.isdigit() else 400, f"request body over {limit} bytes" if size.isdigit()
                          else "invalid Content-Length")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _error(400, "the client went away")
            body += message.get("body", b"")
            if len(body) > limit:
                return _error(413, f"request body over {limit} bytes")
            if not message.get("more_body", False):
                return bytes(body)


def _replay(body: bytes, receive):
    """A receive that gives the already-read body once, then whatever the client sends (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.headers, exc.code)

    @app.exception_handler(E.GemmaSessionsError)
    async def gs_error(_: Request, exc: E.GemmaSessionsError):
        status = status_of(exc)
        if status >= 500:
            log.error("request failed: %r", exc)
        code = "context_length_exceeded" if isinstance(exc, E.ContextLengthError) else None
        retry = isinstance(exc, (E.StoreUnavailableError, E.EngineClosedError, E.EngineBusyError))
        again = isinstance(exc, (E.StoreUnavailableError, E.EngineBusyError))
        return _error(status, str(exc) if status < 500 or retry else "internal server error", code=code,
                      headers={"Retry-After": "2"} if again else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = str(first.get("msg", "invalid request"))
        return _error(400, f"{loc}: {msg}" if loc else msg, loc or None)


def _route_label(path: str) -> str:
    parts = path.strip("/").split("/")
    return "/" + "/".join(p if not p.startswith(("conv_", "resp_", "msg_")) and len(p) < 32 else "{id}"
                          for p in parts[:4])


def _install_basic_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        h = state.engine.health()  # read without waiting on the engine loop: answers even mid-step
        ok = h["alive"] and not state.draining
        body = {"status": "ok" if ok else ("draining" if h["alive"] else "engine loop dead"),
                "model": state.model_name, "running": h["running"], "waiting": h["waiting"]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        stats = await state.run(state.engine.stats)
        store = state.manager.store
        body = state.metrics.render(stats, len(state.manager.loaded_sessions()),
                                    store.stats() if store is not None else None)
        return Response(body, media_type="text/plain; version=0.0.4")

    def model_object() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "gemma-sessions",
                "max_model_len": state.engine.max_context}

    @app.get("/v1/models")
    async def models(request: Request):
        state.owner(request)
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        state.owner(request)
        if model_id != state.model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist (this server serves {state.model_name!r})",
                           "model", code="model_not_found")
        return model_object()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        state.owner(request)
        if body.messages is not None:
            state.check_messages(body.messages)
            reasoning = bool(state.reasoning(body.reasoning_effort, "reasoning_effort"))
            tokens = await state.run(chat_prompt, state.tokenizer, body.messages, reasoning)
        else:
            state.check_chars([body.prompt], "prompt")
            tokens = await state.run(state.tokenizer.encode, body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": state.engine.max_context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        state.owner(request)
        vocab = state.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": await state.run(state.tokenizer.decode, body.tokens)}


def _install_chat(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        state.owner(request)
        state.check_load()
        state.check_messages(body.messages)
        refused = body.unsupported()
        if refused:
            raise ApiError(400, refused[1], refused[0])
        reasoning = bool(state.reasoning(body.reasoning_effort, "reasoning_effort"))
        mode, callable_tools = _tool_choice(body.tools, body.tool_choice)
        answer = _answer_schema(body.json_format(), callable_tools, "response_format")
        tools_system = tools.system_text(callable_tools, mode, answer) if callable_tools else None
        if tools_system:
            state.check_chars([tools_system], "tools")
        structured = answer is not None
        prompt = await state.run(chat_prompt, state.tokenizer, body.messages, reasoning, tools_system, structured)
        limit = state.engine.max_context - len(prompt)
        if limit < 1:
            raise E.ContextLengthError(f"the prompt has {len(prompt)} tokens; the context is "
                                       f"{state.engine.max_context}")
        max_tokens = min(state.max_tokens(body.max_completion_tokens or body.max_tokens, 512), limit)
        params = sampling_from(body, SamplingParams(), max_tokens).replace(**body.penalty_changes(),
                                                                           logprobs=body.logprobs_asked())
        if callable_tools:
            constraint = await state.json_format(
                ("json_schema", tools.reply_schema(callable_tools, mode, body.parallel_tool_calls, answer)), "tools")
        else:
            constraint = await state.json_format(body.json_format(), "response_format")
        gens = await _start_choices(state, prompt, params, body.n, state.channel, constraint)
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(state, gens, cid, created, usage, bool(callable_tools), structured),
                                     media_type="text/event-stream")
        done = await _collect_all(state, gens, request)
        if done is None:
            return Response(status_code=499)
        choices = []
        for i, (g, (parts, _)) in enumerate(zip(gens, done)):
            message = {"role": "assistant", "content": "".join(parts)}
            finish = _finish(g.finish_reason)
            if callable_tools:
                message["content"], calls = tools.parse_reply(message["content"], structured)
                if calls:  # (calls a reply cut short had begun: their arguments so far, as OpenAI gives them)
                    message["tool_calls"] = calls
                    finish = "length" if g.finish_reason == "length" else "tool_calls"
            if g.deltas.reasoning:  # thoughts apart from the answer, where vLLM and llama.cpp put them
                message["reasoning_content"] = g.deltas.reasoning
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": g.new_logprobs()})
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": _total_usage(gens, [out for _, out in done])}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _tool_choice(given_tools: list | None, tool_choice: Any, flat: bool = False) -> tuple[str, list[tools.Tool]]:
    """(mode, the tools a reply may call) of a request (``server.tools.chosen``; ``flat``: Responses' tool shape);
    400 naming the field."""
    try:
        given = tools.parse_tools(given_tools or [], flat)
    except ValueError as exc:
        raise ApiError(400, str(exc), "tools") from exc
    try:
        return tools.chosen(given, tool_choice)
    except ValueError as exc:
        raise ApiError(400, str(exc), "tool_choice") from exc


def _answer_schema(fmt: tuple[str, Any] | None, callable_tools: list, param: str) -> Any:
    """The schema of an answer's JSON next to tools (``tools.answer_schema``), None without tools or a JSON format;
    400 naming ``param`` for a schema nested too deep."""
    try:
        return tools.answer_schema(fmt) if callable_tools else None
    except SchemaError as exc:
        raise ApiError(400, str(exc), param) from exc


def _chat_usage(stats, n_generated: int, n_reasoning: int = 0) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": n_generated,
            "total_tokens": stats.prompt_tokens + n_generated,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": n_reasoning}}


def _chat_stream(state: ServerState, gens: list[EngineText], cid: str, created: int,
                 usage: bool, with_tools: bool = False, structured: bool = False) -> AsyncIterator[str]:
    """With tools, an answer's text streams as it is decoded from its envelope (``tools.ContentStream``) and calls
    as they are written (``tools.CallStream``: a call's id and name first, then its arguments in pieces, as
    OpenAI streams them); a ``structured`` answer (JSON, for a request with a JSON format) comes whole as the choice
    ends."""
    streams = [tools.ContentStream(structured) for _ in gens] if with_tools else None
    calls = [tools.CallStream() for _ in gens] if with_tools else None

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    def call_chunks(i: int, pieces: list[tuple[int, str | None, str]], logprobs: dict | None) -> str:
        out = []
        for k, name, text in pieces:
            call = ({"index": k, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                     "function": {"name": name, "arguments": text}} if name is not None else
                    {"index": k, "function": {"arguments": text}})
            out.append(chunk(i, {"tool_calls": [call]}, logprobs=logprobs if not out else None))
        return "".join(out)

    def part(i: int, kind: str, delta: str) -> str | None:  # thoughts as delta.reasoning_content (vLLM's)
        if streams is not None and kind == "content":
            pieces = calls[i].feed(delta)
            delta = streams[i].feed(delta)
            if pieces:
                return call_chunks(i, pieces, gens[i].new_logprobs())
            if not delta:
                return None
        return chunk(i, {"reasoning_content" if kind == "reasoning" else "content": delta},
                     logprobs=gens[i].new_logprobs())

    def end(i: int) -> str:
        finish = _finish(gens[i].finish_reason)
        if streams is None or streams[i].answer:
            return chunk(i, {}, finish, gens[i].new_logprobs())
        if any(name is not None for name, _ in calls[i].calls):  # streamed as written
            return chunk(i, {}, "length" if finish == "length" else "tool_calls", gens[i].new_logprobs())
        content, _ = tools.parse_reply(streams[i].text, structured)  # a JSON answer, or cut short
        return chunk(i, {"content": content}, logprobs=gens[i].new_logprobs()) + chunk(i, {}, finish)

    def usage_chunk(u: dict) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "choices": [], "usage": u})

    return _stream_choices(state, gens, [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(gens))],
                           part, end, usage_chunk if usage else None, reasoning=True)


async def _stream_choices(state: ServerState, gens: list[EngineText], first: list[str],
                          part: Callable[[int, str, str], str | None], end: Callable[[int], str],
                          usage_chunk: Callable[[dict], str] | None, reasoning: bool) -> AsyncIterator[str]:
    """The SSE stream of n choices: ``first`` chunks, then ``part(choice, kind, delta)`` as deltas come and
    ``end(choice)`` as each choice ends, the usage chunk when asked, ``[DONE]``. An error after the status line
    goes in the stream; a client that disconnects cancels every generation."""
    try:
        for c in first:
            yield c
        last = time.perf_counter()
        outs: list = [None] * len(gens)
        try:
            async for i, kind, delta in _merged_parts(state, gens):
                if kind is None:  # choice i ended
                    outs[i] = await state.run(gens[i].stream.result)
                    yield end(i)
                    continue
                now = time.perf_counter()
                state.metrics.itl.observe(now - last)
                last = now
                c = part(i, kind, delta)
                if c is not None:
                    yield c
        except E.GemmaSessionsError as exc:  # the status line is sent: the error goes in the stream, then [DONE]
            status = status_of(exc)
            yield sse(error_body(status, str(exc) if status < 500 else "the generation failed"))
            yield "data: [DONE]\n\n"
            return
        for g, out in zip(gens, outs):
            state.metrics.observe_turn(out.stats.prompt_tokens, out.stats.cached_tokens, g.n_tokens, out.stats.ttft_s)
        if usage_chunk is not None:
            yield usage_chunk(_total_usage(gens, outs, reasoning))
        yield "data: [DONE]\n\n"
    finally:
        for g in gens:
            g.close()


# ------------------------------------------------------------------------------------------------ completions


def _install_completions(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.owner(request)
        state.check_load()
        refused = body.unsupported()
        if refused:
            raise ApiError(400, refused[1], refused[0])
        text = body.prompt_ids_or_text()
        if isinstance(text, str):
            state.check_chars([text], "prompt")
            prompt = await state.run(state.tokenizer.encode, text, True)
        else:
            prompt = list(text)
            vocab = state.engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt")
        limit = state.engine.max_context - len(prompt)
        if limit < 1 and body.max_tokens != 0:
            raise E.ContextLengthError(f"the prompt has {len(prompt)} tokens; the context is "
                                       f"{state.engine.max_context}")
        echo = (text if isinstance(text, str) else await state.run(state.tokenizer.decode, prompt)) if body.echo else ""
        # echo with logprobs: the prompt's own (each token given those before it), scored apart from the generation
        echo_logprobs = (await state.run(_prompt_logprobs, state, prompt, body.logprobs)
                         if body.echo and body.logprobs is not None else None)
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        if body.max_tokens == 0:  # the prompt scored, nothing generated
            return _echo_only(state, body, cid, created, echo, echo_logprobs, len(prompt))
        max_tokens = min(state.max_tokens(body.max_tokens, 16), limit)  # 16: OpenAI's default for this route
        params = sampling_from(body, SamplingParams(), max_tokens).replace(**body.penalty_changes(),
                                                                           logprobs=body.logprobs)
        gens = await _start_choices(state, prompt, params, body.n, None)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_completion_stream(state, gens, cid, created, usage, echo, echo_logprobs),
                                     media_type="text/event-stream")
        done = await _collect_all(state, gens, request)
        if done is None:
            return Response(status_code=499)
        choices = []
        for i, (g, (parts, _)) in enumerate(zip(gens, done)):
            choices.append({"index": i, "text": echo + "".join(parts), "finish_reason": _finish(g.finish_reason),
                            "logprobs": _joined_logprobs(echo_logprobs, _legacy_logprobs(g, len(echo)))})
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": _total_usage(gens, [out for _, out in done], reasoning=False)}


def _prompt_logprobs(state: ServerState, prompt: list[int], top: int) -> dict:
    """The legacy logprobs object of the prompt's tokens (``Engine.score``; the first token's logprob is None):
    each token's text without control tokens, so that the texts concatenate to the echoed prompt."""
    scored = state.engine.score(prompt, top)
    tok = state.tokenizer
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    at = 0
    for token, x in zip(prompt, scored):
        piece = tok.token_bytes(token).decode("utf-8", errors="replace")  # (a control token: "")
        out["tokens"].append(piece)
        out["text_offset"].append(at)
        at += len(piece)
        if x is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        entry = logprob_entry(tok, x)
        out["token_logprobs"].append(entry["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in entry["top_logprobs"]})
    return out


def _joined_logprobs(first: dict | None, then: dict | None) -> dict | None:
    if first is None or then is None:
        return first or then
    return {k: first[k] + then[k] for k in first}


def _echo_only(state: ServerState, body: CompletionRequest, cid: str, created: int, echo: str,
               echo_logprobs: dict | None, n_prompt: int):
    """``max_tokens: 0`` with echo: each choice is the prompt (and its logprobs), finished by length."""
    choices = [{"index": i, "text": echo, "finish_reason": "length", "logprobs": echo_logprobs}
               for i in range(body.n)]
    usage = {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}
    if not body.stream:
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": usage}

    async def events() -> AsyncIterator[str]:
        for c in choices:
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                       "choices": [c]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                       "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


def _legacy_logprobs(gen: EngineText, offset: int) -> dict | None:
    """The Completions API's logprobs object for the tokens taken since the last call (None unless asked):
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (token -> logprob), ``text_offset`` (each token's start in
    the choice's text, from ``offset``)."""
    new = gen.new_logprobs()
    if new is None:
        return None
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in new["content"]:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset + gen.logprob_chars)
        gen.logprob_chars += len(e["token"])
    return out


def _completion_stream(state: ServerState, gens: list[EngineText], cid: str, created: int, usage: bool,
                       echo: str, echo_logprobs: dict | None = None) -> AsyncIterator[str]:
    def chunk(i: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    def part(i: int, kind: str, delta: str) -> str | None:
        return chunk(i, delta, logprobs=_legacy_logprobs(gens[i], len(echo))) if kind == "content" else None

    def usage_chunk(u: dict) -> str:
        return sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [], "usage": u})

    return _stream_choices(state, gens, [chunk(i, echo, logprobs=echo_logprobs) for i in range(len(gens))]
                           if echo else [], part,
                           lambda i: chunk(i, "", _finish(gens[i].finish_reason), _legacy_logprobs(gens[i], len(echo))),
                           usage_chunk if usage else None, reasoning=False)


# ------------------------------------------------------------------------------------------------ responses


def _install_responses(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/responses/input_tokens")
    async def count_input_tokens(body: ResponseRequest, request: Request):
        """The prompt tokens ``POST /v1/responses`` with this body would compute for its turn (cached or not),
        without generating or keeping anything (OpenAI's ``responses.input_tokens.count``)."""
        owner = state.owner(request)
        _, _, _, note, items, reasoning = _response_input(state, body)
        n = await state.run(_count_input, state, body, owner, items, reasoning, note)
        return {"object": "response.input_tokens", "input_tokens": n}

    @app.post("/v1/responses")
    async def create_response(body: ResponseRequest, request: Request):
        owner = state.owner(request)
        state.check_load()
        mode, callable_tools, answer, note, items, reasoning = _response_input(state, body)
        structured = answer is not None
        if callable_tools:
            constraint = await state.json_format(
                ("json_schema", tools.reply_schema(callable_tools, mode, body.parallel_tool_calls, answer)), "tools")
        else:
            constraint = await state.json_format(body.json_format(), "text")
        idempotency_key = _idempotency_key(request)
        session, new = await state.run(_target_session, state, body, owner, items, reasoning, note)
        ephemeral = new and not body.store
        wait = request.headers.get("x-gemma-wait", "1") not in ("0", "false")

        def start():
            max_tokens = state.max_tokens(body.max_output_tokens, session.sampling.max_tokens)
            sampling = sampling_from(body, session.sampling, max_tokens).replace(logprobs=body.logprobs_asked())
            text: str | Callable = items[-1][1]
            if note is not None:  # tools new to this history are told here (read once the turn holds the session)
                text = functools.partial(_told, note, text)
            return session.stream(text, sampling=sampling,
                                  wait=wait, reasoning=reasoning, idempotency_key=idempotency_key,
                                  constraint=constraint() if constraint is not None else None)

        try:
            turn = await state.run(start)
        except BaseException:
            if new:
                await state.run(_drop_session, state, session)
            raise
        base = _response_object(state, "resp_" + uuid.uuid4().hex, body, session, ephemeral)
        with_tools = bool(callable_tools)
        if body.background:
            return await _start_background(state, turn, base, session, new, owner, with_tools, structured)
        if body.stream:
            return StreamingResponse(_response_stream(state, turn, base, session, new, ephemeral, owner,
                                                      body.logprobs_asked() is not None, with_tools, structured),
                                     media_type="text/event-stream")
        finished = False
        try:
            if await _collect(state, turn.next_delta, request) is None:
                return Response(status_code=499)  # the client went away: its turn is cancelled below
            result = await state.run(_finish_response, state, base, turn, session, ephemeral, owner, None,
                                     body.logprobs_asked() is not None, with_tools, structured)
            finished = True
            return result
        finally:
            await state.run(_end_turn, state, turn, session, new and not finished, ephemeral)

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str, request: Request):
        owner = state.owner(request)
        return (await state.run(_response_record, state, rid, owner))["body"]

    @app.delete("/v1/responses/{rid}")
    async def delete_response(rid: str, request: Request):
        owner = state.owner(request)
        r = await state.run(_response_record, state, rid, owner)
        job = state.background.get(rid)
        if job is not None:  # still running here: cancelled first, so nothing records it again
            await _cancel_background(state, job)
        elif r["body"]["status"] in ("queued", "in_progress"):  # its replica would record it again as it ends
            raise ApiError(409, f"response {rid!r} is running on another replica: delete it through that one",
                           "response_id")
        await state.run(_delete_response, state, rid, r)
        return {"id": rid, "object": "response", "deleted": True}

    @app.post("/v1/responses/{rid}/cancel")
    async def cancel_response(rid: str, request: Request):
        owner = state.owner(request)
        r = await state.run(_response_record, state, rid, owner)
        if not r["body"].get("background"):
            raise ApiError(400, "only a background response can be cancelled", "response_id")
        job = state.background.get(rid)
        if job is not None:
            await _cancel_background(state, job)
            r = await state.run(state.response, rid, owner)
        elif r["body"]["status"] in ("queued", "in_progress"):  # (a store of one process knows no such record)
            raise ApiError(409, f"response {rid!r} is running on another replica: cancel it through that one",
                           "response_id")
        return r["body"]

    @app.get("/v1/responses/{rid}/input_items")
    async def list_input_items(rid: str, request: Request, limit: int = 20, order: str = "desc",
                               after: str | None = None):
        owner = state.owner(request)
        r = await state.run(state.response, rid, owner)
        return _page(await state.run(_input_items, state, r, owner), limit, order, after)


def _response_input(state: ServerState, body: ResponseRequest) -> tuple:
    """(tool mode, callable tools, answer schema, the tools' text, input turns, reasoning) of a Responses body;
    400 for what it cannot honour."""
    refused = body.unsupported()
    if refused:
        raise ApiError(400, refused[1], refused[0])
    mode, callable_tools = _tool_choice(body.tools, body.tool_choice, flat=True)
    answer = _answer_schema(body.json_format(), callable_tools, "text")
    note = tools.system_text(callable_tools, mode, answer) if callable_tools else None  # the tools' text
    try:
        items = tools.input_turns(body.input, tools_on=note is not None, structured=answer is not None)
    except ValueError as exc:
        raise ApiError(400, str(exc), "input") from exc
    if not items or items[-1][0] != "user" or not items[-1][1].strip():
        raise ApiError(400, "input must end with a non-empty user message or a function_call_output", "input")
    state.check_chars([t for _, t in items] + [body.instructions or "", note or ""], "input")
    reasoning = state.reasoning(body.reasoning.effort if body.reasoning else None, "reasoning")
    return mode, callable_tools, answer, note, items, reasoning


def _new_system(body: ResponseRequest, items: list, tools_text: str | None) -> str | None:
    """A new session's system prompt: the instructions, the input's system items, the tools' text."""
    return "\n\n".join(t for t in (body.instructions, *(t for r, t in items if r == "system"), tools_text) if t) or None


def _count_input(state: ServerState, body: ResponseRequest, owner: str, items: list, reasoning: bool | None,
                 note: str | None) -> int:
    """The prompt tokens of the turn a Responses body would run (``_target_session``'s session, its items added),
    from what each session holds now; nothing is created or kept."""
    m = state.manager
    text = items[-1][1] if note is None else functools.partial(_told, note, items[-1][1])
    before = [(r, t) for r, t in items[:-1] if r != "system"]
    if body.conversation is not None and body.previous_response_id is not None:
        raise ApiError(400, "use either conversation or previous_response_id, not both", "conversation")
    keep, made = None, False
    if body.conversation is not None:
        s = state.session(sid_of(body.conversation if isinstance(body.conversation, str) else body.conversation.id),
                          owner)
    elif body.previous_response_id is not None:
        prev = _previous(state, body.previous_response_id, owner)
        s, keep = state.session(prev["session"], owner), prev["n"]
    else:  # a session of its own, never stored, gone at once
        s, made = m.create(system=_new_system(body, items, note), owner=owner, persistent=False,
                           reasoning=reasoning), True
    try:
        return s.prompt_tokens(text, before=before, keep_messages=keep, reasoning=reasoning,
                               max_tokens=state.max_tokens(body.max_output_tokens, s.sampling.max_tokens))
    finally:
        if made:
            m.delete(s.id)


def _told(note: str, text: str, session) -> str:
    """A Responses turn's user text, told of the tools first unless its history was told of these already."""
    return text if tools_announced(session) == note else f"{note}\n\n{text}"


def _response_record(state: ServerState, rid: str, owner: str) -> dict:
    """A kept response; one left in progress by a process that is gone is recorded as failed here: in a store
    no other process writes to, any not running here (its generation ended with an earlier process); in a shared
    store (Redis), one whose replica has not said it is alive for ``BACKGROUND_STALE_S``."""
    running_here = rid in state.background  # read first: a job is registered before its record and unregistered
    r = state.response(rid, owner)          # after its final one
    body = r["body"]
    stale = not state.shared_store or r.get("alive_at") is None or time.time() - r["alive_at"] > BACKGROUND_STALE_S
    if body["status"] in ("queued", "in_progress") and not running_here and stale:
        failed = dict(body, status="failed", error={"code": "server_error", "message": INTERRUPTED})
        state.manager.remember_response(rid, owner=owner, session_id=r["session"], n_messages=r["n"], body=failed)
        r = dict(r, body=failed)
    return r


INTERRUPTED = "the server stopped before this background response finished; create it again"
# A background response's replica says it is alive this often in a shared store; a record not renewed for
# BACKGROUND_STALE_S is taken for one whose replica died (clocks of replicas are assumed within seconds).
BACKGROUND_HEARTBEAT_S = 5.0
BACKGROUND_STALE_S = 30.0


def _delete_response(state: ServerState, rid: str, r: dict) -> None:
    """Remove a response and, unless it belongs to a conversation, the session that holds its history (each
    response outside a conversation has a session of its own: ``previous_response_id`` forks one)."""
    state.manager.forget_response(rid)
    if r["body"].get("conversation") is None:
        try:
            state.manager.delete(r["session"])
        except E.SessionNotFoundError:  # gone already (its turn failed, or deleted as a session)
            pass


def _input_items(state: ServerState, r: dict, owner: str) -> list[dict]:
    """The items a response's model saw before its output (in order): its session's messages from before its
    reply, as conversation items are listed (a previous response's items too; system text and instructions are
    not items). Messages deleted from its conversation since are not listed."""
    try:
        s = state.session(r["session"], owner)
    except E.SessionNotFoundError:
        return []
    messages = s.messages
    before = r.get("context_before")
    if before is not None:
        messages = [m for m in messages if m.created_at < before]
    elif r["body"]["status"] not in ("queued", "in_progress"):  # kept before input items were listed
        messages = messages[:max(r["n"] - 1, 0)]
    return _listed_items(s, messages)


def _page(data: list[dict], limit: int, order: str, after: str | None) -> dict:
    """One page of an OpenAI list of items (``data`` in ascending order)."""
    if order not in ("asc", "desc") or not 1 <= limit <= 100:
        raise ApiError(400, "order must be asc|desc and limit 1..100", "order")
    if order == "desc":
        data = data[::-1]
    if after is not None:
        ids = [d["id"] for d in data]
        data = data[ids.index(after) + 1:] if after in ids else []
    page = data[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit}


class _Background:
    """A background response's generation (``ServerState.background``)."""

    def __init__(self, turn):
        self.turn = turn
        self.cancelled = False
        self.task: asyncio.Future | None = None
        self.generated = asyncio.Event()  # the generation ended: no heartbeat is written after this


async def _start_background(state: ServerState, turn, base: dict, session, new: bool, owner: str,
                            with_tools: bool, structured: bool) -> dict:
    """Keep the response as in progress and generate it in a task (``background: true``): the client polls
    ``GET /v1/responses/{id}``, or cancels it."""
    job = state.background[base["id"]] = _Background(turn)
    try:
        await state.run(functools.partial(state.manager.remember_response, base["id"], owner=owner,
                                          session_id=session.id, n_messages=len(session.messages), body=base,
                                          alive_at=time.time()))
    except BaseException:
        del state.background[base["id"]]
        await state.run(_end_turn, state, turn, session, new, False)
        raise
    job.task = asyncio.ensure_future(_run_background(state, job, base, session, new, owner, with_tools, structured))
    return base


async def _run_background(state: ServerState, job: _Background, base: dict, session, new: bool, owner: str,
                          with_tools: bool, structured: bool) -> None:
    finished, ended = False, None
    beat = asyncio.ensure_future(_heartbeat(state, job, base, session, owner)) if state.shared_store else None
    try:
        try:
            try:
                await _collect(state, job.turn.next_delta, None)
            finally:  # the last heartbeat is written before the final record, never after it
                job.generated.set()
                if beat is not None:
                    await beat
            await state.run(_finish_response, state, base, job.turn, session, False, owner, None, False,
                            with_tools, structured)  # (kept as completed there)
            finished = True
        except (ApiError, E.GemmaSessionsError) as exc:
            if job.cancelled:
                ended = dict(base, status="cancelled")
            else:
                message = INTERRUPTED if state.draining else str(exc)
                ended = dict(base, status="failed", error={"code": "server_error", "message": message})
        finally:  # a new session whose turn did not complete goes first: its responses would go with it
            await state.run(_end_turn, state, job.turn, session, new and not finished, False)
        if ended is not None:
            await state.run(functools.partial(state.manager.remember_response, base["id"], owner=owner,
                                              session_id=session.id, n_messages=len(session.messages), body=ended))
    except Exception:  # the store failed: the record stays in progress (a later process reports it failed)
        log.exception("background response %s", base["id"])
    finally:
        state.background.pop(base["id"], None)  # (after the record: until then, GET sees it running here)


async def _heartbeat(state: ServerState, job: _Background, base: dict, session, owner: str) -> None:
    """Renew a background response's record in a shared store every BACKGROUND_HEARTBEAT_S until its generation
    ends, so that the other replicas can tell it from one whose replica died."""
    while True:
        try:
            await asyncio.wait_for(job.generated.wait(), BACKGROUND_HEARTBEAT_S)
            return
        except asyncio.TimeoutError:
            pass
        try:
            await state.run(functools.partial(state.manager.remember_response, base["id"], owner=owner,
                                              session_id=session.id, n_messages=len(session.messages), body=base,
                                              alive_at=time.time()))
        except Exception:  # the store is away: the next beat tries again (a long outage reads as a dead replica)
            log.warning("background response %s: heartbeat not written", base["id"], exc_info=True)


async def _cancel_background(state: ServerState, job: _Background) -> None:
    """Cancel a background response here and wait until it is recorded as cancelled (or, when it finished first,
    as it finished)."""
    job.cancelled = True
    await state.run(job.turn.close)
    await asyncio.shield(job.task)


def _idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` header (Stripe's and the IETF draft's name): a turn sent again with the same
    key, e.g. after a replica died before its answer arrived, is appended at most once (a shared store answers a
    committed key with the recorded reply)."""
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
        raise ApiError(400, "Idempotency-Key: 1-255 printable characters", "Idempotency-Key")
    return key or None


def _target_session(state: ServerState, body: ResponseRequest, owner: str, items: list, reasoning: bool | None,
                    tools_text: str | None = None):
    """(session, new): the session a response continues (conversation, previous response) or a new one, with
    the request's earlier items added. A new one is dropped again when its turn does not complete. A new session's
    thinking switch is the request's (``reasoning``; a request that leaves it out continues with the session's), and
    its system prompt ends with ``tools_text`` (the tools' text, as Chat Completions renders it)."""
    m = state.manager
    if body.conversation is not None and body.previous_response_id is not None:
        raise ApiError(400, "use either conversation or previous_response_id, not both", "conversation")
    if body.conversation is not None:
        cid = body.conversation if isinstance(body.conversation, str) else body.conversation.id
        s, new = state.session(sid_of(cid), owner), False
    elif body.previous_response_id is not None:
        prev = _previous(state, body.previous_response_id, owner)
        s, new = m.fork(state.session(prev["session"], owner).id, keep_messages=prev["n"]), True
    else:
        s = m.create(system=_new_system(body, items, tools_text), metadata=body.metadata, owner=owner, persistent=body.store, reasoning=reasoning)
        new = True
    try:
        for role, text in items[:-1]:
            if role != "system":
                s.add_message(role, text)
    except BaseException:
        if new:
            _drop_session(state, s)
        raise
    return s, new


def _previous(state: ServerState, rid: str, owner: str) -> dict:
    """The kept response a request continues (``previous_response_id``): 400 unless it finished."""
    prev = state.response(rid, owner)
    if prev["body"]["status"] not in ("completed", "incomplete"):
        raise ApiError(400, f"previous response {rid!r} is {prev['body']['status']}: only a finished response can "
                       "be continued", "previous_response_id")
    return prev


def _drop_session(state: ServerState, session) -> None:
    state.manager.delete(session.id)


def _end_turn(state: ServerState, turn, session, drop: bool, ephemeral: bool) -> None:
    """After a response's turn, whatever happened: cancel it if it still runs; drop a session that was made
    for it and is not to be kept (``store: false``, or its turn did not complete)."""
    turn.close()
    if drop or ephemeral:
        state.manager.delete(session.id)


def _response_object(state: ServerState, rid: str, body: ResponseRequest, session, ephemeral: bool) -> dict:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "model": state.model_name, "output": [], "usage": None, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto", "tools": body.tools or [],
            "temperature": body.temperature, "top_p": body.top_p,
            "previous_response_id": body.previous_response_id, "store": body.store,
            "conversation": None if ephemeral or body.conversation is None else {"id": conv_id(session.id)},
            "max_output_tokens": body.max_output_tokens, "background": body.background}


def reasoning_item(item_id: str, text: str) -> dict:
    """A Responses ``reasoning`` output item holding the model's thoughts as ``reasoning_text`` (as OpenAI's API
    returns open reasoning content, and vLLM for its reasoning models): it comes before the message."""
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": "completed"}


def _finish_response(state: ServerState, base: dict, turn, session, ephemeral: bool, owner: str,
                     reasoning_id: str | None = None, logprobs: bool = False, with_tools: bool = False,
                     structured: bool = False) -> dict:
    """The final response object. ``logprobs``: its message's text part carries the output tokens' logprobs
    (``include: message.output_text.logprobs``); the response stored for ``GET /v1/responses/{id}`` does not (they
    are up to ~1.5 KB a token). ``with_tools``: the reply is read as ``server.tools``' envelope (``items_of``; an
    answer's JSON value when ``structured``)."""
    reply = turn.reply
    if reply is None or reply.finish_reason == "cancelled":
        raise ApiError(503, "the generation was cancelled (the server is shutting down)", headers={"Retry-After": "5"})
    st = reply.stats
    state.metrics.observe_turn(st.prompt_tokens, st.cached_tokens, st.generated_tokens, st.ttft_s)
    messages = session.messages
    resp = dict(base)
    resp["status"] = "incomplete" if reply.finish_reason == "length" else "completed"
    resp["incomplete_details"] = {"reason": "max_output_tokens"} if reply.finish_reason == "length" else None
    thoughts = [reasoning_item(reasoning_id or "rs_" + uuid.uuid4().hex, reply.reasoning)] if reply.reasoning else []
    out = items_of(messages[-1], with_tools, structured)
    resp["output"] = [*thoughts, *out]
    resp["output_text"] = "".join(i["content"][0]["text"] for i in out if i["type"] == "message")
    resp["usage"] = {"input_tokens": st.prompt_tokens, "input_tokens_details": {"cached_tokens": st.cached_tokens},
                     "output_tokens": st.generated_tokens,
                     "output_tokens_details": {"reasoning_tokens": st.reasoning_tokens},
                     "total_tokens": st.prompt_tokens + st.generated_tokens}
    if not ephemeral:
        state.manager.remember_response(resp["id"], owner=owner, session_id=session.id, n_messages=len(messages),
                                        body=resp, context_before=messages[-1].created_at)
    if logprobs:
        message = resp["output"][-1]
        text = dict(message["content"][0], logprobs=turn_logprobs(state, turn, 0))
        resp = dict(resp, output=[*resp["output"][:-1], dict(message, content=[text, *message["content"][1:]])])
    return resp


def turn_logprobs(state: ServerState, turn, start: int, end: int | None = None) -> list[dict]:
    """The OpenAI logprob entries of a turn's generated tokens ``[start, end)`` (to its tokens so far)."""
    end = turn.n_tokens if end is None else end
    return [logprob_entry(state.tokenizer, x) for x in turn.token_logprobs(start, end)]


async def _response_stream(state: ServerState, turn, base: dict, session, new: bool, ephemeral: bool,
                           owner: str, logprobs: bool = False, with_tools: bool = False,
                           structured: bool = False) -> AsyncIterator[str]:
    """With tools, an answer's text streams as it is decoded from its envelope (``tools.ContentStream``), and calls
    as they are written (``tools.CallStream``): each ``function_call`` item added once its name is whole, its
    arguments in deltas, done as the reply ends. Items carry their final ids from the start (the reply's message
    id is known when its turn starts)."""
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return sse({"type": kind, "sequence_number": seq - 1, **fields}, kind)

    sent = [0]  # tokens whose logprobs went out

    def new_logprobs() -> list[dict]:
        if not logprobs:
            return []
        end = turn.n_tokens
        out, sent[0] = turn_logprobs(state, turn, sent[0], end), end
        return out

    items = _StreamedItems(event, new_logprobs, turn.reply_id)
    answer = tools.ContentStream(structured) if with_tools else None  # (structured: the answer comes whole)
    written = tools.CallStream() if with_tools else None
    finished = False
    try:
        yield event("response.created", response=base)
        yield event("response.in_progress", response=base)
        if state.channel is None and not with_tools:  # a model that never thinks: the message opens at once
            for e in items.open("content"):
                yield e
        try:
            while (part := await state.run(turn.next_part)) is not None:
                if answer is not None and part[0] == "content":
                    for k, name, text in written.feed(part[1]):
                        for e in items.call_piece(k, name, text):
                            yield e
                    part = ("content", answer.feed(part[1]))
                    if not part[1]:
                        continue
                for e in items.delta(*part):
                    yield e
            final = await state.run(_finish_response, state, base, turn, session, ephemeral, owner, items.rs_id,
                                    logprobs, with_tools, structured)
        except (ApiError, E.GemmaSessionsError) as exc:  # the status line is sent: fail in the stream
            failed = dict(base, status="failed", error={"code": "server_error", "message": str(exc)})
            yield event("response.failed", response=failed)
            return
        finished = True
        last = final["output"][-1]
        if last["type"] == "function_call":
            for e in items.calls([i for i in final["output"] if i["type"] == "function_call"]):
                yield e
        else:
            streamed = "".join(items.texts["content"])
            rest = last["content"][0]["text"]
            if with_tools and rest.startswith(streamed) and len(rest) > len(streamed):  # cut short, not an answer
                for e in items.delta("content", rest[len(streamed):]):
                    yield e
            for e in items.finish(last):
                yield e
        yield event("response.completed" if final["status"] == "completed" else "response.incomplete",
                    response=final)
    finally:  # one call, submitted at once: it runs even when this generator is being cancelled
        await state.run(_end_turn, state, turn, session, new and not finished, ephemeral)


class _StreamedItems:
    """The output items of a streamed response, each opened at its first delta: the reasoning item (thoughts, when
    the model thinks) before the message or the calls, as in the final response.

    NOTE: Gemma 4 thinks before it answers; thoughts that would come after the answer began are left out of the
    stream (the final response, in ``response.completed``, has them all).
    """

    def __init__(self, event: Callable[..., str], new_logprobs: Callable[[], list[dict]] = list,
                 msg_id: str | None = None):
        self.event = event
        self.new_logprobs = new_logprobs  # the logprob entries of the tokens since the last call ([] unless asked)
        self.rs_id = "rs_" + uuid.uuid4().hex
        self.msg_id = msg_id or "msg_" + uuid.uuid4().hex  # the reply's message id (its calls' ids derive from it)
        self.opened: list[str] = []  # "reasoning" / "content" / "call K", in output order
        self.texts: dict[str, list[str]] = {"reasoning": [], "content": []}
        self.call_args: dict[int, str] = {}  # arguments streamed, by call
        self._answering = False  # the message or a call has begun: thoughts after that are left out

    def delta(self, kind: str, text: str) -> list[str]:
        if kind == "reasoning" and self._answering:
            return []
        events = [] if kind in self.opened else self.open(kind)
        self.texts[kind].append(text)
        index = self.opened.index(kind)
        if kind == "reasoning":
            return [*events, self.event("response.reasoning_text.delta", item_id=self.rs_id, output_index=index,
                                        content_index=0, delta=text)]
        return [*events, self.event("response.output_text.delta", item_id=self.msg_id, output_index=index,
                                    content_index=0, delta=text, logprobs=self.new_logprobs())]

    def open(self, kind: str) -> list[str]:
        events = self._close_reasoning() if kind == "content" else []
        self.opened.append(kind)
        index = len(self.opened) - 1
        if kind == "reasoning":
            item = {"type": "reasoning", "id": self.rs_id, "summary": [], "content": [], "status": "in_progress"}
            return [self.event("response.output_item.added", output_index=index, item=item),
                    self.event("response.content_part.added", item_id=self.rs_id, output_index=index,
                               content_index=0, part={"type": "reasoning_text", "text": ""})]
        item = {"type": "message", "id": self.msg_id, "status": "in_progress", "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        return [*events, self.event("response.output_item.added", output_index=index, item=item),
                self.event("response.content_part.added", item_id=self.msg_id, output_index=index, content_index=0,
                           part=part)]

    def _close_reasoning(self) -> list[str]:
        """The reasoning item's closing events, once, as the answer or a call begins."""
        if "reasoning" not in self.opened or self._answering:
            self._answering = True
            return []
        self._answering = True
        index, text = self.opened.index("reasoning"), "".join(self.texts["reasoning"])
        part = {"type": "reasoning_text", "text": text}
        return [self.event("response.reasoning_text.done", item_id=self.rs_id, output_index=index, content_index=0,
                           text=text),
                self.event("response.content_part.done", item_id=self.rs_id, output_index=index, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=index, item=reasoning_item(self.rs_id, text))]

    def call_piece(self, k: int, name: str | None, text: str) -> list[str]:
        """Call k's events for a piece of it as written (``tools.CallStream``): its item added with its name, then
        its arguments' deltas."""
        events = []
        if name is not None:
            events += self._close_reasoning()
            self.opened.append(f"call {k}")
            self.call_args[k] = ""
            item = tools.call_item(self.msg_id, k, name, "", "in_progress")
            events.append(self.event("response.output_item.added", output_index=len(self.opened) - 1, item=item))
        if text:
            self.call_args[k] += text
            events.append(self.event("response.function_call_arguments.delta",
                                     item_id=tools.call_item(self.msg_id, k, "", "")["id"],
                                     output_index=self.opened.index(f"call {k}"), delta=text))
        return events

    def calls(self, calls: list[dict]) -> list[str]:
        """The closing events of a reply's ``function_call`` items (the final response's): any not streamed yet
        added, whatever of their arguments did not stream, done."""
        events = self._close_reasoning()
        for k, item in enumerate(calls):
            if f"call {k}" not in self.opened:
                events += self.call_piece(k, item["name"], "")
            sent, index = self.call_args[k], self.opened.index(f"call {k}")
            if item["arguments"] != sent and item["arguments"].startswith(sent):
                events += self.call_piece(k, None, item["arguments"][len(sent):])
            events += [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  arguments=item["arguments"]),
                       self.event("response.output_item.done", output_index=index, item=item)]
        return events

    def finish(self, done_item: dict) -> list[str]:
        """The closing events, the message's last (``done_item``: the final response's message item)."""
        events = [] if "content" in self.opened else self.open("content")  # an empty answer is still a message
        index, full = self.opened.index("content"), "".join(self.texts["content"])
        return [*events,
                self.event("response.output_text.done", item_id=done_item["id"], output_index=index, content_index=0,
                           text=full, logprobs=done_item["content"][0].get("logprobs", [])),
                self.event("response.content_part.done", item_id=done_item["id"], output_index=index,
                           content_index=0, part={"type": "output_text", "text": full, "annotations": []}),
                self.event("response.output_item.done", output_index=index, item=done_item)]


# ------------------------------------------------------------------------------------------------ conversations


def _install_conversations(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/conversations")
    async def create_conversation(body: ConversationCreate, request: Request):
        owner = state.owner(request)
        try:
            items = tools.input_turns(body.items or [])
        except ValueError as exc:
            raise ApiError(400, str(exc), "items") from exc
        state.check_chars([t for _, t in items], "items")
        system = "\n\n".join(t for r, t in items if r == "system") or None

        def make():
            s = state.manager.create(system=system, metadata=body.metadata, owner=owner)
            try:
                for role, text in items:
                    if role != "system":
                        s.add_message(role, text)
            except BaseException:
                state.manager.delete(s.id)
                raise
            return s

        return conversation_object(await state.run(make))

    @app.get("/v1/conversations/{cid}")
    async def get_conversation(cid: str, request: Request):
        return conversation_object(await state.run(state.session, sid_of(cid), state.owner(request)))

    @app.post("/v1/conversations/{cid}")
    async def update_conversation(cid: str, body: ConversationUpdate, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        return conversation_object(await state.run(state.manager.update_metadata, s.id, body.metadata))

    @app.delete("/v1/conversations/{cid}")
    async def delete_conversation(cid: str, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        await state.run(state.manager.delete, s.id)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    @app.get("/v1/conversations/{cid}/items")
    async def list_items(cid: str, request: Request, limit: int = 20, order: str = "desc",
                         after: str | None = None):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        return _page(await state.run(_listed_items, s), limit, order, after)

    @app.post("/v1/conversations/{cid}/items")
    async def add_items(cid: str, body: ItemsCreate, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        try:
            items = tools.input_turns(body.items)
        except ValueError as exc:
            raise ApiError(400, str(exc), "items") from exc
        if any(r == "system" for r, _ in items):
            raise ApiError(400, "system items can only open a conversation", "items")
        state.check_chars([t for _, t in items], "items")
        added = [await state.run(s.add_message, role, text) for role, text in items]
        data = await state.run(_listed_items, s, added)
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}  # (reasoning items add nothing)

    @app.get("/v1/conversations/{cid}/items/{item_id}")
    async def get_item(cid: str, item_id: str, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        for item in await state.run(_listed_items, s):
            if item["id"] == item_id:
                return item
        raise E.SessionNotFoundError(f"no item {item_id!r} in conversation {cid}")

    @app.delete("/v1/conversations/{cid}/items/{item_id}")
    async def delete_item(cid: str, item_id: str, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        await state.run(s.remove_message, await state.run(_message_of_item, s, item_id))
        return conversation_object(s)


def _message_of_item(s, item_id: str) -> str:
    """The id of the stored message an item id names: a ``function_call`` item's is its reply's (deleting one call
    deletes the reply, all its calls)."""
    if item_id.startswith("fc_"):
        for m in s.messages:
            if m.role == "model" and any(i["id"] == item_id for i in items_of(m, None)):
                return m.id
    return item_id


def _listed_items(s, messages: list | None = None) -> list[dict]:
    """A conversation's messages (by default all) as items; replies are read as tool envelopes (``items_of``) only
    in a conversation that was told of tools."""
    tools_on = None if tools_announced(s) else False
    return [i for m in (s.messages if messages is None else messages) for i in items_of(m, tools_on)]


# ------------------------------------------------------------------------------------------------ sessions


def _session_view(s, with_messages: bool = False) -> dict:
    view = {"id": s.id, "object": "session", "conversation_id": conv_id(s.id), "created_at": s.created_at,
            "system": s.system, "metadata": public_metadata(s.metadata), "busy": s.busy, "stats": s.stats,
            "last_used_at": max([s.created_at, *(m.created_at for m in s.messages)])}
    if with_messages:
        view["messages"] = [{"id": m.id, "role": m.role, "text": m.text, "created_at": m.created_at,
                             "tokens": m.token_count} for m in s.messages]
    return view


def _install_sessions(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/sessions")
    async def list_sessions(request: Request, limit: int = 20, after: str | None = None, order: str = "asc"):
        """The caller's sessions, one page at a time (OpenAI's list shape): ``limit`` 1..100, ``after`` a session id
        (the page after it), ``order`` by (created_at, id), ``asc`` by default (oldest first, as before paging)."""
        owner = state.owner(request)
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit must be in 1..100", "limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be asc or desc", "order")

        def views():
            page = state.manager.page(owner, limit=limit, after=after, order=order)
            return [_session_view(s) for s in page.sessions], page.has_more

        try:
            data, has_more = await state.run(views)
        except E.InvalidRequestError as exc:  # the only one left: an unknown cursor (the same for another key's)
            raise ApiError(400, str(exc), "after") from exc
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str, request: Request):
        s = await state.run(state.session, sid, state.owner(request))
        return await state.run(_session_view, s, True)

    @app.post("/v1/sessions/{sid}/fork")
    async def fork_session(sid: str, request: Request, messages: int | None = None):
        """Fork a session; ``?messages=N`` keeps only its first N messages (fork at a turn)."""
        s = await state.run(state.session, sid, state.owner(request))
        child = await state.run(lambda: state.manager.fork(s.id, keep_messages=messages))
        return await state.run(_session_view, child)

    @app.get("/v1/sessions/{sid}/export")
    async def export_session(sid: str, request: Request, quantize: bool = False, compress: bool = False):
        s = await state.run(state.session, sid, state.owner(request))
        data = await state.run(lambda: state.manager.export_bytes(s.id, quantize=quantize, compress=compress))
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{s.id}.gsession"'})

    @app.post(IMPORT_PATH)
    async def import_session(request: Request, history_only: bool = False):
        """Import a session file (the body, raw bytes; at most ``max_import_bytes``); the caller owns it."""
        owner = state.owner(request)
        data = await request.body()  # Guard read it already, within its limit
        s = await state.run(lambda: state.manager.import_bytes(data, history_only=history_only, new_id=True,
                                                                owner=owner, max_bytes=state.limits.max_import_bytes))
        return await state.run(_session_view, s)
