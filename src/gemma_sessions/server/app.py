"""The HTTP server: OpenAI Chat Completions, Responses and Conversations over sessions, plus native routes.

Contract: a thin shell over ``SessionManager`` and ``Engine``. A conversation *is* a session (``conv_<id>``): its KV
stays warm between calls and survives restarts through the store. Stateless chat completions still reuse the
prefix cache (``usage.prompt_tokens_details.cached_tokens``). With API keys configured, every conversation,
response and session belongs to the key that made it; any other key gets 404. Every error is OpenAI-shaped.

NOTE: blocking work (engine waits, store commits) runs on a dedicated thread pool, never on the event loop; the pool
is large because each streaming client parks one thread on its token queue.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import errors as E
from ..sampling import SamplingParams, TextStream
from ..sessions.conversation import generation_prompt, render_turn
from .metrics import Metrics
from .protocol import (ChatCompletionRequest, ConversationCreate, ConversationUpdate, ItemsCreate,
                       ResponseRequest, SamplingFields, error_body, input_items)

log = logging.getLogger("gemma_sessions.server")
OWNER_KEY = "_owner"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


_STATUS = [(E.SessionNotFoundError, 404), (E.SessionBusyError, 409), (E.InvalidRequestError, 400),
           (E.CapacityError, 400), (E.SessionFileError, 400), (E.EngineClosedError, 503),
           (E.TokenizerError, 400), (E.GemmaSessionsError, 500)]


def status_of(exc: BaseException) -> int:
    return next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)


class ServerState:
    def __init__(self, manager, model_name: str, api_keys: Iterable[str], max_waiting: int):
        self.manager = manager
        self.engine = manager.engine
        self.tokenizer = self.engine.model.tokenizer
        self.model_name = model_name
        self.keys = {hashlib.sha256(k.encode()).hexdigest()[:16] for k in api_keys if k}
        self.max_waiting = max_waiting
        self.metrics = Metrics()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=512, thread_name_prefix="gemma-http")
        self.responses: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.responses_lock = threading.Lock()
        self.created = int(time.time())

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def owner(self, request: Request) -> str:
        if not self.keys:
            return ""
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        owner = hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""
        if owner not in self.keys:
            raise ApiError(401, "missing or invalid API key" if key else "missing API key (Authorization: Bearer)")
        return owner

    def check_load(self) -> None:
        if len(self.engine.scheduler.waiting) >= self.max_waiting:
            raise ApiError(503, "the server is overloaded; retry shortly", headers={"Retry-After": "1"})

    def session(self, sid: str, owner: str):
        s = self.manager.get(sid)
        if s.metadata.get(OWNER_KEY, "") != owner:
            raise E.SessionNotFoundError(f"no session {sid!r}")
        return s

    def remember_response(self, resp: dict, owner: str, session_id: str, n_messages: int) -> None:
        with self.responses_lock:
            self.responses[resp["id"]] = {"body": resp, "owner": owner, "session": session_id, "n": n_messages}
            while len(self.responses) > 10_000:
                self.responses.popitem(last=False)

    def response(self, rid: str, owner: str) -> dict:
        with self.responses_lock:
            r = self.responses.get(rid)
        if r is None or r["owner"] != owner:
            raise ApiError(404, f"no response {rid!r}", param="response_id")
        return r


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


def item_of(m) -> dict:
    role = "assistant" if m.role == "model" else "user"
    part = "output_text" if role == "assistant" else "input_text"
    content = {"type": part, "text": m.text, **({"annotations": []} if part == "output_text" else {})}
    return {"type": "message", "id": m.id, "status": "completed", "role": role, "content": [content]}


def conversation_object(s) -> dict:
    return {"id": conv_id(s.id), "object": "conversation", "created_at": int(s.created_at),
            "metadata": public_metadata(s.metadata)}


def sse(event: dict, name: str | None = None) -> str:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(event, ensure_ascii=False)}\n\n"


class EngineText:
    """Text deltas of one stateless engine request (stop strings applied), for chat completions."""

    def __init__(self, engine, tokenizer, prompt: list[int], params: SamplingParams):
        self.stream = engine.submit(prompt, params)
        self._iter = iter(self.stream)
        self.text = TextStream(tokenizer, params.stop)
        self.finish_reason: str | None = None
        self.n_tokens = 0

    def next_delta(self) -> str | None:
        while self.finish_reason is None:
            try:
                token = next(self._iter)
            except StopIteration:
                self.finish_reason = self.stream.result().finish_reason
                return self.text.finish() or None
            self.n_tokens += 1
            delta = self.text.feed(token)
            if self.text.stopped:
                self.stream.cancel()
                self.stream.result()
                self.finish_reason = "stop"
                return delta or None
            if delta:
                return delta
        return None

    def close(self) -> None:
        if self.finish_reason is None:
            self.stream.cancel()


def render_chat(tokenizer, messages) -> list[int]:
    """OpenAI chat messages -> Gemma prompt ids (system/developer text goes to the first user turn)."""
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer"))
    ids = [tokenizer.bos_id]
    first_user = True
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns:
        raise E.InvalidRequestError("messages need at least one user message")
    for m in turns:
        text = m.text()
        if m.role == "user" and first_user and system:
            text = f"{system}\n\n{text}"
        first_user = first_user and m.role != "user"
        ids += render_turn(tokenizer, "user" if m.role == "user" else "model", text)
    return ids + generation_prompt(tokenizer)


# ------------------------------------------------------------------------------------------------ app


def create_app(manager, *, model_name: str = "gemma3-270m", api_keys: Iterable[str] = (),
               max_body_bytes: int = 4 << 20, max_waiting: int = 256, on_shutdown: Callable | None = None) -> FastAPI:
    """Build the FastAPI app over a SessionManager (its engine and store)."""
    state = ServerState(manager, model_name, api_keys, max_waiting)
    app = FastAPI(title="gemma-sessions", version="0.1.0")
    app.state.gs = state

    @app.on_event("shutdown")
    async def _shutdown() -> None:
        if on_shutdown is not None:
            await state.run(on_shutdown)
        state.pool.shutdown(wait=False)

    _install_errors(app, state, max_body_bytes)
    _install_basic_routes(app, state)
    _install_chat(app, state)
    _install_responses(app, state)
    _install_conversations(app, state)
    _install_sessions(app, state)
    return app


def _install_errors(app: FastAPI, state: ServerState, max_body_bytes: int) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        route = request.url.path
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            resp = JSONResponse(error_body(413, f"request body over {max_body_bytes} bytes"), status_code=413)
        else:
            try:
                resp = await call_next(request)
            except Exception:  # a bug: log it, answer in OpenAI's shape
                log.exception("unhandled error")
                resp = JSONResponse(error_body(500, "internal server error"), status_code=500)
        state.metrics.requests.labels(route=_route_label(route), status=str(resp.status_code)).inc()
        return resp

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(E.GemmaSessionsError)
    async def gs_error(_: Request, exc: E.GemmaSessionsError):
        status = status_of(exc)
        return JSONResponse(error_body(status, str(exc)), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return JSONResponse(error_body(400, f"{loc}: {msg}" if loc else msg, loc or None), status_code=400)


def _route_label(path: str) -> str:
    parts = path.strip("/").split("/")
    return "/" + "/".join(p if not p.startswith(("conv_", "resp_", "msg_")) and len(p) < 32 else "{id}"
                          for p in parts[:4])


def _install_basic_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        stats = await state.run(state.engine.stats)
        return {"status": "ok", "model": state.model_name, "running": stats["running"],
                "waiting": stats["waiting"]}

    @app.get("/metrics")
    async def metrics():
        stats = await state.run(state.engine.stats)
        body = state.metrics.render(stats, len(state.manager.loaded_sessions()))
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        state.owner(request)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                             "owned_by": "gemma-sessions"}]}


def _install_chat(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        state.owner(request)
        state.check_load()
        try:
            prompt = render_chat(state.tokenizer, body.messages)
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from exc
        limit = state.engine.max_context - len(prompt)
        if limit < 1:
            raise E.ContextLengthError(f"the prompt has {len(prompt)} tokens; the context is "
                                       f"{state.engine.max_context}")
        max_tokens = min(body.max_completion_tokens or body.max_tokens or 512, limit)
        params = sampling_from(body, SamplingParams(), max_tokens)
        gen = await state.run(EngineText, state.engine, state.tokenizer, prompt, params)
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(state, gen, cid, created, usage, request),
                                     media_type="text/event-stream")
        try:
            parts = []
            while (delta := await state.run(gen.next_delta)) is not None:
                parts.append(delta)
        finally:
            gen.close()
        out = gen.stream.result()
        state.metrics.observe_turn(out.stats.prompt_tokens, out.stats.cached_tokens, gen.n_tokens, out.stats.ttft_s)
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "finish_reason": _finish(gen.finish_reason), "logprobs": None}],
                "usage": _chat_usage(out.stats, gen.n_tokens)}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _chat_usage(stats, n_generated: int) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": n_generated,
            "total_tokens": stats.prompt_tokens + n_generated,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


async def _chat_stream(state: ServerState, gen: EngineText, cid: str, created: int, usage: bool,
                       request: Request) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        last = time.perf_counter()
        while (delta := await state.run(gen.next_delta)) is not None:
            now = time.perf_counter()
            state.metrics.itl.observe(now - last)
            last = now
            yield chunk({"content": delta})
        yield chunk({}, _finish(gen.finish_reason))
        out = await state.run(gen.stream.result)
        state.metrics.observe_turn(out.stats.prompt_tokens, out.stats.cached_tokens, gen.n_tokens, out.stats.ttft_s)
        if usage:
            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                       "choices": [], "usage": _chat_usage(out.stats, gen.n_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        gen.close()  # a client that disconnected cancels its generation


# ------------------------------------------------------------------------------------------------ responses


def _install_responses(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/responses")
    async def create_response(body: ResponseRequest, request: Request):
        owner = state.owner(request)
        state.check_load()
        try:
            items = input_items(body.input)
        except ValueError as exc:
            raise ApiError(400, str(exc), "input") from exc
        if not items or items[-1][0] != "user" or not items[-1][1].strip():
            raise ApiError(400, "input must end with a non-empty user message", "input")
        session, ephemeral = await state.run(_target_session, state, body, owner, items)
        params = sampling_from(body, session.sampling, body.max_output_tokens)
        wait = request.headers.get("x-gemma-wait", "1") not in ("0", "false")
        turn = await state.run(lambda: session.stream(items[-1][1], sampling=params, wait=wait))
        rid = "resp_" + uuid.uuid4().hex
        base = _response_object(state, rid, body, session, ephemeral)
        if body.stream:
            return StreamingResponse(_response_stream(state, turn, base, session, ephemeral, owner),
                                     media_type="text/event-stream")
        try:
            while await state.run(turn.next_delta) is not None:
                pass
        finally:
            await state.run(turn.close)
        return await state.run(_finish_response, state, base, turn, session, ephemeral, owner)


    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str, request: Request):
        return state.response(rid, state.owner(request))["body"]


def _target_session(state: ServerState, body: ResponseRequest, owner: str, items: list):
    """The session a response continues (conversation, previous response) or a new one; adds earlier items."""
    m = state.manager
    ephemeral = False
    if body.conversation is not None and body.previous_response_id is not None:
        raise ApiError(400, "use either conversation or previous_response_id, not both", "conversation")
    if body.conversation is not None:
        cid = body.conversation if isinstance(body.conversation, str) else body.conversation.get("id", "")
        s = state.session(sid_of(cid), owner)
    elif body.previous_response_id is not None:
        prev = state.response(body.previous_response_id, owner)
        s = state.session(prev["session"], owner)
        if len(s.messages) != prev["n"]:  # the session moved on: branch from that point
            s = m.fork(s.id, metadata={OWNER_KEY: owner})
            for msg in s.messages[prev["n"]:]:
                s.remove_message(msg.id)
    else:
        system = body.instructions
        systems = [t for r, t in items if r == "system"]
        if systems:
            system = "\n\n".join(([system] if system else []) + systems)
        meta = {OWNER_KEY: owner, **(body.metadata or {})}
        s = m.create(system=system, metadata=meta)
        ephemeral = not body.store
    for role, text in items[:-1]:
        if role != "system":
            s.add_message(role, text)
    return s, ephemeral


def _response_object(state: ServerState, rid: str, body: ResponseRequest, session, ephemeral: bool) -> dict:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "model": state.model_name, "output": [], "usage": None, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "metadata": body.metadata or {}, "parallel_tool_calls": False,
            "tool_choice": "auto", "tools": [], "temperature": body.temperature, "top_p": body.top_p,
            "previous_response_id": body.previous_response_id, "store": body.store,
            "conversation": None if ephemeral or body.conversation is None else {"id": conv_id(session.id)},
            "max_output_tokens": body.max_output_tokens}


def _finish_response(state: ServerState, base: dict, turn, session, ephemeral: bool, owner: str) -> dict:
    reply = turn.reply
    if reply is None or reply.finish_reason == "cancelled":
        raise ApiError(500, "the generation was cancelled")
    st = reply.stats
    state.metrics.observe_turn(st.prompt_tokens, st.cached_tokens, st.generated_tokens, st.ttft_s)
    msg = session.messages[-1]
    resp = dict(base)
    resp["status"] = "incomplete" if reply.finish_reason == "length" else "completed"
    resp["incomplete_details"] = {"reason": "max_output_tokens"} if reply.finish_reason == "length" else None
    resp["output"] = [item_of(msg)]
    resp["output_text"] = reply.text
    resp["usage"] = {"input_tokens": st.prompt_tokens, "input_tokens_details": {"cached_tokens": st.cached_tokens},
                     "output_tokens": st.generated_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": st.prompt_tokens + st.generated_tokens}
    if ephemeral:
        state.manager.delete(session.id)
    else:
        state.remember_response(resp, owner, session.id, len(session.messages))
    return resp


async def _response_stream(state: ServerState, turn, base: dict, session, ephemeral: bool,
                           owner: str) -> AsyncIterator[str]:
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return sse({"type": kind, "sequence_number": seq - 1, **fields}, kind)

    item_id = "msg_pending_" + uuid.uuid4().hex
    try:
        yield event("response.created", response=base)
        yield event("response.in_progress", response=base)
        item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
        yield event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part)
        text = []
        while (delta := await state.run(turn.next_delta)) is not None:
            text.append(delta)
            yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                        delta=delta, logprobs=[])
        final = await state.run(_finish_response, state, base, turn, session, ephemeral, owner)
        done_item = final["output"][0]
        full = "".join(text)
        yield event("response.output_text.done", item_id=done_item["id"], output_index=0, content_index=0,
                    text=full, logprobs=[])
        yield event("response.content_part.done", item_id=done_item["id"], output_index=0, content_index=0,
                    part={"type": "output_text", "text": full, "annotations": []})
        yield event("response.output_item.done", output_index=0, item=done_item)
        yield event("response.completed" if final["status"] == "completed" else "response.incomplete",
                    response=final)
    finally:
        await state.run(turn.close)


# ------------------------------------------------------------------------------------------------ conversations


def _install_conversations(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/conversations")
    async def create_conversation(body: ConversationCreate, request: Request):
        owner = state.owner(request)
        try:
            items = input_items(body.items or [])
        except ValueError as exc:
            raise ApiError(400, str(exc), "items") from exc
        system = "\n\n".join(t for r, t in items if r == "system") or None

        def make():
            s = state.manager.create(system=system, metadata={OWNER_KEY: owner, **(body.metadata or {})})
            for role, text in items:
                if role != "system":
                    s.add_message(role, text)
            return s

        return conversation_object(await state.run(make))

    @app.get("/v1/conversations/{cid}")
    async def get_conversation(cid: str, request: Request):
        return conversation_object(await state.run(state.session, sid_of(cid), state.owner(request)))

    @app.post("/v1/conversations/{cid}")
    async def update_conversation(cid: str, body: ConversationUpdate, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        s.metadata.update(body.metadata)
        await state.run(state.manager._history_changed, s)
        return conversation_object(s)

    @app.delete("/v1/conversations/{cid}")
    async def delete_conversation(cid: str, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        await state.run(state.manager.delete, s.id)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    @app.get("/v1/conversations/{cid}/items")
    async def list_items(cid: str, request: Request, limit: int = 20, order: str = "desc",
                         after: str | None = None):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise ApiError(400, "order must be asc|desc and limit 1..100", "order")
        data = [item_of(m) for m in s.messages]
        if order == "desc":
            data.reverse()
        if after is not None:
            ids = [d["id"] for d in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        page = data[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit}

    @app.post("/v1/conversations/{cid}/items")
    async def add_items(cid: str, body: ItemsCreate, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        try:
            items = input_items(body.items)
        except ValueError as exc:
            raise ApiError(400, str(exc), "items") from exc
        if any(r == "system" for r, _ in items):
            raise ApiError(400, "system items can only open a conversation", "items")
        added = [await state.run(s.add_message, role, text) for role, text in items]
        data = [item_of(m) for m in added]
        return {"object": "list", "data": data, "first_id": data[0]["id"], "last_id": data[-1]["id"],
                "has_more": False}

    @app.delete("/v1/conversations/{cid}/items/{item_id}")
    async def delete_item(cid: str, item_id: str, request: Request):
        s = await state.run(state.session, sid_of(cid), state.owner(request))
        await state.run(s.remove_message, item_id)
        return conversation_object(s)


# ------------------------------------------------------------------------------------------------ sessions


def _session_view(s, with_messages: bool = False) -> dict:
    view = {"id": s.id, "object": "session", "conversation_id": conv_id(s.id), "created_at": s.created_at,
            "system": s.system, "metadata": public_metadata(s.metadata), "busy": s.busy, "stats": s.stats}
    if with_messages:
        view["messages"] = [{"id": m.id, "role": m.role, "text": m.text, "created_at": m.created_at,
                             "tokens": m.token_count} for m in s.messages]
    return view


def _install_sessions(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/sessions")
    async def list_sessions(request: Request):
        owner = state.owner(request)

        def views():
            return [_session_view(s) for s in state.manager.list() if s.metadata.get(OWNER_KEY, "") == owner]

        return {"object": "list", "data": await state.run(views)}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str, request: Request):
        s = await state.run(state.session, sid, state.owner(request))
        return await state.run(_session_view, s, True)

    @app.post("/v1/sessions/{sid}/fork")
    async def fork_session(sid: str, request: Request):
        owner = state.owner(request)
        s = await state.run(state.session, sid, owner)
        child = await state.run(lambda: state.manager.fork(s.id, metadata={OWNER_KEY: owner}))
        return await state.run(_session_view, child)

    @app.get("/v1/sessions/{sid}/export")
    async def export_session(sid: str, request: Request, quantize: bool = False, compress: bool = False):
        import tempfile
        from pathlib import Path

        s = await state.run(state.session, sid, state.owner(request))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "session"
            await state.run(lambda: state.manager.export(s.id, path, quantize=quantize, compress=compress))
            data = path.read_bytes()
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{sid}.gsession"'})

    @app.post("/v1/sessions/import")
    async def import_session(request: Request, history_only: bool = False):
        import tempfile
        from pathlib import Path

        owner = state.owner(request)
        data = await request.body()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "session"
            path.write_bytes(data)
            s = await state.run(lambda: state.manager.import_file(path, history_only=history_only, new_id=True))
        s.metadata[OWNER_KEY] = owner
        await state.run(state.manager._history_changed, s)
        return await state.run(_session_view, s)
