"""Constrained decoding: JsonPrefix accepts exactly the prefixes of valid JSON (against json.loads), and a JSON-object
reply through the engine and the server is always a JSON prefix, complete and parsed when it stops."""

from __future__ import annotations

import json
import random

import pytest
import torch
from fastapi.testclient import TestClient

import gemma_sessions as gs
from gemma_sessions.constraints import MAX_BLANKS, MAX_DEPTH, JsonObjectConstraint, JsonPrefix
from gemma_sessions.server import create_app
from gemma_sessions.testing import byte_token, tiny_model

GOOD = [b'{}', b'{"a": 1}', b'{"a": [1, 2.5e-3, -0, true, false, null, "x\\n\\u00e9"], "b": {"c": {}}}',
        b'{ "k" : [ ] }', b'{"e": -12.5E+10, "f": [[], [{}]], "g": "\\"q\\"", "h": "caf\xc3\xa9"}', b'{"a":0.0e0}']
BAD = [b'[]', b'1', b' {}', b'{a:1}', b'{"a" 1}', b'{"a":01}', b'{"a":1,}', b'{"a":[1,]}', b'{"a":tru}',
       b'{"a":"\x01"}', b'{"a":1}}', b'{"a":.5}', b'{"a":1.}', b'{"a":-}', b'{"a":"\\x"}', b'{"a":"\\u12G4"}',
       b'{"a":1}x', b'{"a":[1 2]}', b'{"a":1e}', b'{"a":+1}', b'{"a":NaN}']


@pytest.mark.parametrize("doc", GOOD)
def test_valid_objects_and_all_their_prefixes_are_accepted(doc):
    assert json.loads(doc) is not None
    for i in range(len(doc)):
        p = JsonPrefix(object_only=True)
        assert p.feed(doc[:i]) and not p.complete, doc[:i]
    p = JsonPrefix(object_only=True)
    assert p.feed(doc) and p.complete


@pytest.mark.parametrize("doc", BAD)
def test_invalid_texts_are_refused_or_never_complete(doc):
    p = JsonPrefix(object_only=True)
    assert not (p.feed(doc) and p.complete)


def test_random_texts_agree_with_json_loads():
    rng = random.Random(0)
    alphabet = b'{}[]:," \\-0123456789.eE+tfrulnasx\n'
    complete = 0
    for _ in range(20000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        p = JsonPrefix()
        ok = p.feed(data)
        try:
            json.loads(data)
            valid = bool(data.strip())
        except ValueError:
            valid = False
        assert (ok and p.complete) == valid or (valid and data.count(b" ") + data.count(b"\n") > MAX_BLANKS), data
        complete += valid
    assert complete > 500  # the check saw many valid texts, not only refusals


def test_blank_space_and_nesting_are_capped():
    p = JsonPrefix(object_only=True)
    assert p.feed(b'{' + b' ' * MAX_BLANKS) and not p.copy().feed(b' ')
    assert p.feed(b'"a": 1}')
    deep = JsonPrefix()
    assert deep.feed(b'[' * MAX_DEPTH) and not deep.feed(b'[')


def test_a_step_whose_likely_tokens_are_all_refused_picks_among_the_single_bytes():
    """The sampler tries its 256 likeliest tokens, then the constraint's one-byte tokens: never the whole vocabulary."""
    from gemma_sessions.sampling import CONSTRAINED_CANDIDATES, Sampler, SamplingParams

    n = 5000
    vocab = {t: b"x" * 3 for t in range(n)}  # multi-byte junk: never allowed in JSON outside a string
    vocab.update({4000: b"{", 4001: b"}", 4002: b'"'})
    logits = torch.arange(n, dtype=torch.float32).flip(0)  # token 0 the likeliest, the bytes far down
    c = JsonObjectConstraint(vocab.__getitem__, stop_ids=[], single_bytes=[4000, 4001, 4002])
    calls = []
    allows = c.allows
    c.allows = lambda t: calls.append(t) or allows(t)
    assert Sampler(SamplingParams(temperature=0))(logits, (), c) == 4000
    assert len(calls) <= CONSTRAINED_CANDIDATES + 3


def test_the_object_constraint_allows_text_tokens_then_only_the_stop():
    vocab = {1: b"", 2: b"{", 3: b'"a"', 4: b":", 5: b" 1", 6: b"}", 7: b"x", 8: b'"'}
    c = JsonObjectConstraint(vocab.__getitem__, stop_ids=[9], special=[10])
    assert [t for t in range(1, 11) if c.allows(t)] == [2]  # the reply opens with "{"
    for t in (2, 3, 4, 5):
        assert c.allows(t) and c.only() is None
        c.advance(t)
    assert not c.allows(9) and not c.allows(10) and c.allows(6) and not c.allows(7)
    c.advance(6)
    assert c.only() == {9} and c.allows(9) and not c.allows(6) and not c.allows(10)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=1)


def test_engine_json_replies_are_json_and_stop_once_complete(model):
    tok = model.tokenizer
    close = {byte_token(tok, "}"): 30.0, byte_token(tok, '"'): 8.0}  # a random model, nudged to close what it opens
    stop = set(model.stop_ids)

    def token_bytes(t: int) -> bytes:
        return tok.token_bytes(t, skip_special=False) if t < tok.vocab_size else b""

    control = [i for i in range(tok.vocab_size) if tok.is_control(i)]
    single = [i for i in range(tok.vocab_size) if i not in control and len(token_bytes(i)) == 1]

    def constraint():
        return JsonObjectConstraint(token_bytes, stop, control, single)

    with gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4) as engine:
        for params in (gs.SamplingParams(temperature=0, max_tokens=40),
                       gs.SamplingParams(temperature=1.0, seed=4, max_tokens=40, logit_bias=tuple(close.items()))):
            out = engine.submit([2, 50, 60, 70], params, constraint=constraint()).result()
            text = tok.decode(out.token_ids).encode()
            assert JsonPrefix(object_only=True).feed(text), text
            if out.finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
        forced = engine.submit([2, 50, 60, 70], gs.SamplingParams(temperature=0, max_tokens=40,
                                                                  logit_bias=((byte_token(tok, "}"), 100.0),)),
                               constraint=constraint()).result()
        assert forced.finish_reason == "stop" and tok.decode(forced.token_ids) == "{}"


def test_the_server_answers_json_object_and_refuses_what_a_schema_cannot_enforce(model):
    engine = gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "temperature": 0,
            "response_format": {"type": "json_object"}}
    with TestClient(create_app(gs.SessionManager(engine))) as client:
        r = client.post("/v1/chat/completions", json={**body, "n": 2})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            text = choice["message"]["content"].encode()
            assert text.startswith(b"{") and JsonPrefix(object_only=True).feed(text)
        brace = str(byte_token(model.tokenizer, "}"))
        forced = client.post("/v1/chat/completions", json={**body, "logit_bias": {brace: 100}})
        assert forced.json()["choices"][0]["message"]["content"] == "{}"
        assert forced.json()["choices"][0]["finish_reason"] == "stop"
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
        refused = client.post("/v1/chat/completions", json={**body, "response_format": schema})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"
        assert "'uniqueItems'" in refused.json()["error"]["message"]
    engine.close()


def test_responses_and_sessions_take_json_mode_per_turn(model):
    engine = gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4)
    with TestClient(create_app(gs.SessionManager(engine))) as client:
        conv = client.post("/v1/conversations", json={}).json()["id"]
        texts = []
        for fmt in ({"type": "json_object"}, {"type": "text"}, {"type": "json_object"}):
            r = client.post("/v1/responses", json={"conversation": conv, "input": "hi", "max_output_tokens": 12,
                                                   "temperature": 0, "text": {"format": fmt}})
            assert r.status_code == 200, r.text
            texts.append(r.json()["output"][-1]["content"][0]["text"])
        for text in (texts[0], texts[2]):
            assert text.startswith("{") and JsonPrefix(object_only=True).feed(text.encode()), text
        assert not texts[1].startswith("{")  # the plain turn between them is not constrained
        items = client.get(f"/v1/conversations/{conv}/items", params={"order": "asc"}).json()["data"]
        assert [i["content"][0]["text"] for i in items if i["role"] == "assistant"] == texts  # in the history
        schema = {"type": "json_schema", "name": "x", "schema": {"type": "object", "minProperties": 1}}
        refused = client.post("/v1/responses", json={"input": "hi", "text": {"format": schema}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "text"
    engine.close()
