"""The chat REPL's reasoning switch: `/reasoning on|off` reaches the session's turns, thoughts print apart."""

from __future__ import annotations

import builtins
import io
import types

from gemma_sessions.repl import Repl


class ScriptedSession:
    """A session whose turns return scripted parts; records the reasoning switch each turn was asked with."""

    id = "sess_test"
    messages: list = []

    def __init__(self, parts):
        self.parts, self.asked = parts, []

    def stream(self, text, reasoning=None):
        self.asked.append(reasoning)
        parts = list(self.parts)
        stats = types.SimpleNamespace(generated_tokens=3, cached_tokens=0, prompt_tokens=5, ttft_s=0.01,
                                      decode_tokens_per_s=10.0)
        return types.SimpleNamespace(next_part=lambda: parts.pop(0) if parts else None, close=lambda: None,
                                     reply=types.SimpleNamespace(stats=stats))


def run_repl(monkeypatch, session, lines):
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    out = io.StringIO()
    assert Repl(manager=None, session=session, out=out).run() == 0
    return out.getvalue()


def test_reasoning_switch_reaches_the_turns_and_thoughts_print_apart(monkeypatch):
    session = ScriptedSession([("reasoning", "let me see"), ("content", "Paris.")])
    text = run_repl(monkeypatch, session, ["hi", "/reasoning on", "again", "/reasoning off", "more",
                                           "/reasoning maybe"])
    assert session.asked == [None, True, False]  # the session's own switch until /reasoning says otherwise
    assert "gemma> [thinking: let me see]\n       Paris." in text
    assert "reasoning on for the next turns" in text
    assert "usage: /reasoning on|off" in text


def test_a_reply_without_thoughts_prints_as_before(monkeypatch):
    session = ScriptedSession([("content", "Hello"), ("content", " there")])
    text = run_repl(monkeypatch, session, ["hi"])
    assert "gemma> Hello there\n[3 tokens, 0/5 cached" in text
    assert "thinking" not in text
