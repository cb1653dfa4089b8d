"""/health tells a supervisor the truth: 200 while the engine loop serves, 503 once it is dead or draining."""

from __future__ import annotations

from fastapi.testclient import TestClient

import gemma_sessions as gs
from gemma_sessions.server import create_app
from gemma_sessions.testing import tiny_model


def test_health_is_503_once_the_engine_loop_is_dead():
    engine = gs.Engine(tiny_model("gemma3", seed=1), kv_cache_bytes=4 << 20, block_size=4)
    app = create_app(gs.SessionManager(engine))
    with TestClient(app) as client:
        ok = client.get("/health")
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        app.state.gs.draining = True
        assert client.get("/health").status_code == 503
        assert client.post("/v1/chat/completions", json={}).status_code == 503
        app.state.gs.draining = False
        engine.close()  # what a dead loop looks like from outside: not alive, refuses work
        dead = client.get("/health")
        assert dead.status_code == 503 and dead.json()["status"] == "engine loop dead"
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_the_heap_trimmer_runs_and_stops():
    import threading
    import time

    from gemma_sessions.server.heap import limit_arenas, start_trimming

    assert limit_arenas(8)  # glibc here: the cap applies (8 is no tighter than glibc's own default on 2 cores)
    stop = start_trimming(0.05)
    assert stop is not None  # glibc here (Debian): the trimmer must run
    time.sleep(0.2)
    assert any(t.name == "gemma-heap-trim" for t in threading.enumerate())
    stop.set()
