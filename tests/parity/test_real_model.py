"""The real Gemma 3 270M checkpoint (Q4_K_M GGUF) against transformers and llama.cpp, and end to end.

What is checked (float32 is the exact dequantization of the file, so it is the reference for our other formats):

1. teacher-forced top-1 agreement on real English text: ours (float32) vs transformers on the same GGUF, and vs
   llama.cpp (which runs the quantized weights natively, with quantized activations, so it agrees less);
2. weight formats: int8 (the fast CPU default) and bfloat16 against our float32;
3. golden greedy continuations of three prompts (float32);
4. KV-cached greedy decoding equals argmax of a full forward over the growing sequence;
5. the CLI prints what ``gs.generate`` returns, and rejects a bad flag value with status 2 and one ``error:`` line;
6. the fast default loads quickly.

The text is ``heapq.__about__`` (François Pinard's essay on heaps and tournaments, in every CPython since 2.3), so
the test needs no network and no data file. Run with ``-s`` to see the measured numbers.
"""

from __future__ import annotations

import gc
import heapq
import subprocess
import sys

import numpy as np
import pytest
import torch

import gemma_sessions as gs
from gemma_sessions.generate import generate_tokens
from gemma_sessions.sampling import GREEDY

pytestmark = pytest.mark.slow

TEXT = heapq.__about__
N_TOKENS = 640  # > the 512-token sliding window of the 270M, so global and sliding layers both see long context

# Greedy float32 continuations (24 tokens), generated once with this model file and pasted here.
GOLDEN = {
    "The capital of France is": [
        506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207, 528, 7001, 532, 506, 1855, 7488,
        3207, 528, 3879, 236761, 1030],
    "def fibonacci(n):": [
        107, 140, 584, 538, 1251, 236743, 236771, 236787, 107, 144, 2060, 236743, 236771, 107, 140, 36208, 538, 1251,
        236743, 236770, 236787, 107, 144, 2060],
    "Once upon a time": [
        236764, 993, 691, 496, 2268, 3953, 7489, 60708, 236761, 2625, 691, 496, 1401, 6538, 3953, 236764, 532, 1304,
        9312, 531, 1441, 607, 1116, 4690],
}
# Words the golden texts contain (only what the model actually produces: it does not say "Paris").
GOLDEN_WORDS = {
    "The capital of France is": ["capital", "France", "largest city"],
    "def fibonacci(n):": ["if n == 0:", "return 0", "elif n == 1:"],
    "Once upon a time": ["there was a little girl", "Lily"],
}


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two [T, vocab] logit matrices have the same argmax."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.argmax(-1).cpu() == b.argmax(-1).cpu()).double().mean().item()  # the model may be on cuda


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def text_ids(real_model_f32) -> list[int]:
    ids = real_model_f32.tokenizer.encode(TEXT, add_bos=True)
    assert len(ids) >= N_TOKENS, f"the text has only {len(ids)} tokens"
    return ids[:N_TOKENS]


@pytest.fixture(scope="module")
def f32_logits(real_model_f32, text_ids) -> torch.Tensor:
    return real_model_f32.forward(text_ids)


@pytest.fixture(scope="module")
def hf_logits(real_model_path, text_ids) -> torch.Tensor:
    """transformers on the same GGUF (it dequantizes to float32), eager attention; the model is freed at once."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(real_model_path.parent), gguf_file=real_model_path.name,
                                              dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([text_ids])).logits[0].float().clone()
    del hf
    gc.collect()
    return logits


@pytest.fixture(scope="module")
def llama_logits(real_model_path, text_ids) -> torch.Tensor:
    """llama.cpp (llama-cpp-python) logits for every position of the same token ids."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(real_model_path), n_ctx=len(text_ids), logits_all=True, n_threads=2,
                          verbose=False)
    llm.eval(text_ids)  # the ids already start with <bos>; eval adds nothing
    logits = torch.from_numpy(np.array(llm.scores[:len(text_ids)], dtype=np.float32))
    llm.close()
    del llm
    gc.collect()
    return logits


@pytest.fixture(scope="module")
def int8_logits(real_model_fast, text_ids) -> torch.Tensor:
    return real_model_fast.forward(text_ids)


@pytest.fixture(scope="module")
def int8_decode_logits(real_model_fast, text_ids) -> torch.Tensor:
    """The fast model's logits the way generation computes them: one token per step through the KV cache, so every
    product (layers and LM head) takes the decode path (``forward`` over the whole text takes the prefill path)."""
    net, n = real_model_fast.net, len(text_ids)
    kv = net.new_sequence(n)
    with torch.inference_mode():
        return torch.cat([net.step(torch.tensor([t], device=real_model_fast.device), kv) for t in text_ids])


@pytest.fixture(scope="module")
def bf16_logits(real_model_path, real_model_f32, text_ids) -> torch.Tensor:
    model = gs.load_model(real_model_path, dtype="bfloat16", device=real_model_f32.device, progress=False)
    logits = model.forward(text_ids)
    del model
    gc.collect()
    return logits


# ------------------------------------------------------------------------------------------------ 1. references


def test_text_is_long_real_prose(text_ids, real_model_f32):
    assert len(text_ids) == N_TOKENS >= 600
    decoded = real_model_f32.tokenizer.decode(text_ids)
    assert decoded.startswith("Heap queues") and "tournament" in decoded


def test_agreement_with_transformers(f32_logits, hf_logits):
    a = agreement(f32_logits, hf_logits)
    diff = (f32_logits.cpu() - hf_logits).abs().max().item()
    scale = hf_logits.abs().max().item()
    print(f"\n[parity] top-1 agreement, ours float32 vs transformers float32: {a:.4f} over {len(f32_logits)} tokens"
          f" (max |logit diff| {diff:.3e}, logit scale {scale:.1f})")
    assert a >= 0.99
    assert diff <= 1e-3 * scale  # same dequantized weights, same eager math: differences are rounding only


def test_agreement_with_llama_cpp(f32_logits, llama_logits, hf_logits):
    a = agreement(f32_logits, llama_logits)
    print(f"\n[parity] top-1 agreement, ours float32 vs llama.cpp: {a:.4f}"
          f" (transformers vs llama.cpp: {agreement(hf_logits, llama_logits):.4f})")
    assert a >= 0.90


# ------------------------------------------------------------------------------------------------ 2. weight formats


def test_weight_formats_agreement(f32_logits, int8_logits, int8_decode_logits, bf16_logits):
    a8, a8d, a16 = (agreement(x, f32_logits) for x in (int8_logits, int8_decode_logits, bf16_logits))
    print(f"\n[formats] top-1 agreement vs our float32: int8 (fast default) {a8:.4f} via forward (prefill path), "
          f"{a8d:.4f} token by token (decode path); bfloat16 {a16:.4f}")
    # Regression floor under the bf16 mode's measured value (0.977; transformers in bfloat16 on the same GGUF also
    # gives 0.977). The fast mode's own target is the test below.
    assert a16 >= 0.95


def test_int8_agreement_target(f32_logits, int8_logits, int8_decode_logits):
    """The fast mode's weights are exactly the float32 mode's (grouped int8 from the GGUF blocks); it loses only
    bf16 rounding in prefill GEMMs and the bf16 KV cache (measured 0.988 / 0.994 on this text)."""
    assert min(agreement(int8_logits, f32_logits), agreement(int8_decode_logits, f32_logits)) >= 0.98


# ------------------------------------------------------------------------------------------------ 3. golden text


@pytest.mark.parametrize("prompt", list(GOLDEN))
def test_golden_greedy(real_model_f32, prompt):
    tok = real_model_f32.tokenizer
    out = list(generate_tokens(real_model_f32, tok.encode(prompt, add_bos=True), GREEDY.replace(max_tokens=24)))
    text = tok.decode(out)
    print(f"\n[golden] {prompt!r} -> {text!r}")
    assert out == GOLDEN[prompt]
    for word in GOLDEN_WORDS[prompt]:
        assert word in text
    visible = [c for c in text if not c.isspace()]
    assert text.isascii() and sum(c.isalpha() for c in visible) > len(visible) // 2  # English (or Python) text


# ------------------------------------------------------------------------------------------------ 4. KV cache


def test_kv_cached_greedy_equals_full_forward(real_model_f32):
    model = real_model_f32
    ids = model.tokenizer.encode("The history of the printing press", add_bos=True)
    cached = list(generate_tokens(model, ids, GREEDY.replace(max_tokens=16, ignore_eos=True)))
    seq, uncached = list(ids), []
    for _ in range(16):
        token = int(model.forward(seq)[-1].argmax())
        uncached.append(token)
        seq.append(token)
    assert len(cached) == 16
    assert cached == uncached


# ------------------------------------------------------------------------------------------------ 5. CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma_sessions.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_generate_matches_api(real_model_f32):
    prompt = "The capital of France is"
    proc = _cli("generate", prompt, "--max-tokens", "8", "--temperature", "0", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    expected = gs.generate(real_model_f32, prompt, max_tokens=8, temperature=0)
    print(f"\n[cli] {proc.stdout!r}")
    assert expected.strip()
    assert proc.stdout == expected + "\n"


def test_cli_bad_flag_value():
    proc = _cli("generate", "hi", "--temperature", "-1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "temperature" in lines[0]
    assert proc.stdout == ""


# ------------------------------------------------------------------------------------------------ 6. load time


def test_fast_default_loads_int8():
    model = gs.load_model("gemma3-270m", progress=False)  # no dtype: the fast default on this device
    print(f"\n[load] {model.weight_format} load_seconds={model.load_seconds:.2f}")  # reported, not asserted
    assert model.weight_format == "int8" and model.load_seconds > 0


if __name__ == "__main__":  # print fresh golden ids after an intended numerical change: python <this file>
    from gemma_sessions.loading import resolve_model_path

    _model = gs.load_model(resolve_model_path("gemma3-270m", progress=False), dtype="float32", progress=False)
    for _prompt in GOLDEN:
        _ids = _model.tokenizer.encode(_prompt, add_bos=True)
        _out = list(generate_tokens(_model, _ids, GREEDY.replace(max_tokens=24)))
        print(f"{_prompt!r}: {_out},  # {_model.tokenizer.decode(_out)!r}")
