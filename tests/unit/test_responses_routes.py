"""The Responses routes beyond create and retrieve: a response's input items, deleting a response, background
responses (polled, cancelled, failed by a shutdown or a restart), and a conversation told of its tools once however
many turns race for it."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
from fastapi.testclient import TestClient

import gemma_sessions as gs
from gemma_sessions.server import create_app
from gemma_sessions.server import tools as T
from gemma_sessions.server.app import INTERRUPTED, sid_of
from gemma_sessions.testing import tiny_model

KEYS = ("key-a", "key-b")
A, B = ({"Authorization": f"Bearer {k}"} for k in KEYS)
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}]


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=1, context=4096)


def _engine(model):
    return gs.Engine(model, kv_cache_bytes=32 << 20, block_size=16)


@pytest.fixture(scope="module")
def client(model, tmp_path_factory):
    engine = _engine(model)
    manager = gs.SessionManager(engine, store=str(tmp_path_factory.mktemp("store")))
    with TestClient(create_app(manager, api_keys=KEYS)) as c:
        yield c
    manager.close()
    engine.close()


def _respond(client, headers=A, **body) -> dict:
    r = client.post("/v1/responses", json={"max_output_tokens": 6, "temperature": 0, **body}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _items(client, rid: str, headers=A, **params) -> dict:
    r = client.get(f"/v1/responses/{rid}/input_items", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(client, rid: str, headers=A, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/responses/{rid}", headers=headers).json()
        if body["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ input items
def test_input_items_are_what_the_model_saw_before_its_output_in_pages(client):
    first = _respond(client, input=[{"role": "user", "content": "hello"}])
    second = _respond(client, previous_response_id=first["id"], input="and again")
    items = _items(client, second["id"], order="asc")
    assert [(i["type"], i["role"]) for i in items["data"]] == [("message", "user"), ("message", "assistant"),
                                                             ("message", "user")]
    assert [i["content"][0]["text"] for i in items["data"]] == ["hello", first["output_text"], "and again"]
    assert items["data"][1]["id"] == first["output"][0]["id"]  # the earlier reply is the same item
    assert items["has_more"] is False and items["first_id"] == items["data"][0]["id"]
    desc = _items(client, second["id"])  # newest first by default, as OpenAI lists
    assert desc["data"] == items["data"][::-1]
    page = _items(client, second["id"], order="asc", limit=2)
    rest = _items(client, second["id"], order="asc", limit=2, after=page["last_id"])
    assert page["has_more"] and not rest["has_more"] and page["data"] + rest["data"] == items["data"]
    assert [i["content"][0]["text"] for i in _items(client, first["id"])["data"]] == ["hello"]
    assert client.get(f"/v1/responses/{second['id']}/input_items", params={"limit": 0}, headers=A).status_code == 400
    for rid, headers in ((second["id"], B), ("resp_nope", A)):  # another key's response is unknown to this one
        r = client.get(f"/v1/responses/{rid}/input_items", headers=headers)
        assert r.status_code == 404 and r.json()["error"]["param"] == "response_id"


def test_a_conversations_response_lists_its_context_as_it_was_less_items_deleted_since(client):
    cid = client.post("/v1/conversations", json={"items": [{"role": "user", "content": "seed"}]}, headers=A).json()["id"]
    first = _respond(client, conversation=cid, input="one")
    _respond(client, conversation=cid, input="two")  # later turns are not the first response's context
    assert [i["content"][0]["text"] for i in _items(client, first["id"], order="asc")["data"]] == ["seed", "one"]
    seed = _items(client, first["id"], order="asc")["data"][0]["id"]
    assert client.delete(f"/v1/conversations/{cid}/items/{seed}", headers=A).status_code == 200
    assert [i["content"][0]["text"] for i in _items(client, first["id"], order="asc")["data"]] == ["one"]


def test_a_told_turns_input_item_reads_without_the_tools_text(client):
    r = _respond(client, input="weather in Paris?", tools=TOOLS, tool_choice="required", max_output_tokens=40)
    assert [i["content"][0]["text"] for i in _items(client, r["id"])["data"]] == ["weather in Paris?"]


# ------------------------------------------------------------------------------------------------ input tokens
def _count(client, headers=A, **body) -> int:
    r = client.post("/v1/responses/input_tokens", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "response.input_tokens"
    return r.json()["input_tokens"]


def test_input_tokens_are_what_the_same_request_computes_and_nothing_is_kept(client):
    manager = client.app.state.gs.manager
    before = (len(manager.loaded_sessions()), len(manager.store.session_ids()))
    body = {"input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}],
            "instructions": "You are a test."}
    assert _count(client, **body) == _respond(client, store=False, **body)["usage"]["input_tokens"]
    told = {"input": "weather?", "tools": TOOLS, "tool_choice": "required"}
    assert _count(client, **told) == _respond(client, store=False, max_output_tokens=40, **told)["usage"]["input_tokens"]
    assert (len(manager.loaded_sessions()), len(manager.store.session_ids())) == before
    first = _respond(client, input="one")
    follow = {"previous_response_id": first["id"], "input": [{"role": "user", "content": "two"}]}
    assert _count(client, **follow) == _respond(client, **follow)["usage"]["input_tokens"]
    cid = client.post("/v1/conversations", json={"items": [{"role": "user", "content": "seed"}]}, headers=A).json()["id"]
    n = _count(client, conversation=cid, **told)  # told of the tools: the note is counted
    assert n == _respond(client, conversation=cid, max_output_tokens=40, **told)["usage"]["input_tokens"]
    again = _count(client, conversation=cid, input="and Rome?", tools=TOOLS, tool_choice="required")
    assert again == _respond(client, conversation=cid, input="and Rome?", tools=TOOLS, tool_choice="required",
                             max_output_tokens=40)["usage"]["input_tokens"]  # told once: not again
    for bad, status in (({"input": ""}, 400), ({"conversation": "conv_nope", "input": "x"}, 404),
                        ({"previous_response_id": "resp_nope", "input": "x"}, 404),
                        ({"conversation": cid, "previous_response_id": first["id"], "input": "x"}, 400)):
        assert client.post("/v1/responses/input_tokens", json=bad, headers=A).status_code == status, bad
    assert client.post("/v1/responses/input_tokens", json={"conversation": cid, "input": "x"},
                       headers=B).status_code == 404  # another key's conversation


# ------------------------------------------------------------------------------------------------ delete
def test_deleting_a_response_removes_it_and_the_history_it_alone_held(client):
    app_state = client.app.state.gs
    first = _respond(client, input="remember me")
    sid = app_state.manager.response(first["id"])["session"]
    assert client.delete(f"/v1/responses/{first['id']}", headers=B).status_code == 404  # not B's
    r = client.delete(f"/v1/responses/{first['id']}", headers=A)
    assert r.status_code == 200 and r.json() == {"id": first["id"], "object": "response", "deleted": True}
    assert client.get(f"/v1/responses/{first['id']}", headers=A).status_code == 404
    assert client.delete(f"/v1/responses/{first['id']}", headers=A).status_code == 404
    gone = client.post("/v1/responses", json={"previous_response_id": first["id"], "input": "x"}, headers=A)
    assert gone.status_code == 404
    assert sid not in app_state.manager.store.session_ids()  # its messages and KV went with it


def test_deleting_a_conversations_response_keeps_the_conversation(client):
    cid = client.post("/v1/conversations", json={}, headers=A).json()["id"]
    r = _respond(client, conversation=cid, input="keep this")
    assert client.delete(f"/v1/responses/{r['id']}", headers=A).status_code == 200
    items = client.get(f"/v1/conversations/{cid}/items", params={"order": "asc"}, headers=A).json()["data"]
    assert [i["role"] for i in items] == ["user", "assistant"]
    assert _respond(client, conversation=cid, input="still here")["status"] in ("completed", "incomplete")


def test_a_deleted_response_stays_deleted_after_a_restart(model, tmp_path):
    store = str(tmp_path / "store")
    with _engine(model) as engine:
        manager = gs.SessionManager(engine, store=store)
        with TestClient(create_app(manager)) as c:
            kept, deleted = _respond(c, None, input="a"), _respond(c, None, input="b")
            assert c.delete(f"/v1/responses/{deleted['id']}").status_code == 200
        manager.close()
    with _engine(model) as engine:
        manager = gs.SessionManager(engine, store=store)
        with TestClient(create_app(manager)) as c:
            assert c.get(f"/v1/responses/{deleted['id']}").status_code == 404
            assert c.get(f"/v1/responses/{kept['id']}").json()["output_text"] == kept["output_text"]
            assert [i["content"][0]["text"] for i in _items(c, kept["id"], None)["data"]] == ["a"]
        manager.close()


# ------------------------------------------------------------------------------------------------ background
def test_a_background_response_is_polled_to_the_same_answer_as_a_plain_one(client):
    plain = _respond(client, input="tell me more", max_output_tokens=24)
    started = _respond(client, input="tell me more", max_output_tokens=24, background=True)
    assert started["status"] in ("queued", "in_progress") and started["background"] is True
    assert started["output"] == [] and started["id"] != plain["id"]
    done = _wait(client, started["id"])
    assert done["status"] == plain["status"] and done["output_text"] == plain["output_text"]
    assert done["usage"]["output_tokens"] == plain["usage"]["output_tokens"] and done["background"] is True
    assert [i["content"][0]["text"] for i in _items(client, done["id"])["data"]] == ["tell me more"]
    again = client.post(f"/v1/responses/{done['id']}/cancel", headers=A)  # finished: cancelling changes nothing
    assert again.status_code == 200 and again.json() == done
    follow = _respond(client, previous_response_id=done["id"], input="go on")
    assert follow["status"] in ("completed", "incomplete")


def test_a_cancelled_background_turn_leaves_its_conversation_as_it_was(client):
    cid = client.post("/v1/conversations", json={}, headers=A).json()["id"]
    _respond(client, conversation=cid, input="first")
    before = client.get(f"/v1/conversations/{cid}/items", headers=A).json()["data"]
    started = _respond(client, conversation=cid, input="a long one", max_output_tokens=4000, background=True)
    waiting = client.post("/v1/responses", json={"previous_response_id": started["id"], "input": "x"}, headers=A)
    assert waiting.status_code == 400 and "in_progress" in waiting.json()["error"]["message"]
    assert client.post(f"/v1/responses/{started['id']}/cancel", headers=B).status_code == 404
    r = client.post(f"/v1/responses/{started['id']}/cancel", headers=A)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"  # (4000 tokens take seconds; the cancel comes at once)
    assert client.get(f"/v1/responses/{started['id']}", headers=A).json()["status"] == "cancelled"
    assert client.get(f"/v1/conversations/{cid}/items", headers=A).json()["data"] == before
    assert _respond(client, conversation=cid, input="next")["status"] in ("completed", "incomplete")


def test_background_refusals_name_their_field(client):
    for extra, param in (({"store": False}, "background"), ({"stream": True}, "stream"),
                         ({"include": ["message.output_text.logprobs"]}, "include")):
        r = client.post("/v1/responses", json={"input": "x", "background": True, **extra}, headers=A)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    plain = _respond(client, input="x")
    r = client.post(f"/v1/responses/{plain['id']}/cancel", headers=A)
    assert r.status_code == 400 and "background" in r.json()["error"]["message"]


def test_background_responses_end_as_failed_at_shutdown_and_after_a_crash(model, tmp_path):
    store = str(tmp_path / "store")
    with _engine(model) as engine:
        manager = gs.SessionManager(engine, store=store)
        with TestClient(create_app(manager)) as c:
            started = _respond(c, None, input="long", max_output_tokens=4000, background=True)
        body = manager.response(started["id"])["body"]  # the shutdown ended it and recorded why
        assert body["status"] == "failed" and body["error"]["message"] == INTERRUPTED
        # a process that died without a shutdown leaves the record in progress: the next one reports it failed
        crashed = dict(body, id="resp_crashed", status="in_progress", error=None)
        manager.remember_response("resp_crashed", owner="", session_id="gone", n_messages=0, body=crashed)
        manager.close()
    with _engine(model) as engine:
        manager = gs.SessionManager(engine, store=store)
        with TestClient(create_app(manager)) as c:
            cancelled = c.post("/v1/responses/resp_crashed/cancel").json()  # nothing runs it: it failed
            assert cancelled["status"] == "failed" and cancelled["error"]["message"] == INTERRUPTED
            assert c.get("/v1/responses/resp_crashed").json() == cancelled
        manager.close()


def test_many_background_responses_at_once_each_finish_with_their_own_answer(client):
    questions = [f"question number {i}" for i in range(12)]
    plain = {q: _respond(client, input=q, max_output_tokens=10)["output_text"] for q in questions[:3]}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        started = list(pool.map(lambda q: _respond(client, input=q, max_output_tokens=10, background=True),
                                questions))
        done = list(pool.map(lambda r: _wait(client, r["id"]), started))
    assert all(d["status"] in ("completed", "incomplete") for d in done)
    assert [d["output_text"] for d in done[:3]] == [plain[q] for q in questions[:3]]
    for q, d in zip(questions, done):
        assert [i["content"][0]["text"] for i in _items(client, d["id"])["data"]] == [q]


# ------------------------------------------------------------------------------------------------ tools, told once
def test_turns_racing_in_one_conversation_tell_it_of_its_tools_once(client):
    """The "told of tools" check reads the history the turn will extend (under the session's turn lock): 8 turns
    sent at once into a conversation that was never told of them tell it exactly once."""
    cid = client.post("/v1/conversations", json={}, headers=A).json()["id"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda i: _respond(client, conversation=cid, input=f"turn {i}", tools=TOOLS,
                                                tool_choice="required", max_output_tokens=30), range(8)))
    assert all(d["status"] in ("completed", "incomplete") for d in done)
    session = client.app.state.gs.manager.get(sid_of(cid))
    told = [m for m in session.messages if m.role == "user" and m.text.startswith(T.TOOLS_HEAD)]
    assert len(told) == 1 and len([m for m in session.messages if m.role == "user"]) == 8


# ------------------------------------------------------------------------------------------------ two replicas
def test_two_replicas_on_redis_see_one_background_response_and_only_its_own_cancels_it(model, tmp_path):
    from gemma_sessions.testing import RedisServer

    with RedisServer(tmp_path / "redis") as srv, _engine(model) as e1, _engine(model) as e2:
        m1, m2 = gs.SessionManager(e1, store=srv.url), gs.SessionManager(e2, store=srv.url)
        with TestClient(create_app(m1)) as one, TestClient(create_app(m2)) as two:
            started = _respond(one, None, input="long", max_output_tokens=4000, background=True)
            seen = two.get(f"/v1/responses/{started['id']}").json()
            assert seen["status"] == "in_progress"  # (not "failed": on Redis another replica may be running it)
            elsewhere = two.post(f"/v1/responses/{started['id']}/cancel")
            assert elsewhere.status_code == 409 and elsewhere.json()["error"]["param"] == "response_id"
            assert two.delete(f"/v1/responses/{started['id']}").status_code == 409  # (it would be recorded again)
            assert one.post(f"/v1/responses/{started['id']}/cancel").json()["status"] == "cancelled"
            assert two.get(f"/v1/responses/{started['id']}").json()["status"] == "cancelled"
            done = _respond(one, None, input="short", max_output_tokens=4, background=True)
            assert _wait(two, done["id"])["status"] in ("completed", "incomplete")  # polled through the other
            assert [i["content"][0]["text"] for i in _items(two, done["id"], None)["data"]] == ["short"]
            assert two.delete(f"/v1/responses/{done['id']}").status_code == 200
            assert one.get(f"/v1/responses/{done['id']}").status_code == 404
        m1.close()
        m2.close()


def test_a_background_response_whose_replica_died_is_reported_failed_by_the_others(model, tmp_path, monkeypatch):
    """In a shared store the running replica renews its record every BACKGROUND_HEARTBEAT_S; a record not renewed
    for BACKGROUND_STALE_S is one whose replica died, and any replica reports it failed."""
    from gemma_sessions.server import app as app_mod
    from gemma_sessions.testing import RedisServer

    monkeypatch.setattr(app_mod, "BACKGROUND_HEARTBEAT_S", 0.05)
    monkeypatch.setattr(app_mod, "BACKGROUND_STALE_S", 0.5)
    with RedisServer(tmp_path / "redis") as srv, _engine(model) as e1, _engine(model) as e2:
        m1, m2 = gs.SessionManager(e1, store=srv.url), gs.SessionManager(e2, store=srv.url)
        with TestClient(create_app(m1)) as one, TestClient(create_app(m2)) as two:
            alive = _respond(one, None, input="long", max_output_tokens=4000, background=True)
            time.sleep(1.0)  # twice the stale time: only the heartbeats keep it alive
            assert two.get(f"/v1/responses/{alive['id']}").json()["status"] == "in_progress"
            assert m2.response(alive["id"])["alive_at"] > time.time() - 0.5
            assert one.post(f"/v1/responses/{alive['id']}/cancel").json()["status"] == "cancelled"
            # a replica that died mid-generation: its record, last renewed a second ago
            dead = dict(alive, id="resp_dead", status="in_progress")
            m1.remember_response("resp_dead", owner="", session_id="gone", n_messages=0, body=dead,
                                 alive_at=time.time() - 1.0)
            got = two.get("/v1/responses/resp_dead").json()
            assert got["status"] == "failed" and got["error"]["message"] == INTERRUPTED
            assert one.get("/v1/responses/resp_dead").json() == got  # recorded so, for every replica
        m1.close()
        m2.close()


def test_many_threads_create_poll_cancel_and_delete_responses_and_nothing_breaks(client):
    """16 threads at once, each its own mix of background and plain responses, in one shared conversation or
    alone, cancelled, deleted, polled and listed mid-flight: no answer is a 5xx, every response ends completed,
    incomplete or cancelled (or is gone once deleted), and the shared conversation's items pair each user turn with
    one reply."""
    import random

    shared = client.post("/v1/conversations", json={}, headers=A).json()["id"]
    problems: list[str] = []

    def agent(i: int) -> None:
        rng = random.Random(i)
        for k in range(2):
            where = {"conversation": shared} if rng.random() < 0.4 else {}
            body = {"input": f"agent {i} turn {k}", "max_output_tokens": rng.choice([4, 40, 4000]),
                    "temperature": 0, "background": rng.random() < 0.7, **where}
            r = client.post("/v1/responses", json=body, headers=A)
            if r.status_code >= 500:
                problems.append(f"create {r.status_code} {r.text[:200]}")
                continue
            rid = r.json()["id"]
            action = rng.choice(["wait", "cancel", "delete", "items"])
            if action == "cancel" and body["background"]:
                c = client.post(f"/v1/responses/{rid}/cancel", headers=A)
                if c.status_code != 200 or c.json()["status"] not in ("cancelled", "completed", "incomplete"):
                    problems.append(f"cancel {c.status_code} {c.text[:200]}")
            elif action == "delete":
                d = client.delete(f"/v1/responses/{rid}", headers=A)
                gone = client.get(f"/v1/responses/{rid}", headers=A)
                if d.status_code != 200 or gone.status_code != 404:
                    problems.append(f"delete {d.status_code} then get {gone.status_code}")
                continue
            elif action == "items":
                items = client.get(f"/v1/responses/{rid}/input_items", headers=A)
                if items.status_code != 200:
                    problems.append(f"input_items {items.status_code} {items.text[:200]}")
            if action != "cancel" or not body["background"]:
                if body["max_output_tokens"] == 4000 and body["background"]:  # don't wait for 4000 tokens
                    client.post(f"/v1/responses/{rid}/cancel", headers=A)
                end = _wait(client, rid)
                if end["status"] not in ("completed", "incomplete", "cancelled"):
                    problems.append(f"ended {end['status']} {end.get('error')}")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(agent, range(16)))
    assert problems == []
    assert not client.app.state.gs.background  # every background generation ended
    items = client.get(f"/v1/conversations/{shared}/items", params={"order": "asc", "limit": 100},
                       headers=A).json()["data"]
    assert [i["role"] for i in items] == ["user", "assistant"] * (len(items) // 2)
