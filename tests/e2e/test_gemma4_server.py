"""A tiny Gemma 4 served by a real `gemma-sessions serve` process from an HF directory in the published layout
(``Gemma4ForConditionalGeneration``: text settings under ``text_config``, weights under ``model.language_model.``),
driven by the official openai client: a multi-turn conversation reusing its KV, reasoning off and on with the
thoughts returned apart from the answer, and the conversation continued from its saved KV after a SIGTERM restart.

No real Gemma 4 weights are reachable here, and random weights never think, so the directory holds a model that
does: every layer runs (KV sharing, k_eq_v, MoE, PLE, a 5-token window; random weights) but writes into the residual
stream through post-norms of weight 0.01, so the next token is decided by the current token's embedding through the
final norm (:func:`_successor_weights`): after ``<|turn>model\\n`` it writes ``<|channel>h i<channel|>OK<turn|>`` (a
thought "h i", the answer "OK"); after the empty thought channel of thinking off, ``OK<turn|>``.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import save_file

from gemma_sessions.config_gemma4 import Gemma4Config
from gemma_sessions.testing import (random_gemma4_tensors, tiny_gemma4_hf_config, tiny_gemma4_tokenizer,
                                    write_sentencepiece_model)

from servers import KEY_A, Server, free_port

pytestmark = pytest.mark.slow

NAME = "gemma4-tiny"
BLOCK = 16  # the engine's default page size (serve has no option for it)
# The generation prompt's empty thought channel (thinking off): <|channel>, "thought" (7 letter tokens here), "\n",
# <channel|>. History drops it (Gemma 4's template), so a turn's KV is reusable up to just before it.
DROPPED = 10
Q1 = "the first question, asked at some length so that its prompt spans several pages of the cache"
Q2 = "a second one, as long, so the conversation's history is longer than a few pages by now"
# transformers keeps these without a ".weight" suffix (parameters, not modules)
_NO_SUFFIX = ("layer_scalar", "router.scale", "router.per_expert_scale", "experts.gate_up_proj", "experts.down_proj")
# Branch outputs into the residual stream: their norms' weights, made small (see the module docstring).
_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm", "post_per_layer_input_norm")


def _successor_weights(tensors: dict[str, torch.Tensor], chain: list[int], hidden: int) -> None:
    """Make ``chain[i + 1]`` the greedy successor of ``chain[i]``.

    The logits of a token t whose stream is its own embedding are ``<E[j], w * E[t]> * c`` (the tied head over the
    final norm, weight w, c > 0): a symmetric form in (j, t). Link i (chain[i - 1] -> chain[i]) gets its own dim d_i,
    set to 1 in both tokens' embeddings (0 elsewhere), with norm weight i + 1, increasing along the chain, so a token's successor
    (weight i + 2) beats its predecessor (i + 1); each chain token also has a private dim of norm weight -20, so it
    never follows itself; every other token is 0 on these dims (logit 0 < 2).
    """
    links, private = range(len(chain) - 1), range(len(chain) - 1, 2 * len(chain) - 1)
    assert 2 * len(chain) - 1 <= hidden
    embed, norm = tensors["embed_tokens"], tensors["norm"]
    embed[:, :2 * len(chain) - 1] = 0.0
    for i, token in enumerate(chain):
        embed[token] = 0.0  # nothing else in common with another token
        if i > 0:
            embed[token, links[i - 1]] = 1.0
        if i < len(chain) - 1:
            embed[token, links[i]] = 1.0
        embed[token, private[i]] = 1.0
    norm[:] = 1.0
    norm[list(links)] = torch.arange(len(links), dtype=norm.dtype) + 2.0
    norm[list(private)] = -20.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4")
    text = tiny_gemma4_hf_config("all")
    config = Gemma4Config.from_hf_config(text)
    tensors = random_gemma4_tensors(config, seed=2)
    for name in tensors:
        if name.endswith("layer_scalar"):
            tensors[name] = torch.ones_like(tensors[name])  # a negative scalar would flip the stream's sign
        if name.endswith(_POST_NORMS):
            tensors[name] = torch.full_like(tensors[name], 0.01)
    tok = tiny_gemma4_tokenizer(text["vocab_size"])
    chain = [tok.token_id(p) for p in ("\n", "<|channel>", "h", "\u2581i", "<channel|>", "O", "K", "<turn|>")]
    _successor_weights(tensors, chain, text["hidden_size"])
    out = {"model.language_model." + k + ("" if k.endswith(_NO_SUFFIX) else ".weight"): v.contiguous()
           for k, v in tensors.items()}
    out["model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"] = torch.zeros(8, 8)  # skipped
    save_file(out, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 8}, "tie_word_embeddings": True}))
    write_sentencepiece_model(path / "tokenizer.model", tok)
    return path


def _serve(store, model_dir) -> Server:
    return Server(store, free_port(), ["--model", str(model_dir), "--dtype", "float32", "--served-model-name",
                                       NAME]).start()


def test_gemma4_conversation_reasoning_and_restart(model_dir, tmp_path):
    server = _serve(tmp_path / "store", model_dir)
    try:
        c = server.client(KEY_A)
        conv = c.conversations.create()
        first = c.responses.create(model=NAME, conversation=conv.id, input=Q1,
                                   max_output_tokens=8, temperature=0)
        assert first.output_text == "OK"  # thinking off: the empty thought channel, then the answer
        second = c.responses.create(model=NAME, conversation=conv.id, input=Q2,
                                    max_output_tokens=8, temperature=0)
        assert second.output_text == "OK"
        cached = second.usage.input_tokens_details.cached_tokens
        # turn 1's KV up to the dropped channel, block aligned (the answer after it is recomputed)
        assert cached == (first.usage.input_tokens - DROPPED) // BLOCK * BLOCK >= 4 * BLOCK

        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "think first"}]
        off = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0,
                                        reasoning_effort="none")
        on = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0,
                                       reasoning_effort="high")
        assert off.choices[0].message.content == "OK" and not getattr(off.choices[0].message, "reasoning_content", "")
        assert on.choices[0].message.content == "OK"  # the answer alone: no channel, no thought text in it
        assert on.choices[0].message.reasoning_content == "h i"  # the thought, apart (an extra field of the client)
        assert on.usage.completion_tokens == 6 and off.usage.completion_tokens == 2  # thoughts count as output
        thinking = c.responses.create(model=NAME, input="think", max_output_tokens=12, temperature=0,
                                      reasoning={"effort": "medium"})
        assert thinking.output_text == "OK"
        assert [item.type for item in thinking.output] == ["reasoning", "message"]
    finally:
        assert server.stop(signal.SIGTERM) == 0
    server = _serve(tmp_path / "store", model_dir)  # same store, new process
    try:
        c = server.client(KEY_A)
        assert len(c.conversations.items.list(conv.id).data) == 4
        third = c.responses.create(model=NAME, conversation=conv.id, input="and a third",
                                   max_output_tokens=8, temperature=0)
        assert third.output_text == "OK"
        restored = third.usage.input_tokens_details.cached_tokens
        # restored from the saved KV, not re-prefilled: as much as a turn in the same process gets
        assert restored == (second.usage.input_tokens - DROPPED) // BLOCK * BLOCK > cached
    finally:
        server.stop(signal.SIGTERM)
