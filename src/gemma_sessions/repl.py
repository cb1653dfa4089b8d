"""The chat REPL behind ``gemma-sessions chat``: streams replies, keeps the conversation in the store.

Contract: reads lines from the terminal; a line ending in ``\\`` continues on the next line (multi-line input);
``/commands`` manage sessions; Ctrl-C stops the current reply (the turn is not kept), not the program; Ctrl-D or
``/quit`` exits. Everything goes through the public SessionManager API.
"""

from __future__ import annotations

import sys

from .errors import GemmaSessionsError

HELP = """commands:
  /new                 start a new session          /sessions        list sessions
  /switch ID           continue another session     /fork            fork this session and switch to the fork
  /history             show this session's messages /stats           this session's statistics
  /export PATH         write this session to a file /help            this text
  /reasoning on|off    thinking for the next turns  /quit            leave (Ctrl-D works too)
end a line with \\ to continue typing on the next line; Ctrl-C stops a reply."""


class Repl:
    def __init__(self, manager, session, out=sys.stdout, system: str | None = None, sampling=None):
        self.manager, self.session, self.out = manager, session, out
        self.system, self.sampling = system, sampling
        self.reasoning: bool | None = None  # /reasoning: overrides the session's switch for the next turns

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def read(self) -> str | None:
        lines = []
        prompt = "you> "
        while True:
            try:
                line = input(prompt)
            except EOFError:
                return None
            except KeyboardInterrupt:
                self.say("^C (type /quit to leave)")
                lines, prompt = [], "you> "
                continue
            if line.endswith("\\"):
                lines.append(line[:-1])
                prompt = "...> "
                continue
            lines.append(line)
            return "\n".join(lines)

    def run(self) -> int:
        self.say(f"session {self.session.id} ({len(self.session.messages) // 2} turns). /help for commands.")
        while (text := self.read()) is not None:
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    if self.command(text.strip()) == "quit":
                        break
                else:
                    self.turn(text)
            except GemmaSessionsError as exc:
                self.say(f"error: {exc}")
        return 0

    def turn(self, text: str) -> None:
        stream = self.session.stream(text, reasoning=self.reasoning)
        self.out.write("gemma> ")
        kind = "content"
        try:
            while (part := stream.next_part()) is not None:
                if part[0] != kind:  # thoughts go in [thinking: ...], apart from the answer
                    self.out.write("[thinking: " if part[0] == "reasoning" else "]\n       ")
                    kind = part[0]
                self.out.write(part[1])
                self.out.flush()
            if kind == "reasoning":
                self.out.write("]")
        except KeyboardInterrupt:
            stream.close()
            self.say("\n[reply stopped]")
            return
        st = stream.reply.stats
        self.say(f"\n[{st.generated_tokens} tokens, {st.cached_tokens}/{st.prompt_tokens} cached, "
                 f"ttft {st.ttft_s * 1000:.0f} ms, {st.decode_tokens_per_s:.1f} tok/s]")

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        m = self.manager
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/help":
            self.say(HELP)
        elif name == "/new":
            self.session = m.create(system=self.system, sampling=self.sampling)
            self.say(f"new session {self.session.id}")
        elif name == "/sessions":
            for s in m.list():
                mark = "*" if s.id == self.session.id else " "
                first = next((x.text for x in s.messages if x.role == "user"), "")
                self.say(f"{mark} {s.id}  {len(s.messages) // 2:3d} turns  {first[:40]!r}")
        elif name == "/switch":
            self.session = m.get(arg)
            self.say(f"switched to {self.session.id} ({len(self.session.messages) // 2} turns)")
        elif name == "/fork":
            self.session = m.fork(self.session.id)
            self.say(f"forked: now in {self.session.id}")
        elif name == "/history":
            for msg in self.session.messages:
                self.say(f"{'you' if msg.role == 'user' else 'gemma'}> {msg.text}")
        elif name == "/stats":
            for k, v in self.session.stats.items():
                self.say(f"  {k}: {v}")
        elif name == "/export":
            if not arg:
                self.say("usage: /export PATH")
            else:
                n = m.export(self.session.id, arg)
                self.say(f"wrote {arg} ({n} bytes)")
        elif name == "/reasoning":
            if arg not in ("on", "off"):
                self.say("usage: /reasoning on|off")
            else:
                self.reasoning = arg == "on"
                self.say(f"reasoning {arg} for the next turns")
        else:
            self.say(f"unknown command {name}; /help lists them")
        return None
