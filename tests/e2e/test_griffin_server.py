"""A RecurrentGemma served by a real server process (a tiny random model saved as an HF directory by
transformers), driven by the official openai client: chat, a conversation continued across a restart from its
saved state."""

from __future__ import annotations

import pytest
import torch
import transformers

from gemma_sessions.testing import tiny_tokenizer, write_sentencepiece_model

from test_server import KEY_A, Server, _free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("recurrentgemma")
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, lru_width=64, attention_window_size=16, conv1d_width=4, logits_soft_cap=30.0,
        block_types=["recurrent", "recurrent", "attention"])
    torch.manual_seed(0)
    transformers.RecurrentGemmaForCausalLM(cfg).save_pretrained(path)
    write_sentencepiece_model(path / "tokenizer.model", tiny_tokenizer(512))
    return path


def test_recurrentgemma_conversation_survives_a_restart(model_dir, tmp_path):
    extra = ["--model", str(model_dir), "--dtype", "float32", "--served-model-name", "recurrentgemma-tiny"]
    server = Server(tmp_path / "store", _free_port(), extra).start()
    try:
        c = server.client(KEY_A)
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the user"}]
        r = c.chat.completions.create(model="recurrentgemma-tiny", messages=msgs, max_tokens=6, temperature=0)
        assert r.model == "recurrentgemma-tiny" and r.usage.completion_tokens <= 6
        conv = c.conversations.create()
        first = c.responses.create(model="recurrentgemma-tiny", conversation=conv.id, input="the model",
                                   max_output_tokens=6, temperature=0)
        assert first.output_text is not None
    finally:
        server.stop()
    server = Server(tmp_path / "store", _free_port(), extra).start()  # same store, new process
    try:
        c = server.client(KEY_A)
        items = c.conversations.items.list(conv.id)
        assert len(items.data) == 2
        nxt = c.responses.create(model="recurrentgemma-tiny", conversation=conv.id, input="in er",
                                 max_output_tokens=6, temperature=0)
        assert nxt.usage.input_tokens_details.cached_tokens > 0  # continued from the saved state
    finally:
        server.stop()
