"""Logit parity with transformers on tiny random Gemma, Gemma 2 and Gemma 3 models (float32).

Each tiny model is built by transformers with random weights, saved as safetensors (single file and sharded),
loaded back through our strict loader, and compared on a sequence longer than the sliding window: all at once,
token by token through the KV cache, and in chunks.
"""

from __future__ import annotations

import json

import pytest
import torch

from gemma_sessions.config import ModelConfig
from gemma_sessions.models.gemma import DenseKV, GemmaModel
from gemma_sessions.models.weights import check_tensors, read_safetensors
from gemma_sessions.testing import tiny_hf_config

import transformers  # noqa: E402 - a required dev dependency (the reference)

ARCHS = ["gemma", "gemma2", "gemma3"]
SEQ = 40  # > sliding window (8) several times over


def _hf_model(arch: str):
    cfg_dict = tiny_hf_config(arch)
    cls = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
           "gemma3": transformers.Gemma3TextConfig}[arch]
    fields = {k: v for k, v in cfg_dict.items() if k != "model_type"}
    config = cls(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms init to zero in Gemma; randomise everything
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.3))
    return model


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    arch = request.param
    hf = _hf_model(arch)
    d = tmp_path_factory.mktemp(arch)
    hf.save_pretrained(d, max_shard_size="200KB" if arch == "gemma2" else "100MB")  # gemma2 runs sharded
    config = ModelConfig.from_hf_config(json.loads((d / "config.json").read_text()))
    tensors = read_safetensors(d)
    check_tensors(config, tensors)
    ours = GemmaModel(config, tensors, "float32", torch.device("cpu"))
    return arch, hf, ours, d


def _ids(vocab: int, n: int = SEQ, seed: int = 7) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _ours_full(model: GemmaModel, ids: torch.Tensor) -> torch.Tensor:
    kv = DenseKV(model, max_len=len(ids))
    with torch.inference_mode():
        return model.logits(model.hidden(ids, torch.arange(len(ids)), kv))


def _ours_chunked(model: GemmaModel, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    kv = DenseKV(model, max_len=len(ids))
    out = []
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            part = ids[s:s + chunk]
            out.append(model.logits(model.hidden(part, torch.arange(s, s + len(part)), kv)))
            kv.advance(len(part))
    return torch.cat(out)


def _check(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max abs diff {diff:.3e} > 1e-4 x logit scale {scale:.3f}"


def test_sharded_and_single_file_layouts(pair):
    arch, _, _, d = pair
    shards = list(d.glob("*.safetensors"))
    assert (len(shards) > 1) == (arch == "gemma2"), [s.name for s in shards]


def test_logits_match_transformers_full_sequence(pair):
    _, hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    _check(_ours_full(ours, ids), ref)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_cached_decoding_matches_transformers(pair, chunk):
    _, hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    _check(_ours_chunked(ours, ids, chunk), ref)


def test_cached_equals_uncached_exactly_enough(pair):
    _, hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size, seed=11)
    full = _ours_full(ours, ids)
    step = _ours_chunked(ours, ids, 1)
    assert torch.equal(full.argmax(-1), step.argmax(-1))
    assert (full - step).abs().max().item() <= 1e-5 * full.abs().max().item()


def test_config_quirks_are_read(pair):
    arch, _, ours, _ = pair
    c = ours.config
    if arch == "gemma":
        assert set(c.layer_types) == {"full"} and c.query_pre_attn_scalar == c.head_dim
    if arch == "gemma2":
        assert c.layer_types[:2] == ("sliding", "full")
        assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.query_pre_attn_scalar) == (50.0, 30.0, 24.0)
    if arch == "gemma3":
        assert c.layer_types[:6] == ("sliding",) * 5 + ("full",)
        assert (c.rope_theta_global, c.rope_theta_local, c.rope_scaling_global) == (1e6, 1e4, 8.0)
