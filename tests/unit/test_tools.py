"""Tool calling on Chat Completions (``server.tools``): a call always names a given tool with arguments valid against
its parameters, answers stream out of their envelope exactly as they read whole, history with calls and results
renders, and what cannot be honoured is a 400 naming the field."""

from __future__ import annotations

import concurrent.futures
import json
import random

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from fastapi.testclient import TestClient

import gemma_sessions as gs
from gemma_sessions.json_schema import JsonSchema
from gemma_sessions.server import create_app
from gemma_sessions.server.app import chat_prompt, items_of
from gemma_sessions.server.protocol import ChatMessage
from gemma_sessions.server import tools as T
from gemma_sessions.sessions.conversation import Message
from gemma_sessions.testing import byte_token, tiny_model, tiny_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
NESTED = {"type": "function", "function": {"name": "book", "parameters": {  # pydantic's shape: $defs and $ref
    "$defs": {"Seat": {"type": "object", "properties": {"row": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["row"]}},
    "type": "object", "properties": {"seats": {"type": "array", "items": {"$ref": "#/$defs/Seat"}, "maxItems": 2}},
    "required": ["seats"]}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, NESTED)}


def _check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and c["function"]["name"] in names
        jsonschema.validate(json.loads(c["function"]["arguments"]), PARAMS[c["function"]["name"]])


def test_the_reply_schema_accepts_exactly_calls_to_the_given_tools_or_an_answer():
    tools = T.parse_tools([WEATHER, NESTED])
    schema = T.reply_schema(tools, "auto", parallel=True)
    compiled = JsonSchema(schema)
    good = [{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]},
            {"tool_calls": [{"name": "book", "arguments": {"seats": [{"row": 2}]}},
                            {"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}]},
            {"response": "It is sunny."}]
    bad = [{"tool_calls": [{"name": "nope", "arguments": {}}]}, {"tool_calls": []},
           {"tool_calls": [{"name": "book", "arguments": {"seats": [{"row": 10}]}}]},
           {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}, {"response": 1}]
    for value in good:
        jsonschema.validate(value, schema)
        m = compiled.matcher()
        assert m.feed(json.dumps(value, separators=(",", ":")).encode()) and m.complete, value
    for value in bad:
        m = compiled.matcher()
        assert not (m.feed(json.dumps(value, separators=(",", ":")).encode()) and m.complete), value
    one = JsonSchema(T.reply_schema(tools[:1], "required", parallel=False)).matcher()
    assert not one.feed(b'{"response"')
    assert not JsonSchema(T.reply_schema(tools[:1], "required", parallel=False)).matcher().feed(
        b'{"tool_calls":[{"name":"get_weather","arguments":{"city":"a","unit":"c"}},')  # one call at most


def test_a_tool_without_parameters_takes_an_empty_object():
    schema = JsonSchema(T.reply_schema(T.parse_tools([{"type": "function", "function": {"name": "now"}}]),
                                       "required", parallel=False))
    m = schema.matcher()
    assert m.feed(b'{"tool_calls":[{"name":"now","arguments":{}}]}') and m.complete
    assert not schema.matcher().feed(b'{"tool_calls":[{"name":"now","arguments":{"')
    assert not schema.matcher().feed(b'{"tool_calls":[{"name":"now","arguments":1')


def test_tool_choice_and_tool_definitions_are_checked():
    tools = T.parse_tools([WEATHER, NESTED])
    assert T.chosen(tools, None) == ("auto", tools)
    assert T.chosen([], None) == ("none", [])
    assert T.chosen(tools, "none") == ("none", [])
    assert T.chosen(tools, {"type": "function", "function": {"name": "book"}}) == ("required", tools[1:])
    for bad in ({"type": "function", "function": {"name": "x"}}, "sometimes", 3):
        with pytest.raises(ValueError):
            T.chosen(tools, bad)
    for bad in ([{"type": "code_interpreter"}], [WEATHER, WEATHER], [{"type": "function", "function": {"name": "a b"}}],
                [{"type": "function", "function": {"name": "f", "parameters": "x"}}]):
        with pytest.raises(ValueError):
            T.parse_tools(bad)


@pytest.mark.parametrize("seed", range(20))
def test_an_answer_streams_out_of_its_envelope_as_it_reads_whole(seed):
    rng = random.Random(seed)
    answer = rng.choice(["It is 21 C.", 'quote " and \\ slash', "caf\u00e9 \U0001F600 tab\tnew\nline", "",
                         "\u00e9" * 5 + "\ud7ff"])
    text = rng.choice(['{"response": %s}', '{ "response" :%s }', '{\n  "response": %s\n}']) % json.dumps(
        answer, ensure_ascii=rng.random() < 0.5)
    stream, out, i = T.ContentStream(), [], 0
    while i < len(text):
        k = rng.randint(1, 4)
        out.append(stream.feed(text[i:i + k]))
        i += k
    assert stream.answer and "".join(out) == answer == T.parse_reply(text)[0]
    cut = text[:rng.randint(0, len(text))]  # cut short: what streamed is the content
    s2 = T.ContentStream()
    streamed = s2.feed(cut)
    assert T.parse_reply(cut)[0] == (streamed if s2.answer else cut)


def test_calls_are_not_streamed_as_text_and_lone_surrogates_are_replaced():
    s = T.ContentStream()
    assert s.feed('{"tool_calls": [{"name": "f", "arguments": {}}]}') == "" and s.answer is False
    assert T.ContentStream().feed('{"response": "a\\ud800b"}') == "a\ufffdb"
    content, calls = T.parse_reply('{"tool_calls": [{"name": "f", "arguments": {"x": [1]}}]}')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x": [1]}'}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8") | st.sampled_from('"\\/\b\f\n\r\t\x00\x1f\x7f\u2028'), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(args=st.lists(_JSON, min_size=1, max_size=3), style=st.sampled_from(["compact", "spaced", "indented", "ascii"]),
       cuts=st.lists(st.integers(1, 9), min_size=1, max_size=40), cut_at=st.integers(0, 400))
def test_call_stream_writes_the_arguments_the_whole_reply_reads_as(args, style, cuts, cut_at):
    """However the model spaced and escaped the envelope and however its text arrived, each call's pieces add up to
    ``json.dumps(arguments, ensure_ascii=False)`` of the parsed reply (what the whole reply gives); a reply cut
    anywhere gives a prefix of it."""
    fmt = {"compact": {"separators": (",", ":")}, "spaced": {}, "indented": {"indent": 2},
           "ascii": {"ensure_ascii": True, "separators": (", ", " : ")}}[style]
    text = json.dumps({"tool_calls": [{"name": f"tool_{i}", "arguments": a} for i, a in enumerate(args)]},
                      ensure_ascii=fmt.pop("ensure_ascii", False), **fmt)
    want = [(c["name"], T.arguments_text(c["arguments"])) for c in json.loads(text)["tool_calls"]]
    stream, pieces, at, k = T.CallStream(), [], 0, 0
    while at < len(text):
        step = cuts[k % len(cuts)]
        pieces += stream.feed(text[at:at + step])
        at, k = at + step, k + 1
    built: dict[int, list] = {}
    for i, name, piece in pieces:
        if name is not None:
            assert i not in built
            built[i] = [name, ""]
        built[i][1] += piece
    assert [tuple(built[i]) for i in range(len(built))] == want
    assert [tuple(c) for c in stream.calls] == want
    _, calls = T.parse_reply(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == want
    cut = T.partial_calls(text[:cut_at])
    assert all(name == want[i][0] and want[i][1].startswith(a) for i, (name, a) in enumerate(cut))


# --------------------------------------------------------------------------- the route
@pytest.fixture(scope="module")
def client():
    engine = gs.Engine(tiny_model("gemma3", seed=1, context=4096), kv_cache_bytes=32 << 20, block_size=16)
    with TestClient(create_app(gs.SessionManager(engine))) as c:
        yield c
    engine.close()


def _byte(ch: str) -> str:
    return str(byte_token(tiny_tokenizer(), ch))


# a random model, nudged to close what it opens and to spare the blank space (every choice stays constrained)
NUDGE = {**{_byte(c): 8 for c in '"}]1'}, **{_byte(c): -100 for c in " \n\t\r"}}
BODY = {"messages": [{"role": "user", "content": "weather in Paris?"}], "max_tokens": 300, "temperature": 0,
        "tools": [WEATHER, NESTED], "logit_bias": NUDGE}


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "book"}}])
def test_every_finished_choice_is_a_valid_call_or_an_answer(client, choice):
    r = client.post("/v1/chat/completions", json={**BODY, "tool_choice": choice, "temperature": 1.0, "seed": 7,
                                                  "n": 4, "parallel_tool_calls": choice != "auto"})
    assert r.status_code == 200, r.text
    names = {"book"} if isinstance(choice, dict) else set(PARAMS)
    finished = 0
    for c in r.json()["choices"]:
        msg = c["message"]
        if c["finish_reason"] == "tool_calls":
            assert msg["content"] is None
            _check_calls(msg["tool_calls"], names)
            assert choice != "auto" or len(msg["tool_calls"]) == 1  # parallel_tool_calls false
            finished += 1
        else:
            assert "tool_calls" not in msg and isinstance(msg["content"], str)
            assert choice == "auto" or c["finish_reason"] == "length"  # required: a call, unless cut short
            finished += c["finish_reason"] == "stop"
    assert finished


ANSWER = {**NUDGE, _byte("r"): 20, _byte('"'): 0}  # "auto" answering {"response": ...}, its text left to the model


CUT_IN_A_CALL = 170  # tokens: a reply that ends inside its first call's arguments (tiny tokenizer, NUDGE)


@pytest.mark.parametrize("choice, bias, max_tokens", [("required", NUDGE, 300), ("auto", NUDGE, 300),
                                                      ("required", NUDGE, CUT_IN_A_CALL), ("auto", ANSWER, 40),
                                                      ("auto", ANSWER, 300)])
def test_streamed_calls_and_answers_equal_the_whole_reply(client, choice, bias, max_tokens):
    """Calls stream as OpenAI's do: a call's first piece has its index, id, type and name, the others add to its
    arguments; put together as a client does, they are the whole reply's calls (cut short too: their arguments so
    far, finish_reason "length")."""
    body = {**BODY, "tool_choice": choice, "logit_bias": bias, "max_tokens": max_tokens}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0] for e in events if e["choices"]]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = [c for d in deltas for c in d["delta"].get("tool_calls") or []]
    built: dict[int, dict] = {}
    for c in calls:
        if "id" in c:
            assert c["index"] not in built and c["type"] == "function" and c["id"].startswith("call_")
            built[c["index"]] = dict(c["function"])
        else:
            assert set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
            built[c["index"]]["arguments"] += c["function"]["arguments"]
    assert deltas[-1]["finish_reason"] == whole["finish_reason"]
    if whole["message"].get("tool_calls"):
        assert [built[k] for k in range(len(built))] == [c["function"] for c in whole["message"]["tool_calls"]]
        assert len(calls) > len(built) and content == ""  # the arguments came in pieces
        assert whole["finish_reason"] == ("length" if max_tokens == CUT_IN_A_CALL else "tool_calls")
        if max_tokens == CUT_IN_A_CALL:
            with pytest.raises(ValueError):
                json.loads(built[0]["arguments"])
    else:
        assert not calls and content == whole["message"]["content"]
        assert bias is ANSWER
        if max_tokens == 40:  # cut before the answer began: the unfinished envelope, as text
            assert whole["finish_reason"] == "length" and content.startswith('{"response"')
        else:  # the answer's text itself, out of its envelope (whole, or so far when cut short)
            assert content and not content.startswith('{"response"')


def test_history_with_calls_and_results_is_rendered_and_answered(client):
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    r = client.post("/v1/chat/completions", json={**BODY, "messages": msgs, "max_tokens": 20})
    assert r.status_code == 200, r.text
    tok = client.app.state.gs.tokenizer
    text = tok.decode(chat_prompt(tok, [ChatMessage(**m) for m in msgs], False, "TOOLS"))
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]}' in text
    assert '{"tool_response": {"tool_call_id": "call_1", "content": "21 C"}}' in text and "TOOLS" in text
    counted = client.post("/tokenize", json={"messages": msgs})
    assert counted.status_code == 200 and counted.json()["count"] > 0
    fuzzed = client.post("/tokenize", json={"messages": [{"role": "assistant", "tool_calls": [0.0]}]})
    assert fuzzed.status_code == 400  # (the fuzzer found a 500 here)
    deep = [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[" * 50000}}]}, {"role": "user", "content": "hi"}]  # no JSON: kept as text
    assert client.post("/tokenize", json={"messages": deep}).status_code == 200
    # tools off (tool_choice none): no tools in the prompt and a plain reply, the history still renders
    r = client.post("/v1/chat/completions", json={**BODY, "messages": msgs, "tool_choice": "none", "max_tokens": 5})
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]


@pytest.mark.parametrize("extra, param, why", [
    (dict(functions=[{"name": "f"}]), "functions", "tools"),
    (dict(tools=[{"type": "web_search"}]), "tools", "function"),
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "nope"),
    (dict(tool_choice="always"), "tool_choice", "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^\\1"}}}}}]), "tools", "backreferences"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"id": "x"}]}, {"role": "user", "content": "hi"}]),
     "messages.0.tool_calls.0.function", "Field required"),
    (dict(messages=[{"role": "assistant", "tool_calls": [0.0]}, {"role": "user", "content": "hi"}]),
     "messages.0.tool_calls.0", "valid"),  # (the fuzzer's: a 500 before tool calls had a model)
])
def test_what_tools_cannot_honour_is_a_400_naming_it(client, extra, param, why):
    r = client.post("/v1/chat/completions", json={**BODY, **extra, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and why in err["message"], err


# --------------------------------------------------------------------------- Responses
class _Nudged(gs.SessionManager):
    """Sessions whose sampling carries NUDGE (Responses take no logit_bias; forks keep their parent's sampling)."""

    def create(self, **kw):
        bias = tuple((int(k), float(v)) for k, v in self.bias.items())
        kw["sampling"] = (kw.get("sampling") or gs.SamplingParams()).replace(logit_bias=bias)
        return super().create(**kw)


def _flat(tool: dict) -> dict:
    return {"type": "function", **tool["function"]}


RTOOLS = [_flat(WEATHER), _flat(NESTED)]


@pytest.fixture(scope="module")
def rclient():
    engine = gs.Engine(tiny_model("gemma3", seed=1, context=4096), kv_cache_bytes=32 << 20, block_size=16)
    manager = _Nudged(engine)
    manager.bias = NUDGE
    with TestClient(create_app(manager)) as c:
        yield c
    engine.close()


def _respond(client, **body) -> dict:
    r = client.post("/v1/responses", json={"max_output_tokens": 300, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _calls_of(resp: dict) -> list[dict]:
    calls = [i for i in resp["output"] if i["type"] == "function_call"]
    for c in calls:
        assert c["status"] == "completed" and c["id"].startswith("fc_") and c["call_id"].startswith("call_")
        jsonschema.validate(json.loads(c["arguments"]), PARAMS[c["name"]])
    return calls


def test_responses_call_tools_and_take_their_results_through_previous_response_id(rclient):
    first = _respond(rclient, input="weather in Paris?", tools=RTOOLS, tool_choice="required")
    calls = _calls_of(first)
    assert calls and first["status"] == "completed" and first["output_text"] == ""
    assert [i["type"] for i in first["output"]] == ["function_call"] * len(calls)
    assert first["tools"] == RTOOLS and first["tool_choice"] == "required" and first["parallel_tool_calls"]
    assert rclient.get(f"/v1/responses/{first['id']}").json()["output"] == first["output"]  # stored as given
    named = _respond(rclient, input="book", tools=RTOOLS, tool_choice={"type": "function", "name": "book"},
                     parallel_tool_calls=False)
    assert [c["name"] for c in _calls_of(named)] == ["book"]
    # the results go back as function_call_output items, continuing the first response's history
    results = [{"type": "function_call_output", "call_id": c["call_id"], "output": "21 C"} for c in calls]
    second = _respond(rclient, previous_response_id=first["id"], input=results, tools=RTOOLS)
    assert second["status"] == "completed" and second["previous_response_id"] == first["id"]
    if second["output"][0]["type"] == "message":  # auto: an answer, as text out of its envelope
        assert second["output_text"] == second["output"][0]["content"][0]["text"]
        assert not second["output_text"].startswith('{"response"')
    else:
        assert _calls_of(second) and second["output_text"] == ""
    assert second["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"] - 16


def _session_of(client, cid: str):
    return client.app.state.gs.manager.get(cid.removeprefix("conv_"))


def test_a_call_cut_short_lists_as_the_response_gave_it(rclient):
    """A reply that ran out of tokens inside a call: the response, a retrieve and the conversation's items all
    give the same incomplete function_call (its arguments so far)."""
    cid = rclient.post("/v1/conversations", json={}).json()["id"]
    r = _respond(rclient, conversation=cid, input="weather?", tools=RTOOLS, tool_choice="required",
                 max_output_tokens=CUT_IN_A_CALL)
    assert r["status"] == "incomplete" and [i["status"] for i in r["output"]] == ["incomplete"]
    call = r["output"][0]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["arguments"].startswith("{")
    assert rclient.get(f"/v1/responses/{r['id']}").json()["output"] == r["output"]
    items = rclient.get(f"/v1/conversations/{cid}/items", params={"order": "asc"}).json()["data"]
    assert items[1:] == r["output"]


def test_a_conversation_is_told_of_its_tools_once_and_lists_calls_and_results_as_items(rclient):
    cid = rclient.post("/v1/conversations", json={"items": [
        {"type": "message", "role": "system", "content": "Be brief."}]}).json()["id"]
    first = _respond(rclient, conversation=cid, input="weather?", tools=RTOOLS, tool_choice="required")
    calls = _calls_of(first)
    s = _session_of(rclient, cid)
    assert s.messages[0].text.startswith(T.TOOLS_HEAD) and s.messages[0].text.endswith("\n\nweather?")
    text = rclient.app.state.gs.tokenizer.decode(list(s.messages[0].token_ids))
    assert "Be brief.\n\n" + T.TOOLS_HEAD in text and '"get_weather"' in text
    results = [{"type": "function_call_output", "call_id": c["call_id"], "output": "sunny"} for c in calls]
    _respond(rclient, conversation=cid, input=results, tools=RTOOLS, tool_choice="required", max_output_tokens=20)
    assert not any(m.text.startswith(T.TOOLS_HEAD) for m in _session_of(rclient, cid).messages[2:])  # told once
    _respond(rclient, conversation=cid, input="and Rome?", tools=RTOOLS, max_output_tokens=20)  # auto: told again
    told = [m for m in _session_of(rclient, cid).messages if m.text.startswith(T.TOOLS_HEAD)]
    assert len(told) == 2 and T.announced(told[1].text) == T.system_text(T.parse_tools(RTOOLS, flat=True), "auto")
    items = rclient.get(f"/v1/conversations/{cid}/items", params={"order": "asc", "limit": 100}).json()["data"]
    assert items[0]["content"][0]["text"] == "weather?"  # the tools' text is not the user's
    assert items[1:1 + len(calls)] == calls  # the same items (and call ids) as the response gave
    outputs = [i for i in items if i["type"] == "function_call_output"]
    assert [(o["call_id"], o["output"]) for o in outputs] == [(c["call_id"], "sunny") for c in calls]
    assert any(i.get("content", [{}])[0].get("text") == "and Rome?" for i in items)
    only_thoughts = rclient.post(f"/v1/conversations/{cid}/items", json={"items": [
        {"type": "reasoning", "id": "rs_1", "summary": []}]})
    assert only_thoughts.status_code == 200 and only_thoughts.json()["data"] == []
    for item in (items[0], calls[-1], outputs[0]):  # one item, as the list gives it
        assert rclient.get(f"/v1/conversations/{cid}/items/{item['id']}").json() == item
    missing = rclient.get(f"/v1/conversations/{cid}/items/msg_nope")
    assert missing.status_code == 404 and "msg_nope" in missing.json()["error"]["message"]
    # a call's item names its reply: deleting it deletes the reply (all its calls)
    n = len(_session_of(rclient, cid).messages)
    assert rclient.delete(f"/v1/conversations/{cid}/items/{calls[0]['id']}").status_code == 200
    assert len(_session_of(rclient, cid).messages) == n - 1


def test_a_stateless_agent_resends_its_items_and_reuses_the_cached_prompt(rclient):
    """The Agents SDK's way: store false, the whole input each time; the tools go in the new session's system
    prompt, where Chat Completions puts them, so each request's prompt extends the last one's."""
    question = {"type": "message", "role": "user", "content": "weather in Paris?"}
    first = _respond(rclient, input=[question], tools=RTOOLS, tool_choice="required", store=False,
                     instructions="Use tools.")
    calls = _calls_of(first)
    echoed = [{k: c[k] for k in ("type", "id", "call_id", "name", "arguments")} for c in calls]
    results = [{"type": "function_call_output", "call_id": c["call_id"], "output": [{"type": "input_text",
                                                                                     "text": "21 C"}]} for c in calls]
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "."}]}
    second = _respond(rclient, input=[question, thought, *echoed, *results], tools=RTOOLS, tool_choice="required",
                      store=False, instructions="Use tools.", max_output_tokens=20)  # (thoughts echoed: left out)
    assert second["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"] - 16
    tok = rclient.app.state.gs.tokenizer
    chat = chat_prompt(tok, [ChatMessage(role="system", content="Use tools."), ChatMessage(**question)], False,
                       T.system_text(T.parse_tools(RTOOLS, flat=True), "required"))
    assert first["usage"]["input_tokens"] == len(chat)  # the prompt Chat Completions gives the same request


@pytest.mark.parametrize("choice, answer, max_tokens", [("required", False, 300), ("required", False, CUT_IN_A_CALL),
                                                         ("auto", True, 300), ("auto", True, 40)])
def test_streamed_response_items_equal_the_whole_response(rclient, choice, answer, max_tokens):
    """Every event names its item by the id the final response gives it; a call's item is added with its name,
    its arguments come in deltas that add up to the final arguments (cut short: to those so far, the item
    incomplete)."""
    body = {"input": "weather in Paris?", "tools": RTOOLS, "tool_choice": choice, "max_output_tokens": max_tokens,
            "temperature": 0, "store": False}
    manager = rclient.app.state.gs.manager
    manager.bias = ANSWER if answer else NUDGE
    try:
        whole = _respond(rclient, **body)
        with rclient.stream("POST", "/v1/responses", json={**body, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    finally:
        manager.bias = NUDGE
    final = events[-1]["response"]
    strip = [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in final["output"]]
    assert strip == [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in whole["output"]]
    assert events[-1]["type"] == ("response.completed" if whole["status"] == "completed" else "response.incomplete")
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    ids = {i["id"] for i in final["output"]}
    assert {e.get("item_id", e.get("item", {}).get("id")) for e in events if e["type"].startswith("response.")
            and e["type"] not in ("response.created", "response.in_progress", "response.completed",
                                  "response.incomplete")} <= ids
    args: dict[str, str] = {}
    for e in events:
        if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call":
            assert e["item"]["id"] not in args and e["item"]["name"] and e["item"]["status"] == "in_progress"
            args[e["item"]["id"]] = ""
        elif e["type"] == "response.function_call_arguments.delta":
            args[e["item_id"]] += e["delta"]
    if final["output"][-1]["type"] == "function_call":
        assert not answer and text == "" and args == {c["id"]: c["arguments"] for c in final["output"]}
        n_deltas = sum(e["type"] == "response.function_call_arguments.delta" for e in events)
        assert n_deltas > len(args)  # in pieces, as written
        cut = max_tokens == CUT_IN_A_CALL
        assert final["status"] == ("incomplete" if cut else "completed")
        assert {c["status"] for c in final["output"]} == {"incomplete" if cut else "completed"}
    else:
        assert answer and not args and text == final["output_text"] == final["output"][-1]["content"][0]["text"]
        if max_tokens == 40:  # cut before the answer began: the unfinished envelope, as text
            assert final["status"] == "incomplete" and text.startswith('{"response"')
        else:
            assert text and not text.startswith('{"response"')


RESULT = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_format_with_tools_shapes_the_answer_on_both_routes(client, rclient, stream):
    """Tools with a JSON format (an agent with an output type): calls as ever, and an answer that is the format's
    JSON, whole, on Chat Completions and Responses, streamed or not."""
    fmt = {"type": "json_schema", "json_schema": {"name": "result", "schema": RESULT}}
    body = {**BODY, "logit_bias": ANSWER, "response_format": fmt, "stream": stream}
    if stream:
        with client.stream("POST", "/v1/chat/completions", json=body) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        finish = events[-1]["choices"][0]["finish_reason"]
    else:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        content, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    assert finish == "stop", content
    jsonschema.validate(json.loads(content), RESULT)
    text = T.system_text(T.parse_tools([WEATHER, NESTED]), "auto", RESULT)  # told with the tools, read back whole
    assert "An answer is a JSON value of this schema" in text and T.announced(text) == text
    manager = rclient.app.state.gs.manager
    manager.bias = ANSWER
    try:
        rbody = {"input": "weather?", "tools": RTOOLS, "max_output_tokens": 300, "temperature": 0, "store": False,
                 "text": {"format": {"type": "json_schema", "name": "result", "schema": RESULT}}}
        if stream:
            with rclient.stream("POST", "/v1/responses", json={**rbody, "stream": True}) as s:
                events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
            final = events[-1]["response"]
            assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == \
                final["output_text"]
        else:
            final = _respond(rclient, **rbody)
    finally:
        manager.bias = NUDGE
    assert final["status"] == "completed" and final["output"][-1]["type"] == "message", final
    jsonschema.validate(json.loads(final["output_text"]), RESULT)


def test_allowed_tools_hold_calls_to_their_subset_on_both_routes(client, rclient):
    only_book = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "book"}]}
    r = _respond(rclient, input="book", tools=RTOOLS, tool_choice=only_book, store=False)
    assert [c["name"] for c in _calls_of(r)] and {c["name"] for c in _calls_of(r)} == {"book"}
    chat = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}}
    r = client.post("/v1/chat/completions", json={**BODY, "tool_choice": chat})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "tool_calls", r.text
    _check_calls(r.json()["choices"][0]["message"]["tool_calls"], {"get_weather"})
    for bad, why in (({"type": "allowed_tools", "mode": "sometimes", "tools": [{"type": "function", "name": "book"}]},
                      "mode"), ({"type": "allowed_tools", "mode": "auto", "tools": []}, "non-empty"),
                     ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "x"}]}, "'x'"),
                     ({"type": "function", "function": "book"}, "None")):  # (a 500 before: str.get)
        r = rclient.post("/v1/responses", json={"input": "hi", "tools": RTOOLS, "tool_choice": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice" and why in r.text, r.text


def _deep_schema(levels: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_schemas_nested_past_the_limit_are_400s_before_anything_recurses(client, rclient):
    """Tool parameters, or a format's schema next to tools, nested 300 levels: a 400 naming the field (a 500 before:
    copying the schema under the envelope ran out of recursion)."""
    deep = _deep_schema(300)
    r = rclient.post("/v1/responses", json={"input": "hi", "max_output_tokens": 4, "tools": [
        {"type": "function", "name": "f", "parameters": deep}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and "nests deeper" in r.text, r.text
    r = rclient.post("/v1/responses", json={"input": "hi", "max_output_tokens": 4, "tools": RTOOLS, "text": {
        "format": {"type": "json_schema", "name": "x", "schema": deep}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text" and "nests deeper" in r.text, r.text
    r = client.post("/v1/chat/completions", json={**BODY, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": deep}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


@pytest.mark.parametrize("extra, param, why", [
    (dict(tools=[WEATHER]), "tools", "'name': ..."),  # Chat's nested shape
    (dict(tools=[{"type": "file_search"}]), "tools", "function"),
    (dict(tool_choice={"type": "function", "name": "nope"}), "tool_choice", "nope"),
    (dict(input=[{"type": "function_call_output", "output": "x"}]), "input", "call_id"),
    (dict(input=[{"type": "function_call_output", "call_id": "c", "output": 3}]), "input", "output"),
    (dict(input=[{"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": {}},
                 {"type": "message", "role": "user", "content": "hi"}]), "input", "arguments"),
    (dict(input=[{"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{}"}]), "input",
     "function_call_output"),  # the input must end with the user's turn
    (dict(input=[{"type": "item_reference", "id": "x"}]), "input", "item_reference"),
])
def test_what_responses_tools_cannot_honour_is_a_400_naming_it(rclient, extra, param, why):
    r = rclient.post("/v1/responses", json={"input": "hi", "tools": RTOOLS, "max_output_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and why in err["message"], err


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=12)
_ITEM = st.fixed_dictionaries({"type": st.sampled_from(["message", "function_call", "function_call_output", "x"])},
                              optional={"role": st.sampled_from(["user", "assistant", "system", "tool"]),
                                        "content": _JSON, "name": st.sampled_from(["f", "", 1]),
                                        "arguments": _JSON, "call_id": _JSON, "output": _JSON})


@settings(max_examples=400, derandomize=True, deadline=None)
@given(items=st.lists(_ITEM | _JSON, max_size=5), tools_on=st.booleans())
def test_any_input_items_are_turns_or_a_value_error(items, tools_on):
    try:
        turns = T.input_turns(items, tools_on)
    except ValueError:
        return
    assert all(role in ("user", "model", "system") and isinstance(text, str) for role, text in turns)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(text=st.one_of(st.text(max_size=40), _JSON.map(json.dumps), st.just("[" * 5000)),
       role=st.sampled_from(["user", "model"]), tools_on=st.sampled_from([None, True, False]))
def test_any_stored_message_reads_as_items(text, role, tools_on):
    """Whatever a history holds (a reply cut short, a model's own JSON, deep nesting) lists as items."""
    items = items_of(Message(role=role, text=text, created_at=0.0, token_ids=()), tools_on)
    assert items and all(i["type"] in ("message", "function_call", "function_call_output") for i in items)


def test_agents_call_tools_from_many_threads(rclient):
    """12 agents at once, each its own round trip (a call, its result, a reply) through previous_response_id or a
    conversation, 4 of them taking turns in one shared conversation: every call is valid, and the shared
    conversation's items pair every result with a call listed before it."""
    shared = rclient.post("/v1/conversations", json={}).json()["id"]

    def agent(i: int) -> None:
        where = ({"conversation": shared} if i % 3 == 0 else
                 {"conversation": rclient.post("/v1/conversations", json={}).json()["id"]} if i % 3 == 1 else {})
        first = _respond(rclient, input=f"weather {i}?", tools=RTOOLS, tool_choice="required", seed=i,
                         temperature=1.0, **where)
        calls = _calls_of(first)
        then = where or {"previous_response_id": first["id"]}
        second = _respond(rclient, input=[{"type": "function_call_output", "call_id": c["call_id"], "output": str(i)}
                                          for c in calls], tools=RTOOLS, max_output_tokens=40, **then)
        assert second["status"] in ("completed", "incomplete") and second["output"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        for f in [pool.submit(agent, i) for i in range(12)]:
            f.result()
    items = rclient.get(f"/v1/conversations/{shared}/items", params={"order": "asc", "limit": 100}).json()["data"]
    dropped = _session_of(rclient, shared).conversation.dropped_turns  # the oldest turns, past the context
    seen: set[str] = set()
    for item in items:
        if item["type"] == "function_call":
            seen.add(item["call_id"])
        elif item["type"] == "function_call_output":
            assert item["call_id"] in seen or (dropped and not seen), items
    assert len([i for i in items if i["type"] == "function_call_output"]) >= 4
