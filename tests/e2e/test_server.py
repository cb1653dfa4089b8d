"""A real server process on 127.0.0.1 (the real model, a real store) driven by the official openai client."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import KEY_A, KEY_B, Server, free_port as _free_port

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def server(tmp_path_factory, real_model_path):
    s = Server(tmp_path_factory.mktemp("store"), _free_port(), extra=["--score-chunk", "64"]).start()
    yield s
    s.stop()


def test_a_score_chunk_out_of_range_is_a_clear_error(real_model_path):
    proc = subprocess.run([sys.executable, "-m", "gemma_sessions.cli", "serve", "--no-store", "--score-chunk", "0",
                           "--port", str(_free_port())], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "score_chunk must be in 1..256" in proc.stderr, proc.stderr


def test_chat_completions_plain_and_streamed(server):
    c = server.client()
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(model="gemma3-270m", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens <= 12
    again = c.chat.completions.create(model="gemma3-270m", messages=msgs, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # stateless, yet the prefix cache served it
    chunks = list(c.chat.completions.create(model="gemma3-270m", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert c.models.list().data[0].id


def test_conversation_multi_turn_and_items(server):
    c = server.client()
    conv = c.conversations.create(metadata={"topic": "test"})
    r1 = c.responses.create(model="m", conversation=conv.id, input="Hello, I am Ana.", max_output_tokens=12,
                            temperature=0)
    r2 = c.responses.create(model="m", conversation=conv.id, input="What is my name?", max_output_tokens=12,
                            temperature=0)
    assert r1.output_text and r2.output_text
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens  # the KV stayed warm
    items = c.conversations.items.list(conv.id, order="asc").data
    assert [i.role for i in items] == ["user", "assistant", "user", "assistant"]
    assert items[0].content[0].text == "Hello, I am Ana."
    c.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Note this."}])
    assert len(c.conversations.items.list(conv.id).data) == 5
    c.conversations.items.delete(items[0].id, conversation_id=conv.id)
    assert len(c.conversations.items.list(conv.id).data) == 4
    assert c.conversations.retrieve(conv.id).metadata == {"topic": "test"}


def test_previous_response_id_chain_and_stream_events(server):
    c = server.client()
    r1 = c.responses.create(model="m", input="Count: one, two,", max_output_tokens=8, temperature=0)
    events = list(c.responses.create(model="m", previous_response_id=r1.id, input="Go on.",
                                     max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    final = events[-1].response
    assert final.usage.input_tokens_details.cached_tokens > 0
    assert c.responses.retrieve(final.id).id == final.id
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text


def test_key_isolation(server):
    a, b = server.client(KEY_A), server.client(KEY_B)
    conv = a.conversations.create()
    a.responses.create(model="m", conversation=conv.id, input="secret", max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        b.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.create(model="m", conversation=conv.id, input="continue", max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        b.conversations.delete(conv.id)
    assert a.conversations.retrieve(conv.id).id == conv.id
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert len(conv.id) >= 5 + 32  # conv_ + 128 random bits in hex


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (json.dumps({"messages": "hi"}).encode(), 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (json.dumps({"messages": []}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 17}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x " * 40000}]}).encode(), 400),
    (b"{" + b" " * (5 << 20) + b"}", 413),
])
def test_bad_chat_requests(server, body, status):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_unknown_ids_are_404(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve("conv_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_nope")
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="m", input=[], max_output_tokens=4)


def test_busy_conversation_is_409_when_caller_will_not_wait(server):
    c = server.client()
    conv = c.conversations.create()
    stream = c.responses.create(model="m", conversation=conv.id, input="Write a long story.",
                                max_output_tokens=200, stream=True)
    next(iter(stream))
    r = httpx.post(f"{server.url}/v1/responses", json={"conversation": conv.id, "input": "me too"}, timeout=60,
                   headers={"Authorization": f"Bearer {KEY_A}", "x-gemma-wait": "0"})
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict_error"
    stream.close()  # client gone: its generation is cancelled


def test_native_session_routes_and_metrics(server):
    c = server.client()
    conv = c.conversations.create()
    c.responses.create(model="m", conversation=conv.id, input="Hi", max_output_tokens=4)
    h = {"Authorization": f"Bearer {KEY_A}"}
    sid = conv.id[5:]
    sessions = httpx.get(f"{server.url}/v1/sessions?limit=100&order=desc", headers=h).json()["data"]
    assert sid in [s["id"] for s in sessions]
    one = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=h).json()
    assert one["stats"]["turns"] == 1 and len(one["messages"]) == 2
    fork = httpx.post(f"{server.url}/v1/sessions/{sid}/fork", headers=h).json()
    assert fork["id"] != sid
    data = httpx.get(f"{server.url}/v1/sessions/{sid}/export", headers=h).content
    imported = httpx.post(f"{server.url}/v1/sessions/import", content=data, headers=h).json()
    assert imported["stats"]["tokens"] == one["stats"]["tokens"]
    bad = httpx.post(f"{server.url}/v1/sessions/import", content=data[:100], headers=h)
    assert bad.status_code == 400 and "truncated" in bad.json()["error"]["message"]
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("gemma_requests_total", "gemma_time_to_first_token_seconds", "gemma_kv_blocks_used",
                 "gemma_prefix_hit_rate", "gemma_inter_token_latency_seconds", "gemma_sessions_resident"):
        assert name in metrics


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                             st.sampled_from(["messages", "input", "role", "content", "max_tokens", "stream",
                                              "temperature", "conversation", "items", "metadata", "stop"]),
                             inner, max_size=4), max_leaves=10),
       route=st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/conversations"]))
def test_fuzzed_bodies_never_500(server, body, route):
    r = httpx.post(f"{server.url}{route}", json=body, timeout=120, headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert "error" in r.json()


def test_conversation_survives_restart(tmp_path, real_model_path):
    srv = Server(tmp_path / "store", _free_port()).start()
    try:
        c = srv.client()
        conv = c.conversations.create()
        first = c.responses.create(model="m", conversation=conv.id, input="Remember the word blue.",
                                   max_output_tokens=12, temperature=0)
        before = [(i.role, i.content[0].text) for i in c.conversations.items.list(conv.id).data]
    finally:
        srv.stop()
    srv = Server(tmp_path / "store", _free_port()).start()
    try:
        c = srv.client()
        after = [(i.role, i.content[0].text) for i in c.conversations.items.list(conv.id).data]
        assert after == before
        nxt = c.responses.create(model="m", conversation=conv.id, input="Which word?", max_output_tokens=8,
                                 temperature=0)
        assert nxt.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    finally:
        srv.stop()
    assert os.listdir(tmp_path / "store" / "kv")


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a very long essay."}], "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a very long essay."}], "stream": True,
                              "n": 4, "logprobs": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a very long essay."}], "n": 3}),
    ("/v1/completions", {"prompt": "A very long essay:", "stream": True, "n": 2}),
], ids=["chat-stream", "chat-stream-n4-logprobs", "chat-n3", "completions-stream-n2"])
def test_client_disconnect_cancels_its_generation(server, route, body):
    h = {"Authorization": f"Bearer {KEY_A}"}
    body = {**body, "max_tokens": 2000, "temperature": 1.0}
    if body.get("stream"):
        with httpx.stream("POST", f"{server.url}{route}", json=body, headers=h, timeout=60) as r:
            for _ in r.iter_lines():
                break  # first chunk arrived: the generation runs; now hang up
    else:
        with pytest.raises(httpx.ReadTimeout):  # hang up while every choice still generates
            httpx.post(f"{server.url}{route}", json=body, headers=h, timeout=3)
    deadline = time.time() + 20
    while time.time() < deadline:
        if httpx.get(f"{server.url}/health").json()["running"] == 0:
            break
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/health").json()["running"] == 0, "the generation outlived its client"


def test_overload_is_503_with_retry_after(tmp_path, real_model_path):
    srv = Server(tmp_path / "store", _free_port(), extra=["--max-batch", "1", "--max-waiting", "1"]).start()
    try:
        h = {"Authorization": f"Bearer {KEY_A}"}
        body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 300,
                "stream": True}
        streams = [httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=h, timeout=60)
                   for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        for r in responses:
            assert r.status_code == 200
        deadline = time.time() + 20
        while httpx.get(f"{srv.url}/health").json()["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.1)
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "stream": False}, headers=h, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_error"
        for s in streams:
            s.__exit__(None, None, None)
    finally:
        srv.stop()


def test_responses_instructions_and_store_false(server):
    c = server.client()
    h = {"Authorization": f"Bearer {KEY_A}"}
    before = {s["id"] for s in httpx.get(f"{server.url}/v1/sessions?limit=100&order=desc", headers=h).json()["data"]}
    kept = c.responses.create(model="m", input="Hello", instructions="Answer in French.", max_output_tokens=4)
    after = {s["id"]: s for s in httpx.get(f"{server.url}/v1/sessions?limit=100&order=desc", headers=h).json()["data"]}
    new = [after[i] for i in set(after) - before]
    assert len(new) == 1 and new[0]["system"] == "Answer in French."
    assert c.responses.retrieve(kept.id).id == kept.id
    eph = c.responses.create(model="m", input="Hello", store=False, max_output_tokens=4)
    assert eph.output_text is not None
    final = {s["id"] for s in httpx.get(f"{server.url}/v1/sessions?limit=100&order=desc", headers=h).json()["data"]}
    assert final == set(after), "store=false must not leave a session behind"
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(eph.id)


def test_json_mode_on_the_real_model_answers_a_json_object(server):
    from gemma_sessions.constraints import JsonPrefix

    h = {"Authorization": f"Bearer {KEY_A}"}
    body = {"messages": [{"role": "user", "content": 'Return a JSON object with the keys "name" and "age" for Alice, '
                                                     "who is 30."}],
            "max_tokens": 48, "temperature": 0, "response_format": {"type": "json_object"}}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=h, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["message"]["content"]
    assert text.startswith("{") and JsonPrefix(object_only=True).feed(text.encode()), text
    assert '"name"' in text and "Alice" in text  # the model's own answer, kept to JSON (not a forced empty object)
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


def test_json_schema_on_the_real_model_through_the_openai_clients_parse(server):
    """A pydantic model through the official client's ``parse`` (its strict schema: titles, required, no extra
    properties): the 270M base model, which alone repeats the prompt, answers the schema's object."""
    import pydantic

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=40)
        age: int = pydantic.Field(ge=0, le=150)
        city: str = pydantic.Field(max_length=40)

    client = server.client()
    done = client.chat.completions.parse(
        model="gemma", messages=[{"role": "user", "content": "Alice is 30 and lives in Paris. Describe her as JSON."}],
        response_format=Person, max_tokens=60, temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    person = choice.message.parsed
    assert person.name == "Alice" and person.age == 30, choice.message.content
    r = client.responses.create(model="gemma", input="Bob is 41 and lives in Rome. Describe him as JSON.",
                                max_output_tokens=60, temperature=0, text={"format": {
                                    "type": "json_schema", "name": "person", "strict": True,
                                    "schema": Person.model_json_schema() | {"additionalProperties": False}}})
    Person.model_validate_json(r.output_text)

    class Trip(pydantic.BaseModel):  # pydantic's date (format "date") and a constrained string (a pattern)
        city: str = pydantic.Field(max_length=40)
        country: str = pydantic.Field(pattern=r"^[A-Z]{2}$")
        day: datetime.date

    trip = client.chat.completions.parse(model="gemma", messages=[{"role": "user", "content": (
        "Ann flies to Paris, France on 3 May 2025. Describe her trip as JSON.")}], response_format=Trip,
        max_tokens=150, temperature=0).choices[0]
    assert trip.finish_reason == "stop" and isinstance(trip.message.parsed, Trip), trip.message.content
    with pytest.raises(openai.BadRequestError, match="lookaround"):
        client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "hi"}], response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "^(?!a)"}}})


def test_tool_calls_on_the_real_model_through_the_openai_client(server):
    """The official client's tools round trip: the 270M base model calls the right tool with the right arguments
    (one call: parallel_tool_calls false), and a tool result in the history is accepted."""
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a "
               "city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]}}}
    add = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
    client = server.client()
    calls = {}
    for question in ("What is the weather in Paris?", "What is 2 plus 3?"):
        done = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": question}],
                                              tools=[weather, add], tool_choice="required", parallel_tool_calls=False,
                                              max_tokens=60, temperature=0)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        (call,) = choice.message.tool_calls
        calls[question] = (call.function.name, json.loads(call.function.arguments))
    assert calls == {"What is the weather in Paris?": ("get_weather", {"city": "Paris"}),
                     "What is 2 plus 3?": ("add", {"a": 2, "b": 3})}
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    stream = client.chat.completions.create(model="gemma", messages=history, tools=[weather, add], max_tokens=40,
                                            temperature=0, stream=True, parallel_tool_calls=False)
    finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert finish in (["tool_calls"], ["stop"], ["length"])


def test_responses_tool_calls_on_the_real_model_through_the_openai_client(server):
    """The official client's Responses tools round trip, as an agent makes it: a ``function_call`` item naming
    the right tool with the right arguments, its result sent back as a ``function_call_output`` after
    ``previous_response_id``, and the whole stored; then the same through a stateless, streamed request."""
    weather = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    add = {"type": "function", "name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}
    client = server.client()
    first = client.responses.create(model="gemma", input="What is the weather in Paris?", tools=[weather, add],
                                    tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                    temperature=0)
    (call,) = first.output
    assert call.type == "function_call" and (call.name, json.loads(call.arguments)) == ("get_weather",
                                                                                      {"city": "Paris"})
    second = client.responses.create(model="gemma", previous_response_id=first.id, tools=[weather, add],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 21 C"}], max_output_tokens=40, temperature=0)
    assert second.status in ("completed", "incomplete") and second.output
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 32
    assert client.responses.retrieve(first.id).output[0].call_id == call.call_id
    events = list(client.responses.create(model="gemma", input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        tools=[weather, add], store=False, stream=True, max_output_tokens=40, temperature=0))
    assert events[-1].type in ("response.completed", "response.incomplete") and events[-1].response.output


def test_prompt_scoring_on_the_real_model_as_lm_eval_asks(server):
    """lm-eval's loglikelihood request (tokenized prompt in a list, echo, logprobs 1, max_tokens 1) and its
    parsing: the real model finds " Paris" far likelier than " London" after "The capital of France is", and
    " 6, 7" after "1, 2, 3, 4, 5," its greedy continuation."""
    h = {"Authorization": f"Bearer {KEY_A}"}

    def tokens(text: str, bos: bool) -> list[int]:
        r = httpx.post(f"{server.url}/tokenize", headers=h, timeout=60,
                       json={"prompt": text, "add_special_tokens": bos})
        return r.json()["tokens"]

    def loglikelihood(context_text: str, continuation: str) -> tuple[float, bool]:
        context = tokens(context_text, True)
        ids = context + tokens(continuation, False)
        r = httpx.post(f"{server.url}/v1/completions", headers=h, timeout=120, json={
            "model": "gemma", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
            "seed": 1234})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        own, top = lp["token_logprobs"][len(context):-1], lp["top_logprobs"][len(context):-1]
        return sum(own), all(t >= max(alt.values()) for t, alt in zip(own, top))

    paris = loglikelihood("The capital of France is", " Paris")
    london = loglikelihood("The capital of France is", " London")
    assert paris[0] > london[0] + 1.0, (paris, london)
    counting, wrong = loglikelihood("1, 2, 3, 4, 5,", " 6, 7"), loglikelihood("1, 2, 3, 4, 5,", " 9, 2")
    assert counting[1] and not wrong[1] and counting[0] > wrong[0], (counting, wrong)  # lm-eval's is_greedy
