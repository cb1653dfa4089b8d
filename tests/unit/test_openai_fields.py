"""OpenAI fields that change a reply: penalties, logit_bias and logprobs are honoured (the sampler's arithmetic, the
engine's and generate()'s tokens, the HTTP shapes); what the server cannot honour is refused by name, never
silently ignored."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient

import gemma_sessions as gs
from gemma_sessions.generate import generate_tokens
from gemma_sessions.sampling import Sampler, SamplingParams, TokenLogprob, token_logprob
from gemma_sessions.server import create_app
from gemma_sessions.testing import tiny_model

PROMPT = [2, 50, 60, 70, 80, 90]


def test_penalties_follow_openai_formula_over_generated_tokens_only():
    logits = torch.zeros(10)
    logits[3], logits[4], logits[5] = 3.0, 2.9, 1.5
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25))
    # 3 twice, 4 once: 3 -> 3 - 2 * 0.5 - 0.25 = 1.75; 4 -> 2.9 - 0.5 - 0.25 = 2.15; 5 stays 1.5
    assert s(logits, [3, 4, 3]) == 4
    adjusted = s._adjusted(logits, [3, 4, 3])
    assert adjusted[3].item() == pytest.approx(1.75) and adjusted[4].item() == pytest.approx(2.15)
    assert adjusted[5].item() == 1.5 and logits[3].item() == 3.0  # the caller's row is not changed
    # the counts grow with the list from call to call, and a new (shorter) list is counted afresh
    assert s(logits, [3, 4, 3, 4, 4]) == 3  # 4 -> 2.9 - 1.5 - 0.25 = 1.15 < 3's 1.75
    assert s(logits, []) == 3
    # negative penalties favour repeats
    r = Sampler(SamplingParams(temperature=0, presence_penalty=-2.0))
    assert r(logits, [5]) == 5


def test_logit_bias_moves_the_greedy_and_the_sampled_token():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    worst = int(logits.argmin())
    assert Sampler(SamplingParams(temperature=0, logit_bias=((worst, 100.0),)))(logits) == worst
    sampled = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3, logit_bias=((worst, 100.0),)))
    assert {sampled(logits) for _ in range(20)} == {worst}
    best = int(logits.argmax())
    banned = Sampler(SamplingParams(temperature=0, logit_bias=((best, -100.0),)))
    assert banned(logits) != best


def test_token_logprob_is_the_log_softmax_with_the_top_alternatives():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1)) * 4
    ref = torch.log_softmax(logits.double(), -1)
    x = token_logprob(logits, 17, 5)
    assert x.token == 17 and x.logprob == pytest.approx(ref[17].item(), abs=1e-5)
    ids = [t for t, _ in x.top]
    assert ids == torch.topk(ref, 5).indices.tolist()
    assert [lp for _, lp in x.top] == pytest.approx(torch.topk(ref, 5).values.tolist(), abs=1e-5)
    assert token_logprob(logits, 17, 0).top == ()


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                                 dict(presence_penalty=math.nan), dict(frequency_penalty=True),
                                 dict(logit_bias=((1, 101.0),)), dict(logit_bias=((-1, 1.0),)),
                                 dict(logit_bias=((1, 1.0), (1, 2.0))),
                                 dict(logit_bias=((True, 1.0),)), dict(logit_bias=[(1, 1.0)]),
                                 dict(logit_bias=tuple((i, 1.0) for i in range(1025))), dict(logprobs=21),
                                 dict(logprobs=-1), dict(logprobs=1.0)])
def test_invalid_new_fields_are_refused(bad):
    with pytest.raises(gs.InvalidRequestError):
        SamplingParams(**bad)


def test_params_round_trip_through_their_dict_and_refuse_forged_ones():
    p = SamplingParams(temperature=0.5, presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((7, -5.0), (9, 2.5)),
                       logprobs=3, stop=("###",))
    d = json.loads(json.dumps(p.to_dict()))
    assert SamplingParams.from_dict(d) == p
    assert SamplingParams.from_dict({"temperature": 0.3, "future_field": 1}) == SamplingParams(temperature=0.3)
    for forged in ({"logit_bias": [[1, 2, 3]]}, {"logit_bias": "x"}, {"logit_bias": [[1, 2.0]] * 2000},
                   {"stop": "abc"}, {"stop": None}, {"logprobs": "3"}):
        with pytest.raises(gs.InvalidRequestError):
            SamplingParams.from_dict(forged)


def test_plain_greedy_alone_takes_the_greedy_head():
    assert not SamplingParams(temperature=0).needs_logits
    for p in (dict(temperature=0.7), dict(temperature=0, presence_penalty=0.1), dict(temperature=0, logprobs=0),
              dict(temperature=0, logit_bias=((1, 1.0),))):
        assert SamplingParams(**p).needs_logits


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=1)


def _reference_logits(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The logits before each of ``tokens``, one position at a time straight on the model."""
    net = model.net
    state = net.new_sequence(len(prompt) + len(tokens) + 1)
    out, ids = [], torch.tensor(prompt)
    with torch.inference_mode():
        for t in tokens:
            out.append(net.step(ids, state, last_only=True)[0].float())
            ids = torch.tensor([t])
    return out


def test_engine_logprobs_are_the_models_and_keep_greedy_tokens(model):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4) as engine:
        plain = engine.submit(PROMPT, params).result()
        streams = [engine.submit(PROMPT, params.replace(logprobs=3)) for _ in range(3)]  # batched together
        outs = [s.result() for s in streams]
        assert streams[0].token_logprobs(2, 4) == outs[0].logprobs[2:4]
    assert plain.logprobs is None
    ref = _reference_logits(model, PROMPT, plain.token_ids)
    for out in outs:
        assert out.token_ids == plain.token_ids  # float32 weights: the reported top-1 is the exact greedy token
        assert len(out.logprobs) == len(out.token_ids)
        for x, token, logits in zip(out.logprobs, out.token_ids, ref):
            lp = torch.log_softmax(logits, -1)
            assert isinstance(x, TokenLogprob) and x.token == token and len(x.top) == 3
            assert x.logprob == pytest.approx(lp[token].item(), abs=1e-4)
            assert x.top[0][0] == token and x.top[0][1] == pytest.approx(x.logprob, abs=1e-6)
            assert [t for t, _ in x.top] == torch.topk(lp, 3).indices.tolist()
    for other in outs[1:]:  # batched rows alike (to float32 rounding: a prompt's rows share a product with others)
        for a, b in zip(outs[0].logprobs, other.logprobs):
            assert a.token == b.token and [t for t, _ in a.top] == [t for t, _ in b.top]
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


@pytest.mark.parametrize("extra", [dict(temperature=0, frequency_penalty=1.5, presence_penalty=0.5),
                                   dict(temperature=0, logit_bias=((77, 4.0), (90, -100.0))),
                                   dict(temperature=0.9, seed=11, presence_penalty=1.0, logit_bias=((60, 3.0),))])
def test_engine_and_generate_apply_penalties_and_bias_alike(model, extra):
    params = SamplingParams(max_tokens=16, ignore_eos=True, **extra)
    expected = list(generate_tokens(model, PROMPT, params))
    with gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4) as engine:
        got = [engine.submit(PROMPT, params) for _ in range(2)]  # batched
        assert [g.result().token_ids for g in got] == [expected, expected]
        plain = engine.submit(PROMPT, SamplingParams(max_tokens=16, ignore_eos=True, temperature=extra["temperature"],
                                                     seed=extra.get("seed"))).result().token_ids
    assert plain != expected  # the fields changed something (else the test would prove nothing)
    if "frequency_penalty" in extra:
        assert max(expected.count(t) for t in set(expected)) <= max(plain.count(t) for t in set(plain))
    if "logit_bias" in extra and extra["temperature"] == 0:
        assert 90 not in expected and 90 in plain


def test_a_bias_outside_the_vocabulary_is_refused_before_generating(model):
    with gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4) as engine:
        with pytest.raises(gs.InvalidRequestError, match="logit_bias"):
            engine.submit(PROMPT, SamplingParams(logit_bias=((model.config.vocab_size, 1.0),)))
        assert engine.submit(PROMPT, SamplingParams(temperature=0, max_tokens=2)).result().token_ids  # still serving
    with pytest.raises(gs.InvalidRequestError, match="logit_bias"):  # generate() checks it the same way
        list(generate_tokens(model, PROMPT, SamplingParams(logit_bias=((model.config.vocab_size, 1.0),))))


@pytest.fixture(scope="module")
def client(model):
    engine = gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4)
    with TestClient(create_app(gs.SessionManager(engine))) as c:
        yield c
    engine.close()


CHAT = {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0, "max_tokens": 8}


def _stream(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_chat_logprobs_plain_and_streamed_agree(client):
    body = {**CHAT, "logprobs": True, "top_logprobs": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    content = choice["logprobs"]["content"]
    assert len(content) == usage["completion_tokens"] > 0
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and e["logprob"] <= 0
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy: the chosen token is the most likely
        assert all(isinstance(b, int) and 0 <= b < 256 for b in e["bytes"])
    events = _stream(client, body)
    streamed = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert len(streamed) == len(content)  # the same entries, to float32 rounding (the second prompt is cached)
    for a, b in zip(streamed, content):
        assert [a["bytes"]] + [t["bytes"] for t in a["top_logprobs"]] == \
            [b["bytes"]] + [t["bytes"] for t in b["top_logprobs"]]
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
    assert events[-1]["usage"]["completion_tokens"] == len(streamed)
    plain = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
    assert plain["logprobs"] is None and plain["message"]["content"] == choice["message"]["content"]


def test_chat_logit_bias_and_penalties_reach_the_sampler(client, model):
    forced = 60
    r = client.post("/v1/chat/completions", json={**CHAT, "logit_bias": {str(forced): 100}, "logprobs": True})
    assert r.status_code == 200, r.text
    assert {e["bytes"] == list(model.tokenizer.token_bytes(forced, skip_special=False))
            for e in r.json()["choices"][0]["logprobs"]["content"]} == {True}
    ok = client.post("/v1/chat/completions", json={**CHAT, "presence_penalty": 1.0, "frequency_penalty": -0.5})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("extra, param", [
    (dict(top_logprobs=2), None),  # without logprobs
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(logit_bias={"abc": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(logit_bias={"999999": 1}), None),  # beyond the vocabulary: the engine's refusal
    (dict(tools=[{"type": "code_interpreter"}]), "tools"),  # function tools are served (test_tools.py)
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="sometimes"), "tool_choice"),
    (dict(functions=[{"name": "f"}]), "functions"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"pattern": "(?=a)"}}}),
     "response_format"),
    (dict(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}), "modalities"),
    (dict(web_search_options={}), "web_search_options"),
])
def test_chat_fields_it_cannot_honour_are_400s_naming_them(client, extra, param):
    r = client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # nothing else harmed


def test_chat_fields_that_ask_for_nothing_are_accepted(client):
    for extra in (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none"), dict(tools=[]),
                  dict(response_format={"type": "text"}), dict(logprobs=False), dict(logit_bias={}),
                  dict(modalities=["text"])):
        r = client.post("/v1/chat/completions", json={**CHAT, **extra})
        assert r.status_code == 200, (extra, r.text)


@pytest.mark.parametrize("extra, param", [
    (dict(tools=[{"type": "web_search"}]), "tools"),  # function tools are served (tests/unit/test_tools.py)
    (dict(tools=[{"type": "function", "name": "f"}], include=["message.output_text.logprobs"]), "include"),
    (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}), "text"),
    (dict(include=["message.input_text.logprobs"]), "include"),
    (dict(include=["message.output_text.logprobs"], top_logprobs=21), "top_logprobs"),
])
def test_responses_fields_it_cannot_honour_are_400s(client, extra, param):
    r = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 4, "store": False, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 4, "store": False,
                                            "text": {"format": {"type": "text"}}, "tools": []})
    assert ok.status_code == 200, ok.text


def test_responses_logprobs_equal_chats_and_stream_as_they_read_whole(client):
    """include message.output_text.logprobs: the same prompt and greedy tokens as Chat Completions, so the same
    logprobs; streamed, the deltas' logprobs add up to the final ones; the stored response keeps none."""
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    body = {"input": "hello there", "max_output_tokens": 8, "temperature": 0, **asked}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    part = r.json()["output"][-1]["content"][0]
    chat = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}).json()
    expected = chat["choices"][0]["logprobs"]["content"]
    assert part["text"] == chat["choices"][0]["message"]["content"]
    assert [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in part["logprobs"]] == [
        (e["token"], [t["token"] for t in e["top_logprobs"]]) for e in expected]
    assert [e["logprob"] for e in part["logprobs"]] == pytest.approx([e["logprob"] for e in expected], abs=1e-5)
    assert len(part["logprobs"]) == r.json()["usage"]["output_tokens"]
    stored = client.get(f"/v1/responses/{r.json()['id']}").json()["output"][-1]["content"][0]
    assert "logprobs" not in stored and stored["text"] == part["text"]
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert [x for d in deltas for x in d["logprobs"]] == done["logprobs"]
    assert [e["logprob"] for e in done["logprobs"]] == pytest.approx([e["logprob"] for e in part["logprobs"]],
                                                                     abs=1e-5)
    plain = client.post("/v1/responses", json={"input": "hello there", "max_output_tokens": 8, "temperature": 0})
    assert "logprobs" not in plain.json()["output"][-1]["content"][0]  # only when asked


def _completion_stream(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_completions_continue_a_raw_prompt_as_generate_does(client, model):
    body = {"prompt": "the letters", "temperature": 0, "max_tokens": 10}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    choice = out["choices"][0]
    assert choice["text"] == gs.generate(model, "the letters", temperature=0, max_tokens=10)
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    ids = model.tokenizer.encode("the letters", add_bos=True)
    assert out["usage"]["prompt_tokens"] == len(ids)
    # token ids and a one-string list are the same prompt; echo puts the prompt before the completion
    assert client.post("/v1/completions", json={**body, "prompt": ids}).json()["choices"][0]["text"] == choice["text"]
    assert client.post("/v1/completions", json={**body, "prompt": ["the letters"]}).json()["choices"][0]["text"] == \
        choice["text"]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "the letters" + choice["text"]
    default = client.post("/v1/completions", json={"prompt": "the letters", "temperature": 0}).json()
    assert default["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens for this route


def test_completions_logprobs_and_stream(client):
    body = {"prompt": "the letters", "temperature": 0, "max_tokens": 10, "logprobs": 2, "frequency_penalty": 0.5}
    out = client.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    n = out["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert all(1 <= len(top) <= 2 and max(top.values()) <= 0 for top in lp["top_logprobs"])
    events = _completion_stream(client, body)
    assert "".join(c["text"] for ev in events for c in ev["choices"]) == choice["text"]
    streamed = [t for ev in events for c in ev["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert streamed == lp["tokens"] and events[-1]["usage"]["completion_tokens"] == n
    echoed = _completion_stream(client, {**body, "logprobs": None, "echo": True})
    assert "".join(c["text"] for ev in echoed for c in ev["choices"]) == "the letters" + choice["text"]


@pytest.mark.parametrize("extra, param", [
    (dict(suffix="end"), "suffix"),
    (dict(max_tokens=0), None),  # (without echo: nothing to answer)
    (dict(prompt=["a", "b"]), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[1, 10**9]), "prompt"),  # a token id beyond the vocabulary
    (dict(logprobs=21), "logprobs"),
    (dict(n=17), "n"),
    (dict(best_of=2), "best_of"),
    (dict(prompt="x" * 10**6), "prompt"),
])
def test_completions_refusals_name_the_field(client, extra, param):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tokenize_detokenize_and_the_model_object(client, model):
    tok = model.tokenizer
    r = client.post("/tokenize", json={"prompt": "the letters"})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("the letters", add_bos=True)
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] > 0
    bare = client.post("/tokenize", json={"prompt": "the letters", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode("the letters")
    chat = client.post("/tokenize", json={"messages": CHAT["messages"]}).json()
    assert chat["count"] == client.post("/v1/chat/completions", json=CHAT).json()["usage"]["prompt_tokens"]
    back = client.post("/detokenize", json={"tokens": bare["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == "the letters"
    for path, body, param in (("/tokenize", {}, None),
                              ("/tokenize", {"prompt": "a", "messages": CHAT["messages"]}, None),
                              ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/tokenize", {"prompt": "x" * 10**6}, "prompt"),
                              ("/tokenize", {"messages": [{"role": "user", "content": [{}]}]}, "messages")):
        bad = client.post(path, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (path, body, bad.text)
    name = client.get("/v1/models").json()["data"][0]["id"]
    one = client.get(f"/v1/models/{name}")
    assert one.status_code == 200 and one.json()["id"] == name and one.json()["object"] == "model"
    missing = client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def _texts_by_index(events: list[dict], key: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for ev in events:
        for c in ev["choices"]:
            piece = c["delta"].get("content", "") if key == "delta" else c["text"]
            out[c["index"]] = out.get(c["index"], "") + (piece or "")
    return out


def test_n_choices_share_the_prompt_and_stream_interleaved(client):
    one = client.post("/v1/chat/completions", json=CHAT).json()
    greedy = client.post("/v1/chat/completions", json={**CHAT, "n": 3}).json()
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in greedy["choices"]} == {one["choices"][0]["message"]["content"]}
    assert greedy["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt once
    assert greedy["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    sampled = {**CHAT, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 5, "n": 4, "max_tokens": 12}
    a = client.post("/v1/chat/completions", json=sampled).json()["choices"]
    b = client.post("/v1/chat/completions", json=sampled).json()["choices"]
    texts = [c["message"]["content"] for c in a]
    assert texts == [c["message"]["content"] for c in b]  # seeded: reproducible
    assert len(set(texts)) > 1  # choice i has seed 5 + i
    events = _stream(client, sampled)
    assert _texts_by_index(events, "delta") == dict(enumerate(texts))
    finished = [c["index"] for ev in events for c in ev["choices"] if c.get("finish_reason")]
    assert sorted(finished) == [0, 1, 2, 3]
    assert events[-1]["usage"]["completion_tokens"] == sum(
        len(c["logprobs"]["content"]) for c in client.post(
            "/v1/chat/completions", json={**sampled, "logprobs": True}).json()["choices"])
    comp = {"prompt": "the letters", "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 9, "n": 2, "max_tokens": 6}
    plain = [c["text"] for c in client.post("/v1/completions", json=comp).json()["choices"]]
    assert _texts_by_index(_completion_stream(client, comp), "text") == dict(enumerate(plain))


def test_metrics_count_prompts_held_for_a_shared_prefix(client):
    text = client.get("/metrics").text
    assert "gemma_prompt_steps_held_for_prefix_total" in text


def test_many_threads_with_logprobs_penalties_and_bias_get_their_own_results(model):
    """16 threads submit at once, each with its own penalties, bias and logprobs, and read their logprobs while the
    engine appends them: each gets what it gets alone."""
    import threading

    def params(i: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=0.25 * (i % 4),
                              logit_bias=((60 + i, 3.0),), logprobs=i % 3)

    prompts = [PROMPT + [100 + i] for i in range(16)]
    with gs.Engine(model, kv_cache_bytes=16 << 20, block_size=4) as engine:
        alone = [engine.submit(p, params(i)).result() for i, p in enumerate(prompts)]
        got: list = [None] * 16
        barrier = threading.Barrier(16)

        def worker(i: int) -> None:
            barrier.wait()
            stream = engine.submit(prompts[i], params(i))
            seen = []
            for n, _ in enumerate(stream, 1):
                seen += stream.token_logprobs(len(seen), n)  # each token's entry is there once it is yielded
            got[i] = (stream.result(), seen)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, (out, seen) in enumerate(got):
        assert out.token_ids == alone[i].token_ids
        assert [x.token for x in seen] == out.token_ids == [x.token for x in out.logprobs]
        assert all(len(x.top) == i % 3 for x in seen)
        for a, b in zip(seen, alone[i].logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
