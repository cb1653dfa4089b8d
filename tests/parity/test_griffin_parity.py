"""RecurrentGemma (Griffin) parity with transformers on tiny random configs (float32), on sequences longer than
the attention window: prefilled at once, token by token, and in chunks; the state stays fixed-size."""

from __future__ import annotations

import pytest
import torch
import transformers

from gemma_sessions.models.griffin import GriffinConfig, GriffinModel, GriffinState

SEQ = 40


@pytest.fixture(scope="module", params=[1, 2])
def pair(request):
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=300, hidden_size=80, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=request.param, lru_width=80, attention_window_size=8, conv1d_width=4,
        logits_soft_cap=30.0, rms_norm_eps=1e-6, block_types=["recurrent", "recurrent", "attention"])
    torch.manual_seed(request.param)
    hf = transformers.RecurrentGemmaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "recurrent_param" not in name:  # keep the decay parameterisation in its trained range
                p.add_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.2))
    # hidden 80: sqrt(80) is not exact in bf16, so the normalizer quirk is exercised
    ours = GriffinModel(GriffinConfig.from_hf_config(cfg.to_dict()), hf.state_dict())
    return hf, ours


def _ids(n: int = SEQ) -> torch.Tensor:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(5))


def _check(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-4 * scale


def _reference(hf, ids):
    with torch.no_grad():
        return hf(ids[None], use_cache=False).logits[0].float()


@pytest.mark.parametrize("chunk", [SEQ, 1, 5, 16])
def test_logits_match_transformers(pair, chunk):
    hf, ours = pair
    ids = _ids()
    state = GriffinState(ours)
    out = torch.cat([ours.logits(ids[s:s + chunk], state) for s in range(0, SEQ, chunk)])
    _check(out, _reference(hf, ids))


def test_state_size_is_flat(pair):
    _, ours = pair
    state = GriffinState(ours)
    ours.logits(_ids(20), state)
    size = state.nbytes()
    ours.logits(_ids(200)[:120], state)
    assert state.nbytes() == size  # however long the sequence grows


def test_load_model_from_hf_directory_and_generate(pair, tmp_path):
    import gemma_sessions as gs
    from gemma_sessions.testing import tiny_tokenizer, write_sentencepiece_model

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    write_sentencepiece_model(tmp_path / "tokenizer.model", tiny_tokenizer(300))
    model = gs.load_model(tmp_path, dtype="float32", progress=False)
    ids = _ids()
    _check(model.forward(ids), _reference(hf, ids))
    text = gs.generate(model, "hello", max_tokens=5, temperature=0)
    assert isinstance(text, str)
    with gs.Engine(model, kv_cache_bytes=8 << 20) as engine:  # the loaded model serves sessions
        prompt = model.tokenizer.encode("hello", add_bos=True)
        out = engine.submit(prompt, gs.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)).result()
    expect, state = [], model.net.new_sequence(0)
    logits = model.net.step(torch.tensor(prompt), state, last_only=True)
    for _ in range(5):
        expect.append(int(logits[-1].argmax()))
        logits = model.net.step(torch.tensor(expect[-1:]), state, last_only=True)
    assert out.token_ids == expect


def test_loading_is_strict(pair, tmp_path):
    import safetensors.torch

    import gemma_sessions as gs
    from gemma_sessions.testing import tiny_tokenizer, write_sentencepiece_model

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    write_sentencepiece_model(tmp_path / "tokenizer.model", tiny_tokenizer(300))
    f = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(str(f))
    tensors.pop("model.layers.1.temporal_block.conv_1d.bias")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    safetensors.torch.save_file(tensors, str(f))
    with pytest.raises(gs.WeightsError, match=r"conv_1d\.bias.*unexpected: model\.layers\.0\.extra\.weight"):
        gs.load_model(tmp_path, dtype="float32", progress=False)
