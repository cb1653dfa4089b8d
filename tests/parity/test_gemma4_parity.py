"""Logit parity with transformers' Gemma4ForCausalLM on tiny random Gemma 4 models (float32).

Two configs (testing.tiny_gemma4_hf_config): "all" switches every feature on (KV sharing with two shared layers of
each type, double-wide MLP on them, attention_k_eq_v with its own full-layer KV heads, the MoE block, per-layer
embeddings, proportional RoPE, a final soft-cap); "plain" has KV sharing without them, k_eq_v off. Every weight is
random, norms, layer scalars and router scales included (they init to ones, which hides bugs). Each model is saved
by transformers (config.json in its per_layer_config form), loaded back through our strict loader, and compared on a
sequence several windows long: all at once, token by token, and in chunks.

NOTE: scores are unscaled (Gemma 4's attention scale is 1.0), so with random q/k norm weights some sequences are
ill-conditioned: on one, transformers' own cached decoding moved 5.4e-4 of the logit scale from its own full
forward. The test sequence is checked to be one where the reference agrees with itself (``test_the_reference_
agrees_with_itself``), so a failure below is ours.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import gemma_sessions as gs
from gemma_sessions.config import FULL, SLIDING
from gemma_sessions.config_gemma4 import Gemma4Config
from gemma_sessions.models import gemma4_weights
from gemma_sessions.models.gemma4 import Gemma4Model
from gemma_sessions.testing import tiny_gemma4_hf_config, tiny_tokenizer, write_sentencepiece_model

import transformers  # noqa: E402 - a required dev dependency (the reference)

SEQ = 40  # > sliding windows (5 and 7) several times over
_ONES_AT_INIT = ("norm.weight", "layer_scalar", "router.scale", "router.per_expert_scale")


def _hf_model(variant: str):
    fields = {k: v for k, v in tiny_gemma4_hf_config(variant).items() if k != "model_type"}
    config = transformers.Gemma4TextConfig(**fields)
    torch.manual_seed(1234)
    model = transformers.Gemma4ForCausalLM(config).float().eval()
    with torch.no_grad():  # state_dict, not parameters: layer_scalar is a buffer
        for name, p in model.state_dict().items():
            if name.endswith(_ONES_AT_INIT):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module", params=["all", "plain"])
def pair(request, tmp_path_factory):
    variant = request.param
    hf = _hf_model(variant)
    d = tmp_path_factory.mktemp(f"gemma4-{variant}")
    hf.save_pretrained(d)
    write_sentencepiece_model(d / "tokenizer.model", tiny_tokenizer(hf.config.vocab_size))
    config = Gemma4Config.from_hf_config(json.loads((d / "config.json").read_text()))
    tensors = gemma4_weights.check_tensors(config, gemma4_weights.read_safetensors(d))
    ours = Gemma4Model(config, tensors, "float32", torch.device("cpu")).eval()
    return variant, hf, ours, d


def _ids(vocab: int, n: int = SEQ, seed: int = 7) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _reference(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None], use_cache=False).logits[0].float()


def _reference_cached(hf, ids: torch.Tensor) -> torch.Tensor:
    """transformers token by token through its own cache."""
    cache, out = transformers.DynamicCache(config=hf.config), []
    with torch.no_grad():
        for i in range(len(ids)):
            step = hf(ids[None, i:i + 1], cache=cache, use_cache=True)
            cache = step.cache
            out.append(step.logits[0].float())
    return torch.cat(out)


def _ours_chunked(model: Gemma4Model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    kv = model.new_sequence(len(ids))
    with torch.inference_mode():
        return torch.cat([model.step(ids[s:s + chunk], kv) for s in range(0, len(ids), chunk)])


def _check(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max abs diff {diff:.3e} > 1e-4 x logit scale {scale:.3f}"


def test_the_tiny_configs_switch_their_features_on(pair):
    """The parity below only means something if the features are really there, and the weights not at init."""
    variant, hf, ours, d = pair
    c = ours.config
    assert [c.kv_source(i) for i in range(c.num_layers)] == [0, 1, 2, 3, 4, 5, 5, 4, 5, 4]
    assert hf.config.kv_sharing_modes[6:] == ["reuse"] * 4 and hf.config.kv_sharing_modes[4:6] == ["store"] * 2
    assert SEQ > 2 * c.sliding_window
    assert (c.layer_head_dim(4), c.layer_head_dim(5)) == (16, 8)  # full layers are wider
    for name, t in hf.state_dict().items():
        if name.endswith(_ONES_AT_INIT):
            assert not torch.allclose(t, torch.ones_like(t)), name
    if variant == "all":
        assert c.attention_k_eq_v and c.has_moe and c.has_ple and c.use_double_wide_mlp
        assert c.layer_kv_heads(4) == 1 and c.layer_kv_heads(5) == 2  # num_global_key_value_heads applies
        assert ours.layers[7].mlp.inter == 2 * ours.layers[3].mlp.inter  # double wide on a KV-shared layer
        assert ours.layers[4].attn.v_is_k and not ours.layers[5].attn.v_is_k
        assert c.final_logit_softcapping == 30.0 and c.rope_partial_global == 0.25
    else:
        assert not (c.attention_k_eq_v or c.has_moe or c.has_ple or c.use_double_wide_mlp)
        # num_global_key_value_heads is in config.json, but without attention_k_eq_v transformers ignores it
        assert c.layer_kv_heads(4) == 2 == hf.model.layers[4].self_attn.k_proj.weight.shape[0] // 16


def test_the_reference_agrees_with_itself(pair):
    """The sequence the comparisons use is well conditioned: transformers' cached decoding stays within the parity
    bound of its own full forward (see the module's NOTE)."""
    _, hf, _, _ = pair
    ids = _ids(hf.config.vocab_size)
    _check(_reference_cached(hf, ids), _reference(hf, ids))


def test_saved_config_form_matches_the_flat_form(pair):
    """save_pretrained writes the newer per_layer_config form; both forms must give the same architecture."""
    variant, _, ours, d = pair
    saved = json.loads((d / "config.json").read_text())
    assert "per_layer_config" in saved and "global_head_dim" not in saved
    flat = Gemma4Config.from_hf_config(tiny_gemma4_hf_config(variant))
    assert flat == ours.config and flat.fingerprint() == ours.config.fingerprint()


def test_logits_match_transformers_full_sequence(pair):
    _, hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size)
    _check(_ours_chunked(ours, ids, SEQ), _reference(hf, ids))


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_cached_decoding_matches_transformers(pair, chunk):
    _, hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size)
    _check(_ours_chunked(ours, ids, chunk), _reference(hf, ids))


def test_cached_equals_uncached(pair):
    """Our own cache against our own full forward, within the parity bound (transformers' own gap on this sequence
    is 5.9e-5 of the logit scale, measured)."""
    _, _, ours, _ = pair
    ids = _ids(ours.config.vocab_size)
    full, step = _ours_chunked(ours, ids, SEQ), _ours_chunked(ours, ids, 1)
    assert torch.equal(full.argmax(-1), step.argmax(-1))
    _check(step, full)


def test_load_model_reads_the_saved_directory(pair):
    """The public loader on transformers' own output: the same logits; an int8 request runs float32 weights."""
    _, hf, ours, d = pair
    ids = _ids(hf.config.vocab_size, n=12, seed=3)
    model = gs.load_model(d, dtype="float32", device="cpu", progress=False)
    assert isinstance(model.net, Gemma4Model) and model.config == ours.config
    assert torch.equal(model.forward(ids), _ours_chunked(ours, ids, 12))
    assert {1, 5} <= model.stop_ids  # every eos id config.json lists
    assert gs.load_model(d, dtype="int8", device="cpu", progress=False).weight_format == "float32"


def test_bfloat16_is_no_further_from_float32_than_transformers_bfloat16(pair):
    """bf16 moves these random models a lot (0.37-0.53 of the mean logit on "all", measured, transformers' own bf16
    included: expert choices flip and errors compound over 10 layers), so the bound is transformers' own bf16 error."""
    _, hf, _, d = pair
    ids = _ids(hf.config.vocab_size)
    ref = _reference(hf, ids)
    bf16 = gs.load_model(d, dtype="bfloat16", device="cpu", progress=False)
    assert bf16.net.dtype == torch.bfloat16 and bf16.net.embed.weight.dtype == torch.bfloat16
    theirs = _reference(copy.deepcopy(hf).to(torch.bfloat16), ids)

    def error(x: torch.Tensor) -> float:
        return ((x - ref).abs().mean() / ref.abs().mean()).item()

    assert 0 < error(bf16.forward(ids)) <= 1.25 * error(theirs), (error(bf16.forward(ids)), error(theirs))


def test_layer_types_of_the_tiny_configs():
    c = Gemma4Config.from_hf_config(tiny_gemma4_hf_config("all"))
    shared = [c.layer_types[i] for i in range(c.num_layers) if c.is_kv_shared(i)]
    assert shared.count(SLIDING) >= 2 and shared.count(FULL) >= 2
