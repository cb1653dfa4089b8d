"""Sampling and text streaming: determinism, filters, stop strings, UTF-8 safety."""

from __future__ import annotations

import pytest
import torch

import gemma_sessions as gs
from gemma_sessions.generate import generate_tokens
from gemma_sessions.sampling import Sampler, SamplingParams, TextDeltas, TextStream
from gemma_sessions.testing import tiny_model, tiny_tokenizer


def _logits(seed: int = 0, n: int = 512) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    lg = _logits()
    assert Sampler(SamplingParams(temperature=0))(lg) == int(lg.argmax())


def test_same_seed_same_tokens_different_seed_differs():
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=42)
    s1, s2, s3 = Sampler(p), Sampler(p), Sampler(p.replace(seed=7))
    a = [s1(_logits(i)) for i in range(50)]
    b = [s2(_logits(i)) for i in range(50)]
    c = [s3(_logits(i)) for i in range(50)]
    assert a == b  # one seed, one stream of choices
    assert a != c


def test_top_k_restricts_to_k_best():
    lg = _logits(3)
    allowed = set(torch.topk(lg, 5).indices.tolist())
    s = Sampler(SamplingParams(temperature=2.0, top_k=5, top_p=1.0, seed=1))
    assert {s(lg) for _ in range(300)} <= allowed


def test_top_p_and_min_p_cut_the_tail():
    lg = torch.full((100,), -10.0)
    lg[:3] = torch.tensor([5.0, 4.9, 4.8])  # three near-equal heads, a negligible tail
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.9, seed=2))
    seen = {s(lg) for _ in range(400)}
    assert seen <= {0, 1, 2} and len(seen) >= 2
    m = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.95, seed=3))
    assert {m(lg) for _ in range(200)} <= {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(max_tokens=0), dict(top_k=-1), dict(stop=("",)), dict(stop="###"),
                                 dict(stop=["###"])])
def test_invalid_params_are_refused(bad):
    with pytest.raises(gs.InvalidRequestError):
        SamplingParams(**bad)


def test_max_tokens_and_seeded_generation_on_a_model():
    m = tiny_model("gemma3", seed=1)
    prompt = [2, 50, 60, 70]
    p = SamplingParams(temperature=0.8, max_tokens=7, seed=9, ignore_eos=True)
    a = list(generate_tokens(m, prompt, p))
    assert len(a) == 7 and a == list(generate_tokens(m, prompt, p))
    g = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    assert list(generate_tokens(m, prompt, g)) == list(generate_tokens(m, prompt, g))


def test_text_stream_holds_back_possible_stop_strings():
    tok = tiny_tokenizer()
    ids = tok.encode("abcXYdef")
    ts = TextStream(tok, stop=("XYZ", "de"))
    out = "".join(ts.feed(i) for i in ids)
    assert out == "abcXY" and ts.stopped  # "XY" was held until "de" matched after it
    ts2 = TextStream(tok, stop=("XYZ",))
    out2 = "".join(ts2.feed(i) for i in ids) + ts2.finish()
    assert out2 == "abcXYdef" and not ts2.stopped


def test_text_stream_never_emits_half_a_character():
    tok = tiny_tokenizer()  # no piece for these: byte fallback, several tokens per character
    text = "héllo wörld ✓ 😀"
    ids = tok.encode(text)
    ts = TextStream(tok)
    deltas = [ts.feed(i) for i in ids] + [ts.finish()]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


def test_params_are_never_rewritten_and_round_trip_through_dicts():
    p = SamplingParams(stop=("###", "END"), seed=4)
    assert SamplingParams.from_dict(p.to_dict()) == p and p.to_dict()["stop"] == ["###", "END"]
    assert p.replace(stop=("x",)).stop == ("x",) and p.stop == ("###", "END")


def test_text_deltas_end_at_a_stop_string_and_tell_who_stopped():
    tok = tiny_tokenizer()
    ids = tok.encode("abcXYdef")
    stops = []
    deltas = TextDeltas(iter(ids), tok, ("de",), on_stop=lambda: stops.append(len(deltas.tokens)))
    out = []
    while (d := deltas.next_delta()) is not None:
        out.append(d)
    assert "".join(out) == "abcXY" == deltas.text and deltas.stopped and deltas.done
    assert stops == [len(deltas.tokens)] and deltas.tokens == ids[:len(deltas.tokens)] and len(ids) > len(deltas.tokens)
    assert deltas.next_delta() is None and stops == [len(deltas.tokens)]  # on_stop ran once
    rest = TextDeltas(iter(ids), tok, ("XYZ",))
    assert "".join(iter(rest.next_delta, None)) == "abcXYdef" and rest.done and not rest.stopped
    assert rest.tokens == ids


def test_generate_ends_at_a_stop_string():
    m = tiny_model("gemma3", seed=1)
    prompt = [2, 50, 60, 70]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    full = gs.generate(m, prompt, params)
    assert len(full) > 6, full
    stop = full[4:6]
    cut = gs.generate(m, prompt, params.replace(stop=(stop,)))
    assert cut == full[:full.index(stop)] and stop not in cut
    assert "".join(gs.generate_stream(m, prompt, params, stop=[stop])) == cut


@pytest.mark.parametrize("kw", [dict(temperature=1e-45), dict(temperature=1e-300), dict(top_p=5e-324),
                                dict(top_p=1e-300, temperature=2.0), dict(min_p=1.0), dict(top_k=10 ** 12)])
def test_extreme_parameters_still_pick_a_token(kw):
    """A request's sampling values, however extreme, never make NaN probabilities (they failed the request)."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 10
    token = Sampler(SamplingParams(seed=1, **kw))(logits)
    assert 0 <= token < 1000
    if kw.get("temperature", 1.0) < 1e-30 or "top_p" in kw or "min_p" in kw:
        assert token == int(logits.argmax())  # all of these leave only the top token
