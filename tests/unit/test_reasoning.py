"""Reasoning through sessions and the OpenAI routes: the thinking switch reaches the prompt, thoughts come back apart
from the answer and leave the history, and the next turn reuses only KV of tokens still in the history.

The tiny Gemma 4 network runs through the engine and a session; the rest use a tiny Gemma 3 network behind the
tiny Gemma 4 tokenizer (the sessions layer sees only the tokenizer; it is quicker and its window can be set). Random
weights never decide to think, so where a thinking reply is needed the engine's generations are scripted
(:class:`Scripted`: the real engine for everything but the tokens it returns).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import gemma_sessions as gs
from gemma_sessions.engine.request import GenerationOutput, RequestStats
from gemma_sessions.errors import InvalidRequestError
from gemma_sessions.loading import Model
from gemma_sessions.server import create_app
from gemma_sessions.sessions.chat_format import chat_format, split_thoughts
from gemma_sessions.testing import tiny_gemma4_tokenizer, tiny_model

GREEDY = gs.SamplingParams(temperature=0, max_tokens=6)


def gemma4_chat_model(seed: int = 1, window: int | None = None) -> Model:
    """A tiny Gemma 3 network (its sliding window ``window`` when given, else 8) behind the tiny Gemma 4 tokenizer."""
    import torch

    from gemma_sessions.config import ModelConfig
    from gemma_sessions.models.gemma import GemmaModel
    from gemma_sessions.testing import random_tensors, tiny_hf_config

    config = ModelConfig.from_hf_config(dict(tiny_hf_config("gemma3"), sliding_window=window or 8))
    net = GemmaModel(config, random_tensors(config, seed), "float32", torch.device("cpu")).eval()
    return Model(net, tiny_gemma4_tokenizer(), Path("tiny-gemma4-chat"), 0.0,
                 fingerprint=f"tiny-gemma4-chat:{config.fingerprint()}:{seed}")


def thinking_reply(tok, thought: str, answer: str) -> list[int]:
    return [tok.token_id("<|channel>"), *tok.encode(f"thought\n{thought}"), tok.token_id("<channel|>"),
            *tok.encode(answer)]


class _Stream:
    def __init__(self, tokens: list[int], n_prompt: int):
        self.tokens, self.n_prompt = tokens, n_prompt

    def __iter__(self):
        return iter(self.tokens)

    def cancel(self) -> None:
        pass

    def result(self, timeout: float | None = None) -> GenerationOutput:
        stats = RequestStats(prompt_tokens=self.n_prompt, cached_tokens=0, prefilled_tokens=self.n_prompt,
                             generated_tokens=len(self.tokens), recomputed_tokens=0, preemptions=0, queued_s=0.0,
                             ttft_s=0.0, decode_tokens_per_s=0.0, total_s=0.0)
        return GenerationOutput(token_ids=list(self.tokens), finish_reason="stop", stats=stats)


class Scripted:
    """The real engine, except that every generation returns ``tokens`` (what a thinking model writes); the
    prompts it was given are in ``prompts``."""

    def __init__(self, engine, tokens: list[int]):
        self._engine, self.tokens, self.prompts = engine, tokens, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, prompt, params=None, kv=None, checkpoints=(), constraint=None):
        self.prompts.append(list(prompt))
        return _Stream(self.tokens, len(prompt))


@pytest.fixture(scope="module")
def engine():
    e = gs.Engine(gemma4_chat_model(), kv_cache_bytes=4 << 20, block_size=4)
    yield e
    e.close()


# ------------------------------------------------------------------------------------------------ sessions


def test_turns_render_gemma4_turns_and_reuse_only_kv_still_in_the_history(engine):
    tok = engine.model.tokenizer
    fmt = chat_format(tok)
    assert tok.turn_close_id in engine.model.stop_ids
    s = gs.SessionManager(engine).create(system="Be brief.", sampling=GREEDY)
    r1 = s.send("hi there")
    prompt1 = [*fmt.prefix("Be brief.", False), *s.messages[0].token_ids, *fmt.generation_prompt(False)]
    assert s.token_ids == [*fmt.prefix("Be brief.", False), *fmt.turn("user", "hi there"),
                           tok.turn_open_id, *tok.encode("model\n"), *r1.token_ids, tok.turn_close_id,
                           *tok.encode("\n")]
    history1 = s.token_ids
    r2 = s.send("and then?")
    prompt2 = [*history1, *s.messages[-2].token_ids, *fmt.generation_prompt(False)]
    assert r2.stats.prompt_tokens == len(prompt2)
    seen = [*prompt1, *r1.token_ids]  # the KV after turn 1: its prompt (empty thought channel included) and reply
    common = next(i for i, (a, b) in enumerate(zip(seen, prompt2)) if a != b)
    assert common < len(prompt1)  # the empty thought channel is not in the history
    assert common - 4 < r2.stats.cached_tokens <= common  # reused up to the last whole block before they part
    engine.reset_prefix_cache()  # the same prompt computed from nothing gives the same greedy reply
    assert list(engine.submit(prompt2, GREEDY)) == r2.token_ids


@pytest.mark.parametrize("thinking", [False, True])
def test_a_tiny_gemma4_through_sessions_reuses_the_history_and_equals_uncached(thinking):
    """The real Gemma 4 network (every feature, a window of 5) through the engine and a session: the history is the
    rendered one, turn 2 reuses the KV only up to where turn 1's prompt and reply left the history, and its greedy
    reply is the one the same prompt gets computed from nothing."""
    from gemma_sessions.testing import tiny_gemma4_model

    model = tiny_gemma4_model("all")
    tok, fmt = model.tokenizer, chat_format(model.tokenizer)
    with gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4) as e:
        s = gs.SessionManager(e).create(system="sys", sampling=GREEDY, reasoning=thinking)
        r1 = s.send("hi there")
        prompt1 = [*fmt.prefix("sys", thinking), *s.messages[0].token_ids, *fmt.generation_prompt(thinking)]
        answer1, _ = split_thoughts(r1.token_ids, fmt.channel)
        assert s.token_ids == [*fmt.prefix("sys", thinking), *fmt.turn("user", "hi there"), tok.turn_open_id,
                               *tok.encode("model\n"), *answer1, tok.turn_close_id, *tok.encode("\n")]
        history1 = s.token_ids
        r2 = s.send("and then?")
        prompt2 = [*history1, *s.messages[-2].token_ids, *fmt.generation_prompt(thinking)]
        seen = [*prompt1, *r1.token_ids]
        common = next((i for i, (a, b) in enumerate(zip(seen, prompt2)) if a != b), len(seen))
        assert r2.stats.prompt_tokens == len(prompt2) and common - 4 < r2.stats.cached_tokens <= common
        e.reset_prefix_cache()
        assert list(e.submit(prompt2, GREEDY)) == r2.token_ids


def test_the_thinking_switch_per_session_and_per_turn(engine):
    tok = engine.model.tokenizer
    manager = gs.SessionManager(engine)
    s = manager.create(reasoning=True, sampling=GREEDY)
    assert s.sampling.reasoning and s.conversation.reasoning
    s.send("hi")
    assert s.token_ids[:5] == [tok.bos_id, tok.turn_open_id, *tok.encode("system\n"), tok.think_id][:5]
    assert tok.think_id in s.token_ids
    s.send("again", reasoning=False)  # this turn without thinking: the history's system turn goes
    assert tok.think_id not in s.token_ids and not s.conversation.reasoning
    copy = manager.import_bytes(manager.export_bytes(s.id), new_id=True)  # the default travels with the session
    assert copy.sampling.reasoning and copy.conversation.reasoning


@pytest.mark.parametrize("window", [128, 8])
def test_restart_restores_the_kv_before_the_dropped_tokens_and_continues_as_never_saved(tmp_path, window):
    """The last turn's KV holds the generation prompt's empty thought channel, which the history dropped: what a
    restart restores is the KV before it (the whole blocks), at least with a window longer than the session; with a
    window of 8 the sliding blocks the cut needs may be gone (then the history is recomputed). Either way the replies
    are those of a session never saved."""
    model = gemma4_chat_model(window=window)
    questions = ["hi there", "and then?", "why so?"]
    with gs.Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        s = gs.SessionManager(e).create(system="sys", sampling=GREEDY)
        reference = [s.send(q).token_ids for q in questions]
    with gs.Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(system="sys", sampling=GREEDY)
        got = [s.send(q).token_ids for q in questions[:2]]
        tok = model.tokenizer
        # the history up to the last reply's "<|turn>model\n": what the KV and the history still share
        common = len(s.token_ids) - len(s.messages[-1].token_ids) + len([tok.turn_open_id, *tok.encode("model\n")])
        sid = s.id
        m.close()
    with gs.Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        m = gs.SessionManager(e, store=tmp_path)
        r = m.get(sid).send(questions[2])
        got.append(r.token_ids)
        if window == 128 or r.stats.kv_source == "snapshot":
            assert r.stats.kv_source == "snapshot"
            assert common - 4 < r.stats.cached_tokens <= common  # the whole blocks before the dropped tokens
        else:
            assert r.stats.kv_source == "recompute"
        m.close()
    assert got == reference


def test_an_imported_session_file_keeps_the_kv_before_the_dropped_tokens():
    with gs.Engine(gemma4_chat_model(window=128), kv_cache_bytes=4 << 20, block_size=4) as e:
        m = gs.SessionManager(e)
        s = m.create(system="sys", sampling=GREEDY)
        s.send("hi there")
        data = m.export_bytes(s.id)
        copy = m.import_bytes(data, new_id=True)
        assert 0 < e.kv_tokens(copy.kv) < len(copy.token_ids)  # the KV of the history before the reply
        assert copy.send("more").token_ids == s.send("more").token_ids


def test_a_model_without_thinking_refuses_reasoning_and_stays_usable():
    e = gs.Engine(tiny_model("gemma3", seed=1), kv_cache_bytes=4 << 20, block_size=4)
    try:
        manager = gs.SessionManager(e)
        with pytest.raises(InvalidRequestError, match="no thinking mode"):
            manager.create(reasoning=True)
        s = manager.create(sampling=GREEDY)
        with pytest.raises(InvalidRequestError, match="no thinking mode"):
            s.send("hi", reasoning=True)
        assert not s.busy and s.messages == []
        assert s.send("hi", reasoning=False).finish_reason in ("stop", "length")
    finally:
        e.close()


def test_a_thinking_reply_returns_thoughts_apart_and_history_drops_them(engine):
    tok = engine.model.tokenizer
    scripted = Scripted(engine, thinking_reply(tok, "let me see", "Yes"))
    s = gs.SessionManager(scripted).create(reasoning=True, sampling=GREEDY)
    stream = s.stream("hi")
    parts = []
    while (part := stream.next_part()) is not None:
        parts.append(part)
    reply = stream.reply
    assert (reply.text, reply.reasoning) == ("Yes", "let me see") and reply.token_ids == scripted.tokens
    kinds = [k for k, _ in parts]
    assert kinds == sorted(kinds, reverse=True) and set(kinds) == {"reasoning", "content"}  # thoughts, then answer
    assert reply.stats.reasoning_tokens == len(scripted.tokens) - len(tok.encode("Yes"))
    assert s.messages[-1].text == "Yes" and tok.channel_open_id not in s.token_ids
    assert list(s.messages[-1].token_ids) == [tok.turn_open_id, *tok.encode("model\n"), *tok.encode("Yes"),
                                              tok.turn_close_id, *tok.encode("\n")]
    history = s.token_ids
    s.send("more")
    assert scripted.prompts[-1][:len(history)] == history  # the next prompt is the history without thoughts
    assert tok.channel_open_id not in scripted.prompts[-1]  # thoughts never go back to the model


# ------------------------------------------------------------------------------------------------ HTTP


def _chat(client, effort=None, stream=False, **extra):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, **extra}
    if effort is not None:
        body["reasoning_effort"] = effort
    if stream:
        body["stream"] = True
    return client.post("/v1/chat/completions", json=body)


def test_a_tiny_gemma4_server_answers_with_reasoning_on_and_off():
    from gemma_sessions.testing import tiny_gemma4_model

    with gs.Engine(tiny_gemma4_model("all"), kv_cache_bytes=8 << 20, block_size=4) as e:
        with TestClient(create_app(gs.SessionManager(e), model_name="tiny-gemma4")) as client:
            for effort in ("high", "none"):
                r = _chat(client, effort)
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            conv = client.post("/v1/conversations", json={}).json()["id"]
            body = {"conversation": conv, "max_output_tokens": 4, "temperature": 0, "reasoning": {"effort": "high"}}
            first = client.post("/v1/responses", json=dict(body, input="hi")).json()
            second = client.post("/v1/responses", json=dict(body, input="more")).json()
            assert first["status"] in ("completed", "incomplete") and second["output"][-1]["type"] == "message"
            assert second["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"] - 4


def test_reasoning_on_a_model_without_thinking_is_a_400_naming_the_field():
    e = gs.Engine(tiny_model("gemma3", seed=1), kv_cache_bytes=4 << 20, block_size=4)
    try:
        with TestClient(create_app(gs.SessionManager(e))) as client:
            r = _chat(client, "high")
            assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert _chat(client, "none").status_code == 200 and _chat(client, "minimal").status_code == 200
            assert _chat(client, "extreme").status_code == 400
            body = {"input": "hi", "max_output_tokens": 4, "reasoning": {"effort": "low", "summary": "auto"}}
            r = client.post("/v1/responses", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning"
            assert client.post("/v1/responses", json=dict(body, reasoning={"effort": "none"})).status_code == 200
            assert client.post("/v1/responses", json=dict(body, reasoning={})).status_code == 200
            r = client.post("/v1/responses", json=dict(body, reasoning=None))
            assert r.status_code == 200 and r.json()["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
    finally:
        e.close()


@pytest.fixture()
def scripted_client(engine):
    tok = engine.model.tokenizer
    scripted = Scripted(engine, thinking_reply(tok, "weigh it", "Fine"))
    with TestClient(create_app(gs.SessionManager(scripted))) as client:
        yield client, scripted, tok


def test_chat_completions_return_reasoning_content_apart(scripted_client):
    client, scripted, tok = scripted_client
    r = _chat(client, "high").json()
    msg = r["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"]) == ("Fine", "weigh it")
    n_thought = len(scripted.tokens) - len(tok.encode("Fine"))
    assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == n_thought
    assert tok.think_id in scripted.prompts[-1]
    thinking_prompt = chat_format(tok).generation_prompt(True)  # <|turn>model\n: the model opens its channel itself
    assert scripted.prompts[-1][-len(thinking_prompt):] == thinking_prompt
    _chat(client)  # thinking off (the default): no <|think|>, the generation prompt ends in an empty channel
    assert tok.think_id not in scripted.prompts[-1] and scripted.prompts[-1][-1] == tok.channel_close_id
    lines = [ln[6:] for ln in _chat(client, "medium", stream=True).text.splitlines() if ln.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in map(json.loads, lines) if c["choices"]]
    thoughts = "".join(d.get("reasoning_content", "") for d in deltas)
    answer = "".join(d.get("content", "") for d in deltas)
    assert (thoughts, answer) == ("weigh it", "Fine")
    first_answer = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" in d for d in deltas[1:first_answer])


def test_responses_return_a_reasoning_item_before_the_message(scripted_client):
    client, scripted, tok = scripted_client
    conv = client.post("/v1/conversations", json={}).json()["id"]
    body = {"input": "hi", "conversation": conv, "reasoning": {"effort": "high"}, "max_output_tokens": 8}
    r = client.post("/v1/responses", json=body).json()
    assert [o["type"] for o in r["output"]] == ["reasoning", "message"]
    assert r["output"][0]["content"] == [{"type": "reasoning_text", "text": "weigh it"}]
    assert r["output_text"] == "Fine" and r["output"][1]["content"][0]["text"] == "Fine"
    assert r["usage"]["output_tokens_details"]["reasoning_tokens"] == len(scripted.tokens) - len(tok.encode("Fine"))
    items = client.get(f"/v1/conversations/{conv}/items", params={"order": "asc"}).json()["data"]
    assert [i["content"][0]["text"] for i in items] == ["hi", "Fine"]  # the history holds no thoughts

    text = client.post("/v1/responses", json=dict(body, stream=True, input="next")).text
    events = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert tok.channel_open_id not in scripted.prompts[-1] and tok.think_id in scripted.prompts[-1]
    first_text = kinds.index("response.output_text.delta")
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert events[2]["item"]["type"] == "reasoning" and events[2]["output_index"] == 0
    assert "response.reasoning_text.done" in kinds[:first_text] and "response.output_item.done" in kinds[:first_text]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["item"]["type"], e["output_index"]) for e in added] == [("reasoning", 0), ("message", 1)]
    thoughts = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert thoughts == "weigh it" and kinds[-1] == "response.completed"
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["id"] == events[2]["item"]["id"]


def test_the_official_client_types_read_the_reasoning(scripted_client):
    from openai.types.chat import ChatCompletion
    from openai.types.responses import ResponseOutputItem, ResponseStreamEvent
    from pydantic import TypeAdapter

    client, _, _ = scripted_client
    chat = ChatCompletion.model_validate(_chat(client, "low").json())
    assert chat.choices[0].message.content == "Fine" and chat.choices[0].message.reasoning_content == "weigh it"
    body = {"input": "hi", "reasoning": {"effort": "high"}, "max_output_tokens": 8}
    resp = client.post("/v1/responses", json=body).json()
    output = [TypeAdapter(ResponseOutputItem).validate_python(o) for o in resp["output"]]
    assert output[0].type == "reasoning" and output[0].content[0].text == "weigh it"
    assert output[1].type == "message" and output[1].content[0].text == "Fine"
    text = client.post("/v1/responses", json=dict(body, stream=True)).text
    adapter = TypeAdapter(ResponseStreamEvent)
    raw = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: ")]
    # the item and text events (those that carry a whole response predate this and are not checked here)
    events = [adapter.validate_python(e) for e in raw if "response" not in e]
    assert {e.type for e in events} >= {"response.reasoning_text.done", "response.content_part.added",
                                         "response.output_item.done", "response.output_text.done"}
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "weigh it"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Fine"
