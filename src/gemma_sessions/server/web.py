"""The web page at ``/`` and the two JSON routes it needs beyond the OpenAI-shaped API.

Contract: the page (``static/``: index.html, app.js, app.css; no CDN, no build step) is public, like ``/health``:
it holds no data. Everything it shows comes from the public API under ``/v1/``, where :class:`~.app.Guard` asks
for the API key as for any client; the page keeps a key for its tab only (sessionStorage) and never weakens
ownership (another key's sessions are 404 to it as to anyone).

The two routes added here:
- ``GET /v1/sessions/{sid}/turns``: each turn run on the session: prompt tokens split into cached / prefilled,
  generated tokens, time to first token, decode speed, where the history's KV came from. Owner only.
- ``GET /v1/stats``: the server at a glance, as JSON: KV pool use, sessions loaded / parked / spilled, the queue,
  token counters (a client derives throughput from two readings). Any valid key.

NOTE: ``/v1/stats`` is server-wide and names no session: it says what ``/metrics`` (public, for Prometheus)
already says, in a shape a page can read without parsing Prometheus text.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# The page runs only its own files: model text that slipped into markup could still run nothing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Static(StaticFiles):
    """The page's assets, with the page's security headers."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def install(app: FastAPI, state) -> None:
    """Serve the page at ``/`` (assets under ``/static/``) and add ``/v1/sessions/{sid}/turns`` and ``/v1/stats``."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)

    app.mount("/static", _Static(directory=STATIC), name="static")

    @app.get("/v1/sessions/{sid}/turns")
    async def session_turns(sid: str, request: Request):
        s = await state.run(state.session, sid, state.owner(request))
        return {"object": "list", "session_id": s.id, "data": [turn_view(i, t) for i, t in
                                                                 enumerate(list(s.turn_stats), 1)]}

    @app.get("/v1/stats")
    async def server_stats(request: Request):
        state.owner(request)
        return await state.run(server_view, state)


def turn_view(index: int, t) -> dict:
    """One turn's stats (a ``TurnStats``) as JSON; times rounded to 0.1 ms."""
    view = dataclasses.asdict(t)
    view.update(turn=index, ttft_s=round(t.ttft_s, 4), total_s=round(t.total_s, 4),
                decode_tokens_per_s=round(t.decode_tokens_per_s, 1))
    return view


def server_view(state) -> dict:
    """The server's state for ``/v1/stats`` (runs on the thread pool: ``engine.stats`` waits for the loop)."""
    e = state.engine.stats()
    loaded = state.manager.loaded_sessions()
    store = state.manager.store
    return {
        "object": "server.stats", "model": state.model_name, "time": time.time(),
        "uptime_s": round(time.time() - state.created, 1),
        "kv": {"kind": e["cache_kind"], "blocks_total": e["blocks_total"], "blocks_used": e["blocks_used"],
               "blocks_cached": e["blocks_cached"], "blocks_free": e["blocks_free"], "block_size": e["block_size"],
               "bytes_total": e["kv_bytes_total"], "bytes_used": e["kv_bytes_used"],
               "prefix_hit_rate": round(e["prefix_hit_rate"], 4), "evictions": e["cache_block_evictions"]},
        "requests": {"running": e["running"], "waiting": e["waiting"], "max_waiting": state.limits.max_waiting,
                     "total": e["requests"], "cancelled": e.get("cancelled", 0), "failed": e.get("failed", 0),
                     "preemptions": e["preemptions"]},
        "sessions": {"loaded": sum(1 for s in loaded if s.persistent), "busy": sum(1 for s in loaded if s.busy),
                     "parked": e["parked"], "spilled_total": e["session_kv_evictions"]},
        "tokens": {"generated_total": e["generated_tokens"], "prefilled_total": e["prefill_tokens"],
                   "generated_per_s_avg": round(e["generated_tokens_per_s"], 2)},
        "store": store.stats() if store is not None else None,
    }
