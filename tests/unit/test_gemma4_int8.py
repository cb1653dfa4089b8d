"""Gemma 4's int8 fast mode: the GGUF's own codes through the kernel backend (models/gemma4.py ``linear``), the
per-layer embedding table kept in its stored bytes (``gemma4_weights.GGUFRows``), the greedy head under the final
soft-cap, and the compiled decode step for the shape without per-layer embeddings or MoE (the 31B's).

The GGUFs are written with the ``gguf`` package, each 2-D tensor quantized to one of the block types it can quantize
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; token_embd Q8_0, the greedy head's layout). The float32 model loaded from the same
file dequantizes the same blocks, so the two differ only in float32 rounding of the products; the comparisons run
rows the exact kernel takes (at most 8 per product) and float32 KV on both sides.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gemma_sessions as gs
from gemma_sessions import kernels
from gemma_sessions.cache.kv import KVLayout, PagedKVCache
from gemma_sessions.config_gemma4 import Gemma4Config
from gemma_sessions.engine import Engine, runner
from gemma_sessions.generate import generate_tokens
from gemma_sessions.kernels import backend
from gemma_sessions.models import gemma4, quant
from gemma_sessions.models.gemma4_weights import GGUFRows
from gemma_sessions.models.gguf_file import GGUFFile
from gemma_sessions.models.weights import dequantize_tensor
from gemma_sessions.testing import random_gemma4_tensors, tiny_gemma4_hf_config, write_gemma4_gguf

GREEDY = gs.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1)
# every width a multiple of 32 (the block size); "ple" is E2B's shape (per-layer embeddings, no k_eq_v), "moe" the
# 26B-A4B's (experts beside the dense MLP, k_eq_v), "dense" the 31B's (k_eq_v, neither): all with KV sharing
WIDTHS = dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
              global_head_dim=64, num_global_key_value_heads=1, moe_intermediate_size=32)
VARIANTS = {
    "ple": dict(attention_k_eq_v=False, enable_moe_block=False, hidden_size_per_layer_input=32),
    "moe": dict(hidden_size_per_layer_input=0),
    "dense": dict(enable_moe_block=False, hidden_size_per_layer_input=0),
}
SEEDS = {"ple": 3, "moe": 2, "dense": 9}  # seeds whose greedy tokens vary (most random tiny models repeat one)
# Float32 rounding (the kernels sum in another order than torch) grows through 10 random layers to a few 1e-5 of the
# logit scale: the bar is the parity bar, 1e-4 (another seed's weights are > 1e-2 away: the test below).
TOLERANCE = 1e-4


def _config(variant: str) -> Gemma4Config:
    return Gemma4Config.from_hf_config(dict(tiny_gemma4_hf_config("all"), **WIDTHS, **VARIANTS[variant]))


def _qtype(name: str, data) -> Q | None:
    """token_embd Q8_0; the PLE table Q5_0; other 2-D weights cycle through the block types; norms, scalars and the
    3-D experts F32."""
    if name == "embed_tokens":
        return Q.Q8_0
    if name == "embed_tokens_per_layer":
        return Q.Q5_0
    if data.ndim != 2 or data.shape[1] % 32:
        return None
    return BLOCK_TYPES[sum(map(ord, name)) % len(BLOCK_TYPES)]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    def write(variant: str):
        seed = SEEDS[variant]
        path = tmp_path_factory.mktemp(variant) / f"tiny-{variant}-{seed}.gguf"
        if not path.exists():
            c = _config(variant)
            write_gemma4_gguf(path, c, random_gemma4_tensors(c, seed), qtype=_qtype)
        return path
    return write


def _load(path, dtype: str):
    return gs.load_model(path, dtype=dtype, progress=False)


def _need_kernels():
    if not kernels.available():
        pytest.fail(f"the int8 mode needs the compiled kernels: {kernels._state.get('error')}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int8_keeps_the_gguf_codes_and_equals_float32_weights(gguf_path, variant):
    """Every layer product of the int8 model is the kernel backend's QuantLinear holding the GGUF's own codes, whose
    dequantization equals the float32 model's weight bit for bit (the same file, the same blocks)."""
    path = gguf_path(variant)
    fast, exact = _load(path, "int8"), _load(path, "float32")
    assert fast.weight_format == "int8" and exact.weight_format == "float32"
    reader = GGUFFile(path)
    raw = {t.name: t for t in reader.tensors}
    t = raw["blk.0.attn_output.weight"]
    want = quant.from_gguf(t.data, t.tensor_type, tuple(int(x) for x in reversed(t.shape)))
    assert torch.equal(fast.net.layers[0].attn.o_proj.codes, want.codes)
    assert fast.net.embed.int8 and fast.net.embed.head
    for lf, le in zip(fast.net.layers, exact.net.layers):
        for a, b in ((lf.attn.qkv, le.attn.qkv), (lf.attn.o_proj, le.attn.o_proj), (lf.mlp.gate_up, le.mlp.gate_up),
                     (lf.mlp.down_proj, le.mlp.down_proj)):
            assert isinstance(a, backend.QuantLinear) and not b.int8
            assert torch.equal(kernels.dequantize(a.codes, a.scales, a.offsets, a.group), b.weight)


def test_float_weights_mean_float32_for_int8(tmp_path):
    """A GGUF whose projections are floats has no codes of its own: int8 loads float32 weights (no lossy
    re-quantization)."""
    c = _config("dense")
    write_gemma4_gguf(tmp_path / "f32.gguf", c, random_gemma4_tensors(c, 2))
    assert _load(tmp_path / "f32.gguf", "int8").weight_format == "float32"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int8_logits_equal_float32_within_rounding(gguf_path, variant):
    """Token by token (one row per product: the exact kernel) and a prefill of 6 tokens, over float32 dense KV: the
    int8 model's logits are the float32 model's within float32 rounding (TOLERANCE of the logit scale)."""
    _need_kernels()
    path = gguf_path(variant)
    fast, exact = _load(path, "int8").net, _load(path, "float32").net
    ids = torch.tensor([2, 17, 301, 44, 5, 260, 99, 411, 123, 7, 88, 500])
    kv_f, kv_e = gemma4.DenseKV(fast, 16, torch.float32), gemma4.DenseKV(exact, 16, torch.float32)
    with torch.inference_mode():
        pairs = [(fast.step(ids[:6], kv_f), exact.step(ids[:6], kv_e))]
        pairs += [(fast.step(ids[i:i + 1], kv_f), exact.step(ids[i:i + 1], kv_e)) for i in range(6, len(ids))]
    for a, b in pairs:
        assert _rel(a, b) <= TOLERANCE


def test_the_comparison_above_can_fail(gguf_path, tmp_path):
    """Another seed's weights (the same file layout) are far outside that tolerance."""
    path = gguf_path("dense")
    other = tmp_path / "other.gguf"
    c = _config("dense")
    write_gemma4_gguf(other, c, random_gemma4_tensors(c, 5), qtype=_qtype)
    ids = torch.tensor([2, 17, 301, 44])
    assert _rel(_load(other, "int8").forward(ids), _load(path, "float32").forward(ids)) > 1e-2


# ------------------------------------------------------------------------------------------------ per-layer embeddings


def test_the_ple_table_stays_in_its_stored_bytes_and_gathers_exact_rows(gguf_path):
    """The per-layer embedding table is held as the file's Q5_0 blocks (its GGUF byte size, 5.5 bits a value) in
    every format; a gathered row equals that row of the whole table's dequantization, and the model's per-layer
    inputs are those of a model given the dequantized table."""
    path = gguf_path("ple")
    (t,) = [t for t in GGUFFile(path).tensors if t.name == "per_layer_token_embd.weight"]
    for fmt in ("int8", "float32"):
        table = _load(path, fmt).net.ple_table
        assert isinstance(table, GGUFRows) and table.nbytes == t.data.nbytes
        rows, k = table.shape
        assert table.nbytes * 8 == rows * k * 5.5  # 22 bytes per 32 values: the stored bytes, not a float copy
    whole = dequantize_tensor(t.data, t.tensor_type).view(rows, k)
    ids = torch.tensor([0, 3, 511, 3, 200])
    assert torch.equal(table.rows(ids), whole[ids]) and torch.equal(table.dequantize(), whole)
    net = _load(path, "float32").net
    x = torch.randn(5, net.config.hidden_size)
    want = net.per_layer_inputs(ids, x)
    net.ple_table = whole
    assert torch.equal(net.per_layer_inputs(ids, x), want)


# ------------------------------------------------------------------------------------------------ greedy head


def test_the_greedy_head_runs_under_the_final_softcap(gguf_path):
    """Q8_0 token_embd: the int8 head takes the greedy token (the capped logits' argmax: the cap is monotone) and
    the sampled rows' approximate logits come back soft-capped, like ``logits``."""
    _need_kernels()
    net = _load(gguf_path("dense"), "int8").net
    assert net.config.final_logit_softcapping == 30.0
    if not net.can_greedy_head():
        pytest.fail("the int8 head of a Q8_0 token_embd runs the greedy head where the build has q8_head")
    h = torch.randn(5, net.config.hidden_size) * 10
    tokens, approx = net.greedy_head(h, want_logits=True)
    logits = net.logits(h)
    assert torch.equal(tokens, logits.argmax(-1))
    assert approx.abs().max() < 30 and _rel(approx, logits) < 0.05
    raw = net.embed(h)
    assert raw.abs().max() > 30  # the cap changed something: an uncapped approximation would fail the line above


# ------------------------------------------------------------------------------------------------ engine


def _prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(i)
    return [2] + torch.randint(7, 500, (n,), generator=g).tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int8_greedy_tokens_through_the_engine_equal_float32(gguf_path, variant):
    """Five prompts batched through the engine (prefill chunks of at most 8 tokens beside decode rows, float32 KV):
    the int8 model's greedy tokens are the float32 model's alone on its dense KV."""
    _need_kernels()
    path = gguf_path(variant)
    fast, exact = _load(path, "int8"), _load(path, "float32")
    prompts = [_prompt(i, 9 + 5 * i) for i in range(5)]
    refs = [list(generate_tokens(exact, p, GREEDY)) for p in prompts]
    assert min(len(set(r)) for r in refs) >= 4, refs  # varied tokens: a wrong cache or head would show
    with Engine(fast, kv_cache_bytes=8 << 20, block_size=4, max_batched_tokens=8, kv_dtype=torch.float32) as e:
        outs = [s.result().token_ids for s in [e.submit(p, GREEDY) for p in prompts]]
    assert outs == refs


# ------------------------------------------------------------------------------------------------ decode stack


def test_only_the_shape_without_ple_and_moe_runs_the_decode_stack(gguf_path):
    _need_kernels()
    assert _load(gguf_path("dense"), "int8").net.can_decode_stack(3)
    for variant in ("ple", "moe"):
        net = _load(gguf_path(variant), "int8").net
        assert not net.can_decode_stack(3)
        with pytest.raises(ValueError, match="per-layer embeddings nor the MoE block"):
            net.stack_spec()
    assert not _load(gguf_path("dense"), "float32").net.can_decode_stack(3)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_decode_stack_equals_the_layer_loop(gguf_path, rows, monkeypatch):
    """The 31B shape (k_eq_v, KV-shared layers, two page shapes: 1 x 32 sliding beside 1 x 64 full) decoded in one
    compiled call per step over the paged cache's StackKV: logits and every K/V slot the steps wrote equal the layer
    loop's within float32 rounding (float32 KV: bf16 would round the two apart by a bf16 step now and then), and
    the stack ran every step."""
    _need_kernels()
    model = _load(gguf_path("dense"), "int8")
    net = model.net
    calls = []
    real = net.hidden_decode_stack
    monkeypatch.setattr(net, "hidden_decode_stack", lambda *a: calls.append(1) or real(*a))

    def run(use_stack: bool):
        monkeypatch.setattr(net, "can_decode_stack", lambda n: use_stack)
        cache = PagedKVCache(KVLayout.for_config(model.config, 4), 512, torch.float32, model.device)
        cache.buffer.zero_()  # pages start uninitialised; compare only what the steps wrote
        seqs = [cache.start(_prompt(i, 3 + 2 * i)) for i in range(rows)]
        for s in seqs:  # prefill each alone, in chunks of at most 8 tokens (the exact kernel)
            while s.num_computed < len(s.tokens):
                n = min(8, len(s.tokens) - s.num_computed)
                cache.allocate(s, n)
                runner.run_step(net, cache, [runner.WorkItem(seq=s, num_tokens=n, want_logits=True)])
                cache.commit(s, n)
        logits = []
        for step in range(8):  # decode every row together, feeding fixed tokens
            items = []
            for i, s in enumerate(seqs):
                s.tokens.append(7 + (13 * step + 5 * i) % 500)
                cache.allocate(s, 1)
                items.append(runner.WorkItem(seq=s, num_tokens=1, want_logits=True))
            logits.append(runner.run_step(net, cache, items))
            for s in seqs:
                cache.commit(s, 1)
        return torch.stack(logits), cache.buffer.clone()

    assert len(KVLayout.for_config(model.config, 4).classes) == 2
    stack_logits, stack_kv = run(True)
    assert len(calls) == 8
    loop_logits, loop_kv = run(False)
    assert len(calls) == 8
    assert _rel(stack_logits, loop_logits) <= TOLERANCE
    assert torch.equal(stack_kv == 0, loop_kv == 0)  # the same slots written
    assert _rel(stack_kv, loop_kv) <= TOLERANCE
