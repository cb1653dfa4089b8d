"""Gemma 4 loading without transformers: both HF layouts, strict errors, GGUF files we write the way llama.cpp's
converter does, the config's two forms and its refusals, and the dense KV's sharing contract."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import gemma_sessions as gs
from gemma_sessions.config_gemma4 import Gemma4Config
from gemma_sessions.models.gemma4 import Gemma4Model
from gemma_sessions.testing import (random_gemma4_tensors, tiny_gemma4_hf_config, tiny_tokenizer,
                                    write_gemma4_gguf, write_sentencepiece_model)

IDS = torch.tensor([2, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130])
_NO_SUFFIX = ("layer_scalar", "router.scale", "router.per_expert_scale", "experts.gate_up_proj", "experts.down_proj")

def _config(variant: str = "all") -> Gemma4Config:
    return Gemma4Config.from_hf_config(tiny_gemma4_hf_config(variant))


def _hf_name(name: str, prefix: str) -> str:
    return prefix + name + ("" if name.endswith(_NO_SUFFIX) else ".weight")


def write_hf_dir(d, variant: str = "all", *, conditional: bool = False, drop: str | None = None,
                 extra: dict | None = None, bad_shape: str | None = None) -> dict[str, torch.Tensor]:
    """A Gemma4ForCausalLM (or, ``conditional``, a Gemma4ForConditionalGeneration) directory of random weights."""
    d.mkdir(parents=True, exist_ok=True)
    text = tiny_gemma4_hf_config(variant)
    tensors = random_gemma4_tensors(Gemma4Config.from_hf_config(text), seed=3)
    prefix = "model.language_model." if conditional else "model."
    out = {_hf_name(k, prefix): v for k, v in tensors.items() if k != drop}
    if bad_shape:
        out[_hf_name(bad_shape, prefix)] = out[_hf_name(bad_shape, prefix)][:-1]
    out["lm_head.weight"] = tensors["embed_tokens"].clone()  # tied; written by save_pretrained in some versions
    if conditional:  # tower tensors the loader must skip
        out |= {"model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": torch.zeros(8, 8),
                "model.vision_tower.patch_embedder.position_embedding_table": torch.zeros(4, 8),
                "model.embed_vision.embedding_projection.weight": torch.zeros(48, 8),
                "model.audio_tower.layers.0.feed_forward1.ffw_layer_1.linear.weight": torch.zeros(4, 4)}
        config = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
                  "text_config": text, "vision_config": {"model_type": "gemma4_vision", "hidden_size": 8},
                  "audio_config": {"model_type": "gemma4_audio", "hidden_size": 4}, "tie_word_embeddings": True}
    else:
        config = dict(text, architectures=["Gemma4ForCausalLM"])
    out |= extra or {}
    save_file({k: v.contiguous() for k, v in out.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    write_sentencepiece_model(d / "tokenizer.model", tiny_tokenizer(text["vocab_size"]))
    return tensors


def write_gguf(path, variant: str = "all", *, split_experts: bool = False, extra: str | None = None) -> None:
    """The tiny model as llama.cpp's converter writes it (``testing.write_gemma4_gguf``), from the same random
    weights as :func:`write_hf_dir`, all F32."""
    c = _config(variant)
    write_gemma4_gguf(path, c, random_gemma4_tensors(c, seed=3), split_experts=split_experts, extra=extra)


def _direct(tensors: dict[str, torch.Tensor], variant: str = "all") -> torch.Tensor:
    net = Gemma4Model(_config(variant), tensors, "float32", torch.device("cpu"))
    with torch.inference_mode():
        return net.step(IDS, net.new_sequence(len(IDS)))


# ------------------------------------------------------------------------------------------------ HF layouts


@pytest.mark.parametrize("variant", ["all", "plain"])
def test_causal_and_conditional_layouts_load_the_same_model(tmp_path, variant):
    tensors = write_hf_dir(tmp_path / "causal", variant)
    write_hf_dir(tmp_path / "conditional", variant, conditional=True)
    causal = gs.load_model(tmp_path / "causal", dtype="float32", progress=False)
    conditional = gs.load_model(tmp_path / "conditional", dtype="float32", progress=False)
    assert causal.config == conditional.config == _config(variant)
    expect = _direct(tensors, variant)
    assert torch.equal(causal.forward(IDS), expect)
    assert torch.equal(conditional.forward(IDS), expect)
    assert "gemma4" in repr(conditional) and conditional.tokenizer.vocab_size == 512


@pytest.mark.parametrize("kind,match", [
    ("drop", "missing tensors: layers.3.mlp.up_proj"),
    ("extra", "unexpected tensors: layers.0.surprise"),
    ("shape", r"misshapen tensors: layers.2.experts.gate_up_proj: \(3, 32, 48\) != \(4, 32, 48\)"),
    ("stray", "unexpected tensors: stray.thing"),
    ("v_on_k_eq_v", "unexpected tensors: layers.4.self_attn.v_proj"),
])
def test_strict_loading_names_the_tensor(tmp_path, kind, match):
    extra = {"drop": None, "extra": {"model.layers.0.surprise.weight": torch.zeros(3)},
             "shape": None, "stray": {"stray.thing": torch.zeros(2)},
             "v_on_k_eq_v": {"model.layers.4.self_attn.v_proj.weight": torch.zeros(16, 48)}}[kind]
    write_hf_dir(tmp_path, drop="layers.3.mlp.up_proj" if kind == "drop" else None, extra=extra,
                 bad_shape="layers.2.experts.gate_up_proj" if kind == "shape" else None)
    with pytest.raises(gs.WeightsError, match=match):
        gs.load_model(tmp_path, dtype="float32", progress=False)


def test_kv_weights_of_shared_layers_are_ignored_as_transformers_does(tmp_path):
    """Checkpoints may carry k/v weights on KV-shared layers (Gemma4TextModel ignores them on load); so do we."""
    tensors = write_hf_dir(tmp_path, extra={"model.layers.7.self_attn.k_proj.weight": torch.ones(16, 48),
                                            "model.layers.8.self_attn.v_proj.weight": torch.ones(16, 48),
                                            "model.layers.8.self_attn.k_norm.weight": torch.ones(8)})
    model = gs.load_model(tmp_path, dtype="float32", progress=False)
    assert torch.equal(model.forward(IDS), _direct(tensors))


def test_int8_means_float32_and_bfloat16_loads(tmp_path):
    write_hf_dir(tmp_path)
    assert gs.load_model(tmp_path, progress=False).weight_format == "float32"  # the fast default
    bf16 = gs.load_model(tmp_path, dtype="bfloat16", progress=False)
    assert bf16.weight_format == "bfloat16" and bf16.net.layers[2].moe.gate_up.dtype == torch.bfloat16
    assert torch.isfinite(bf16.forward(IDS)).all()


# ------------------------------------------------------------------------------------------------ GGUF


@pytest.mark.parametrize("variant,split", [("all", False), ("all", True), ("plain", False)])
def test_gguf_gives_the_same_logits_as_safetensors(tmp_path, variant, split):
    write_hf_dir(tmp_path / "hf", variant)
    write_gguf(tmp_path / "tiny.gguf", variant, split_experts=split)
    from_hf = gs.load_model(tmp_path / "hf", dtype="float32", progress=False)
    from_gguf = gs.load_model(tmp_path / "tiny.gguf", dtype="float32", progress=False)
    # GGUF says one eos id; config.json two
    assert dataclasses.replace(from_gguf.config, eos_token_ids=from_hf.config.eos_token_ids) == from_hf.config
    assert torch.equal(from_gguf.forward(IDS), from_hf.forward(IDS))


def test_gguf_strict_names(tmp_path):
    write_gguf(tmp_path / "extra.gguf", extra="blk.0.surprise.weight")
    with pytest.raises(gs.WeightsError, match="unexpected tensor in GGUF: blk.0.surprise.weight"):
        gs.load_model(tmp_path / "extra.gguf", dtype="float32", progress=False)


# ------------------------------------------------------------------------------------------------ config


def test_kv_sharing_facts_for_the_cache():
    c = _config("all")
    assert c.layer_types[-1] == "full" and c.first_kv_shared_layer == 6
    assert [c.kv_source(i) for i in range(10)] == [0, 1, 2, 3, 4, 5, 5, 4, 5, 4]
    assert [c.layer_head_dim(i) for i in (0, 2, 6, 7)] == [8, 16, 8, 16]
    assert [c.layer_kv_heads(i) for i in (0, 2, 6, 7)] == [2, 1, 2, 1]
    assert c.kv_bytes_per_token(2) == 2 * 2 * (4 * 2 * 8 + 2 * 1 * 16)  # only the six layers that own K/V
    shapes = c.tensor_shapes()
    assert "layers.7.self_attn.k_proj" not in shapes and "layers.7.self_attn.q_norm" in shapes
    assert "layers.4.self_attn.v_proj" not in shapes and "layers.5.self_attn.v_proj" in shapes
    assert shapes["layers.7.mlp.gate_proj"] == (128, 48) and shapes["layers.5.mlp.gate_proj"] == (64, 48)


def test_per_layer_config_form_and_defaults():
    flat = tiny_gemma4_hf_config("all")
    newer = {k: v for k, v in flat.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
    newer["per_layer_config"] = {f"{i:02d}": {"head_dim": 16, "num_key_value_heads": 1}
                                 for i, t in enumerate(flat["layer_types"]) if t == "full_attention"}
    assert Gemma4Config.from_hf_config(newer) == Gemma4Config.from_hf_config(flat)
    # the flat form without global_head_dim takes transformers' default (512)
    no_global = {k: v for k, v in flat.items() if k != "global_head_dim"}
    assert Gemma4Config.from_hf_config(no_global).global_head_dim == 512


def test_last_layer_is_forced_full_and_fingerprint_is_stable():
    cfg = tiny_gemma4_hf_config("plain")
    cfg["layer_types"] = cfg["layer_types"][:-1] + ["sliding_attention"]  # transformers forces it to full
    forced = Gemma4Config.from_hf_config(cfg)
    assert forced == _config("plain")
    assert forced.fingerprint() == _config("plain").fingerprint() != _config("all").fingerprint()
    assert Gemma4Config.from_dict(json.loads(json.dumps(forced.to_dict()))) == forced


@pytest.mark.parametrize("change,error", [
    ({"use_bidirectional_attention": "all"}, gs.UnsupportedModelError),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1.0}}}, gs.UnsupportedModelError),
    ({"per_layer_config": {"2": {"intermediate_size": 8}}}, gs.UnsupportedModelError),
    ({"per_layer_config": {"2": {"head_dim": 32}}}, gs.UnsupportedModelError),  # full layers of two widths
    ({"num_kv_shared_layers": 8}, gs.ModelError),  # shared full layers with no full layer to read from
    ({"enable_moe_block": True, "num_experts": None}, gs.ModelError),
    ({"model_type": "gemma3_text"}, gs.UnsupportedModelError),
])
def test_config_refuses_what_it_cannot_run(change, error):
    with pytest.raises(error):
        Gemma4Config.from_hf_config(dict(tiny_gemma4_hf_config("plain"), **change))


def test_dense_kv_enforces_the_sharing_contract():
    c = _config("all")
    net = Gemma4Model(c, random_gemma4_tensors(c), "float32", torch.device("cpu"))
    kv = net.new_sequence(4)
    assert sorted(kv.k) == [0, 1, 2, 3, 4, 5]  # shared layers own no storage
    q = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="layer 6 reads"):
        kv.attend(6, q, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="layer 5 owns"):
        kv.attend(5, q, None, None)
