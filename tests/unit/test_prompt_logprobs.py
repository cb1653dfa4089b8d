"""Prompt log-probabilities (``Engine.score``; ``/v1/completions`` with ``echo`` and ``logprobs``, as lm-eval's
loglikelihood tasks send it): each token's log-probability given those before it equals the log-softmax of the
model's own logits for the whole prompt, scoring interleaves with other requests without changing theirs, and the
HTTP shapes are OpenAI's legacy ones."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

import gemma_sessions as gs
import gemma_sessions.engine.engine as engine_module
from gemma_sessions.server import create_app
from gemma_sessions.server.app import status_of
from gemma_sessions.testing import tiny_gemma4_model, tiny_griffin_model, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=2)


def _reference(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the logits of the whole prompt in one forward: [len - 1, vocab], row i for token i + 1."""
    with torch.inference_mode():
        logits = model.net.step(torch.tensor(ids), model.net.new_sequence(len(ids)), last_only=False)
    return torch.log_softmax(logits[:-1].float(), dim=-1)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, 250, (n - 1,), generator=g).tolist()


@pytest.mark.parametrize("chunk", [engine_module.SCORE_CHUNK, 5, 64])
def test_scores_equal_the_log_softmax_of_the_whole_prompts_logits(model, chunk):
    ids = _prompt(engine_module.SCORE_CHUNK * 2 + 7, 0)  # three default chunks
    ref = _reference(model, ids)
    with gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4, score_chunk=chunk) as engine:
        scored = engine.score(ids, top=5)
        assert engine.stats()["scored_tokens"] == len(ids)
    assert scored[0] is None and len(scored) == len(ids)
    for i, x in enumerate(scored[1:]):
        assert x.token == ids[i + 1]
        assert x.logprob == pytest.approx(float(ref[i, ids[i + 1]]), abs=1e-4)
        assert [t for t, _ in x.top] == torch.topk(ref[i], 5).indices.tolist()


@pytest.mark.parametrize("make", [lambda: tiny_griffin_model(seed=3), lambda: tiny_gemma4_model(seed=3),
                                  lambda: tiny_model("gemma2", seed=3)], ids=["recurrentgemma", "gemma4", "gemma2"])
def test_every_architecture_scores_its_prompts(make):
    other = make()
    ids = _prompt(engine_module.SCORE_CHUNK + 9, 4)
    ref = _reference(other, ids)
    with gs.Engine(other, kv_cache_bytes=8 << 20, block_size=4) as engine:
        scored = engine.score(ids, top=1)
    assert [x.logprob for x in scored[1:]] == pytest.approx([float(ref[i, t]) for i, t in enumerate(ids[1:])],
                                                            abs=1e-4)


@pytest.mark.parametrize("chunk", [engine_module.SCORE_CHUNK, 48])
def test_scoring_interleaves_with_generation_and_changes_no_ones_tokens(model, chunk):
    prompts = [_prompt(20 + i, 10 + i) for i in range(6)]
    long = [_prompt(engine_module.SCORE_CHUNK * 4, 1 + i) for i in range(4)]  # chunks alone and between steps
    params = gs.SamplingParams(temperature=0, max_tokens=12)
    with gs.Engine(model, kv_cache_bytes=16 << 20, block_size=4, score_chunk=chunk) as engine:
        alone = [engine.submit(p, params).result().token_ids for p in prompts]
        alone_scores = [[x and x.logprob for x in engine.score(p, 2)] for p in long]
        with concurrent.futures.ThreadPoolExecutor(10) as pool:  # 4 scorers and 6 generations, all at once
            scores = [pool.submit(engine.score, p, 2) for p in long]
            gens = [pool.submit(lambda p=p: engine.submit(p, params).result().token_ids) for p in prompts]
            assert [g.result() for g in gens] == alone
            assert [[x and x.logprob for x in s.result()] for s in scores] == alone_scores


def test_the_score_chunk_is_checked(model):
    for bad in (0, engine_module.MAX_SCORE_CHUNK + 1):
        with pytest.raises(gs.InvalidRequestError, match="score_chunk"):
            gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4, score_chunk=bad)


def test_bad_prompts_fail_alone_and_the_queue_is_bounded(model, monkeypatch):
    with gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4) as engine:
        for bad, err in (([], gs.InvalidRequestError), ([2, 10 ** 6], gs.InvalidRequestError),
                         (list(range(3, 300)), gs.ContextLengthError)):
            with pytest.raises(err):
                engine.score(bad)
        with pytest.raises(gs.InvalidRequestError):
            engine.score([2, 5], top=21)
        monkeypatch.setattr(engine_module, "MAX_SCORING_JOBS", 2)
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            with engine.paused():  # the five arrive together: two are queued, three refused
                futures = [pool.submit(engine.score, _prompt(40, i)) for i in range(5)]
                time.sleep(0.5)  # (each thread only puts its job on the loop's queue)
            outcomes = [f.exception() for f in futures]
        assert sum(isinstance(e, gs.EngineBusyError) for e in outcomes) == 3
        assert sum(e is None for e in outcomes) == 2
        assert engine.submit([2, 5, 6], gs.SamplingParams(max_tokens=3)).result().finish_reason  # the loop lives
    assert status_of(gs.EngineBusyError("full")) == 503  # over HTTP: retry later


def test_completions_echo_with_logprobs_as_lm_eval_sends_it(model):
    engine = gs.Engine(model, kv_cache_bytes=8 << 20, block_size=4)
    ids = _prompt(50, 5)
    ref = _reference(model, ids)
    with TestClient(create_app(gs.SessionManager(engine))) as client:
        # lm-eval's loglikelihood request: one tokenized prompt in a list, echo, logprobs 1, max_tokens 1
        r = client.post("/v1/completions", json={"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
                                                 "temperature": 0, "seed": 1234})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
            greedy = int(torch.argmax(ref[i - 1])) == ids[i]
            assert (lp["token_logprobs"][i] >= max(lp["top_logprobs"][i].values()) - 1e-6) == greedy
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        text = r.json()["choices"][0]["text"]
        assert text.startswith(model.tokenizer.decode(ids))
        assert "".join(lp["tokens"][:len(ids)]) == model.tokenizer.decode(ids)
        # max_tokens 0: the prompt scored, nothing generated (older lm-eval); streamed: the same object
        zero = client.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 3, "max_tokens": 0})
        assert zero.status_code == 200, zero.text
        z = zero.json()["choices"][0]
        assert z["logprobs"]["token_logprobs"] == lp["token_logprobs"][:len(ids)]
        assert z["finish_reason"] == "length" and zero.json()["usage"]["completion_tokens"] == 0
        with client.stream("POST", "/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 3,
                                                            "max_tokens": 4, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        first = chunks[0]["choices"][0]
        assert first["text"] == model.tokenizer.decode(ids) and first["logprobs"] == z["logprobs"]
        # a string prompt: the texts of the tokens concatenate to the echoed prompt (<bos> adds none)
        s = client.post("/v1/completions", json={"prompt": "abc def", "echo": True, "logprobs": 0, "max_tokens": 0})
        slp = s.json()["choices"][0]["logprobs"]
        assert "".join(slp["tokens"]) == "abc def" and slp["text_offset"][0] == 0 and slp["tokens"][0] == ""
        metrics = client.get("/metrics").text
        scored = [line for line in metrics.splitlines() if line.startswith("gemma_prompt_tokens_scored_total")]
        assert scored and float(scored[0].split()[-1]) >= 3 * len(ids)  # the three scored requests above
        for body, param in (({"prompt": ids, "max_tokens": 0}, None), ({"prompt": [ids, ids], "echo": True}, None),
                            ({"prompt": [[]], "echo": True}, None),
                            ({"prompt": [2, 10 ** 6], "echo": True, "logprobs": 1}, "prompt")):
            bad = client.post("/v1/completions", json=body)
            assert bad.status_code == 400, (body, bad.text)
            assert param is None or bad.json()["error"]["param"] == param
    engine.close()
