"""Gemma 4's chat format at the token level: the system turn, the thinking switch, the thought channel, history
without thoughts and what that does to prefix reuse; the template read from the model's files; Gemma 4 GGUF
tokenizers (ranked merges); and thoughts kept apart from the answer in text streams.

The reference rendering is a Jinja template written here from the published Gemma 4 ``chat_template.jinja`` (its
system block, turn markers, ``strip_thinking`` and generation prompt; no tools), rendered with jinja2 and tokenized
the way a tokenizer sees a rendered template: control tokens split out, each text between them encoded as one piece.
"""

from __future__ import annotations

import random
import re

import jinja2
import pytest

from gemma_sessions.errors import InvalidRequestError, TokenizerError
from gemma_sessions.sampling import TextDeltas
from gemma_sessions.sessions.chat_format import Gemma4Format, GemmaFormat, chat_format, split_thoughts
from gemma_sessions.sessions.conversation import Conversation, render_chat, render_turn
from gemma_sessions.testing import tiny_gemma4_tokenizer, tiny_tokenizer
from gemma_sessions.tokenizer import CONTROL, Tokenizer

STRIP = r"""
{%- macro strip_thinking(text) -%}
  {%- set ns = namespace(out='') -%}
  {%- for part in text.split('<channel|>') -%}
    {%- set ns.out = ns.out + (part.split('<|channel>')[0] if '<|channel>' in part else part) -%}
  {%- endfor -%}
  {{- ns.out | trim -}}
{%- endmacro -%}"""
TEMPLATE = STRIP + r"""
{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if enable_thinking or messages[0]['role'] == 'system' -%}
  {{- '<|turn>system\n' -}}
  {%- if enable_thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
  {%- if messages[0]['role'] == 'system' -%}
    {{- messages[0]['content'] | trim -}}
    {%- set loop_messages = messages[1:] -%}
  {%- endif -%}
  {{- '<turn|>\n' -}}
{%- endif -%}
{%- for m in loop_messages -%}
  {%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
  {{- '<|turn>' + role + '\n' -}}
  {%- if role == 'model' -%}{{- strip_thinking(m['content']) -}}{%- else -%}{{- m['content'] | trim -}}{%- endif -%}
  {{- '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|turn>model\n' -}}
  {%- if not enable_thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""
SPECIALS = ("<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>")


def template_ids(tok, messages, *, thinking=False, generation=True, template=TEMPLATE) -> list[int]:
    text = jinja2.Template(template).render(messages=messages, bos_token="<bos>", enable_thinking=thinking,
                                            add_generation_prompt=generation)
    return special_ids(tok, text)


def special_ids(tok, text: str) -> list[int]:
    """``text`` tokenized with its control tokens parsed (each text between two of them encoded as one piece)."""
    ids: list[int] = []
    for piece in re.split("(" + "|".join(re.escape(s) for s in SPECIALS) + ")", text):
        if piece in SPECIALS:
            ids.append(tok.token_id(piece))
        elif piece:
            ids += tok.encode(piece)
    return ids


@pytest.fixture(scope="module")
def tok():
    return tiny_gemma4_tokenizer()


# ------------------------------------------------------------------------------------------------ vocabulary


def test_the_tiny_gemma4_tokenizer_has_each_marker_as_one_control_token(tok):
    base = tiny_tokenizer()
    for piece in SPECIALS[1:]:
        token_id = tok.token_id(piece)
        assert token_id is not None and tok.is_control(token_id)
        assert tok.encode(piece) != [token_id]  # typed out by a user, it stays text
    assert (tok.turn_open_id, tok.turn_close_id) == (4, 5)  # where Gemma 3's turn markers are (105/106 in the real one)
    assert tok.start_of_turn_id is None and tok.end_of_turn_id is None
    assert tok.encode("hello world\n") == base.encode("hello world\n")  # every other id as in tiny_tokenizer
    assert isinstance(chat_format(tok), Gemma4Format) and type(chat_format(base)) is GemmaFormat


def test_the_stop_ids_of_a_gemma4_model_include_the_end_of_turn():
    from gemma_sessions.testing import tiny_gemma4_model

    model = tiny_gemma4_model("plain")
    assert model.tokenizer.turn_close_id in model.stop_ids and model.tokenizer.eos_id in model.stop_ids


# ------------------------------------------------------------------------------------------------ rendering


CHAT = [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": " and then? "}]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("system", [True, False])
def test_a_stateless_chat_renders_as_the_template_does(tok, thinking, system):
    messages = CHAT if system else CHAT[1:]
    pairs = [(m["role"], m["content"]) for m in messages]
    assert render_chat(tok, pairs, reasoning=thinking) == template_ids(tok, messages, thinking=thinking)


def test_the_format_renders_system_turn_and_prompt_exactly(tok):
    fmt = chat_format(tok)
    t = tok.token_id
    assert fmt.prefix(None, False) == [tok.bos_id]  # no system prompt and thinking off: no system turn
    assert fmt.prefix("S", True) == [tok.bos_id, t("<|turn>"), *tok.encode("system\n"), t("<|think|>"),
                                     *tok.encode("\nS"), t("<turn|>"), *tok.encode("\n")]
    assert fmt.generation_prompt(True) == [t("<|turn>"), *tok.encode("model\n")]
    assert fmt.generation_prompt(False) == [t("<|turn>"), *tok.encode("model\n"), t("<|channel>"),
                                            *tok.encode("thought\n"), t("<channel|>")]


def test_gemma3_renders_as_before_and_refuses_reasoning():
    tok3 = tiny_tokenizer()
    ids = render_chat(tok3, [("system", "S"), ("user", "hi"), ("assistant", "yo"), ("user", "x")])
    expected = [tok3.bos_id, *render_turn(tok3, "user", "S\n\nhi"), *render_turn(tok3, "model", "yo"),
                *render_turn(tok3, "user", "x"), tok3.start_of_turn_id, *tok3.encode("model\n")]
    assert ids == expected
    with pytest.raises(InvalidRequestError, match="no thinking mode"):
        render_chat(tok3, [("user", "hi")], reasoning=True)
    with pytest.raises(InvalidRequestError, match="no thinking mode"):
        Conversation(tok3, "S", reasoning=True)


# ------------------------------------------------------------------------------------------------ history


def _reply(tok, thought: str | None, answer: str) -> list[int]:
    """What a thinking model writes: ``<|channel>thought\\n{thought}<channel|>{answer}`` (the stop id not included)."""
    head = [] if thought is None else [tok.token_id("<|channel>"), *tok.encode(f"thought\n{thought}"),
                                       tok.token_id("<channel|>")]
    return [*head, *tok.encode(answer)]


@pytest.mark.parametrize("thinking", [False, True])
def test_history_drops_thoughts_and_equals_the_rendered_history(tok, thinking):
    conv = Conversation(tok, "Be brief.", reasoning=thinking)
    plan = conv.plan_turn("hi there", 32, 4096, "error")
    assert list(plan.prompt) == template_ids(tok, [CHAT[0], CHAT[1]], thinking=thinking)
    reply = _reply(tok, "think hard" if thinking else None, "hello")
    conv.replace(conv.with_turn(plan, "hello", reply), reasoning=plan.reasoning)
    history = [CHAT[0], CHAT[1], {"role": "assistant", "content": "<|channel>thought\nthink hard<channel|>hello"}]
    assert conv.token_ids == template_ids(tok, history, thinking=thinking, generation=False)
    assert tok.token_id("<|channel>") not in conv.token_ids
    assert (tok.think_id in conv.token_ids) == thinking

    nxt = conv.plan_turn("and then?", 32, 4096, "error")
    assert list(nxt.prompt) == template_ids(tok, [*history, CHAT[3]], thinking=thinking)
    assert list(nxt.prompt[:len(conv.token_ids)]) == conv.token_ids  # the next prompt extends the history
    # what the KV holds after turn 1 (prompt + every generated id) and the next prompt part after "<|turn>model\n":
    # where the thoughts began (thinking on: turn 1's whole prompt is reused) or at the empty thought channel of the
    # generation prompt (thinking off); the engine can reuse no more than that
    seen = [*plan.prompt, *reply]
    common = next(i for i, (a, b) in enumerate(zip(seen, nxt.prompt)) if a != b)
    header = [tok.turn_open_id, *tok.encode("model\n")]
    assert common == len(plan.prompt) - len(chat_format(tok).generation_prompt(thinking)) + len(header)
    assert common == len(plan.prompt) if thinking else common < len(plan.prompt)


def test_a_reply_that_stops_while_thinking_leaves_an_empty_answer(tok):
    conv = Conversation(tok, None, reasoning=True)
    plan = conv.plan_turn("hi", 8, 4096, "error")
    reply = [tok.token_id("<|channel>"), *tok.encode("thought\nstill")]
    (_, model) = conv.with_turn(plan, "", reply)
    assert list(model.token_ids) == [tok.turn_open_id, *tok.encode("model\n"), tok.turn_close_id, *tok.encode("\n")]
    assert split_thoughts(reply, chat_format(tok).channel) == ([], len(reply))
    stray = [*tok.encode("a"), tok.token_id("<channel|>"), *tok.encode("b")]  # a close outside a channel: answer
    assert split_thoughts(stray, chat_format(tok).channel) == (stray, 0)


def test_the_thinking_switch_is_the_last_turns_and_a_change_rerenders_the_system_turn(tok):
    conv = Conversation(tok, "S")
    off = conv.plan_turn("hi", 8, 4096, "error")
    conv.replace(conv.with_turn(off, "yo", tok.encode("yo")), reasoning=off.reasoning)
    before = conv.token_ids
    on = conv.plan_turn("more", 8, 4096, "error", reasoning=True)
    assert on.reasoning and tok.think_id in on.prompt and tok.think_id not in before
    assert conv.token_ids == before  # planning changes nothing
    conv.replace(conv.with_turn(on, "ok", tok.encode("ok")), reasoning=on.reasoning)
    assert conv.reasoning and tok.think_id in conv.token_ids
    assert conv.token_ids[len(conv.format.prefix("S", True)):][:len(before) - len(conv.format.prefix("S", False))] \
        == before[len(conv.format.prefix("S", False)):]  # the turns themselves did not change


def test_truncation_keeps_the_system_turn_and_never_rerenders_a_user_turn(tok):
    conv = Conversation(tok, "S")
    for i in range(6):
        plan = conv.plan_turn(f"turn {'x' * 10} {i}", 8, 4096, "error")
        conv.replace(conv.with_turn(plan, "ok", tok.encode("ok")), reasoning=plan.reasoning)
    size = len(conv.token_ids)
    plan = conv.plan_turn("last", 8, size - 20, "truncate_oldest")
    assert plan.dropped >= 1
    assert list(plan.prompt[:len(conv.format.prefix("S", False))]) == conv.format.prefix("S", False)
    assert plan.history[0].token_ids == conv.messages[2 * plan.dropped].token_ids


# ------------------------------------------------------------------------------------------------ templates


def test_the_template_read_from_the_model_decides_the_details(tok):
    pieces, scores, types = tok.vocab()

    def fmt(template):
        t = Tokenizer(pieces, scores, types, bos_id=2, eos_id=1, pad_id=0, unk_id=3, chat_template=template)
        return chat_format(t)

    current = fmt(TEMPLATE)
    assert (current.thinking, current.empty_thought, current.drops_thoughts) == (True, True, True)
    older = fmt(TEMPLATE.replace("{%- if not enable_thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}",
                                 ""))
    assert (older.thinking, older.empty_thought, older.drops_thoughts) == (True, False, True)
    assert older.generation_prompt(False) == [tok.turn_open_id, *tok.encode("model\n")]
    keeps = fmt(TEMPLATE.replace(STRIP, "").replace("strip_thinking(m['content'])", "m['content']"))
    assert not keeps.drops_thoughts
    reply = _reply(tok, "t", "a")  # a template that keeps thoughts keeps every id the model saw and produced
    assert keeps.close_reply(reply, True) == [*keeps.generation_prompt(True), *reply, tok.turn_close_id,
                                              *tok.encode("\n")]
    no_switch = fmt(TEMPLATE.replace("<|think|>", "").replace("enable_thinking or ", ""))
    assert not no_switch.thinking
    with pytest.raises(InvalidRequestError):
        no_switch.generation_prompt(True)


def test_hf_and_gguf_tokenizers_carry_the_chat_template(tmp_path, tok):
    import json

    from gemma_sessions.testing import write_sentencepiece_model

    write_sentencepiece_model(tmp_path / "tokenizer.model", tok)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]}))
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("{{ '<|turn>' }}")  # the file wins, as in transformers
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "{{ '<|turn>' }}"
    pieces, scores, types = tok.vocab()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.chat_template": TEMPLATE}
    assert Tokenizer.from_gguf_metadata(meta).chat_template == TEMPLATE


# ------------------------------------------------------------------------------------------------ GGUF "gemma4"


def _ranked_vocab():
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [CONTROL, CONTROL, CONTROL, 2, CONTROL, CONTROL] + [6] * 256
    words = ["a", "b", "c", "\u2581", "\n", "bc", "ab", "abc", "\u2581a", "\u2581ab", "\n\n", "ca", "cab", "aa"]
    # "abc" is a piece, but only "ab c" makes it: after "b c" (rank 0) took "bc", "a"+"bc" never merges by rank
    merges = ["b c", "a b", "ab c", "\u2581 a", "\u2581a b", "\n \n", "c a", "ca b", "a a"]
    return pieces + words, types + [1] * len(words), merges


def test_a_gemma4_gguf_tokenizer_merges_by_rank_like_hf_tokenizers():
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pieces, types, merges = _ranked_vocab()
    ours = Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1})
    ref = HFTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                                 merges=[tuple(m.split(" ", 1)) for m in merges], byte_fallback=True))
    ref.normalizer = normalizers.Replace(" ", "\u2581")
    ref.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")  # llama.cpp: [^\n]+|[\n]+
    ref.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    assert ours.encode("abc") == [pieces.index("a"), pieces.index("bc")]  # a score-based merge would give "abc"
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc \nd") for _ in range(rng.randint(1, 14)))
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.decode(ours.encode(text)) == text
    assert ours.fingerprint != Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges[::-1]}).fingerprint  # the ranks are part of the vocabulary's identity
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": pieces})
    with pytest.raises(TokenizerError, match="gpt2"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": pieces})


# ------------------------------------------------------------------------------------------------ text streams


def _parts(deltas: TextDeltas) -> list[tuple[str, str]]:
    out = []
    while (part := deltas.next_part()) is not None:
        out.append(part)
    return out


def test_thoughts_stream_apart_from_the_answer(tok):
    ids = _reply(tok, "step one\nstep two", "The answer")
    deltas = TextDeltas(ids, tok, channel=chat_format(tok).channel)
    parts = _parts(deltas)
    assert "".join(t for k, t in parts if k == "reasoning") == deltas.reasoning == "step one\nstep two"
    assert "".join(t for k, t in parts if k == "content") == deltas.text == "The answer"
    assert [k for k, _ in parts] == sorted((k for k, _ in parts), reverse=True)  # thoughts first, then the answer
    assert deltas.reasoning_tokens == len(ids) - len(tok.encode("The answer")) and deltas.tokens == ids
    plain = TextDeltas(ids, tok)  # without a channel (Gemma 1-3): every id is answer text, as before
    assert all(k == "content" for k, _ in _parts(plain)) and plain.reasoning == "" and plain.reasoning_tokens == 0


def test_a_stop_string_applies_to_the_answer_only_and_an_open_channel_is_all_thought(tok):
    ids = _reply(tok, "say STOP now", "fine STOP more")
    cancelled = []
    deltas = TextDeltas(ids, tok, ("STOP",), on_stop=lambda: cancelled.append(1), channel=chat_format(tok).channel)
    _parts(deltas)
    assert deltas.reasoning == "say STOP now" and deltas.text == "fine " and deltas.stopped and cancelled == [1]
    unclosed = [tok.token_id("<|channel>"), *tok.encode("thought\nhmm")]
    deltas = TextDeltas(unclosed, tok, channel=chat_format(tok).channel)
    assert {k for k, _ in _parts(deltas)} == {"reasoning"} and deltas.reasoning == "hmm" and deltas.text == ""
    empty = [tok.token_id("<|channel>"), *tok.encode("thought"), tok.token_id("<channel|>"), *tok.encode("x")]
    assert _parts(TextDeltas(empty, tok, channel=chat_format(tok).channel)) == [("content", "x")]
    nameless = [tok.token_id("<|channel>"), *tok.encode("no name here\nyes"), tok.token_id("<channel|>")]
    deltas = TextDeltas(nameless, tok, channel=chat_format(tok).channel)
    assert _parts(deltas)[0] == ("reasoning", "no name here\n") and deltas.reasoning == "no name here\nyes"
