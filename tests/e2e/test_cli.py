"""The chat REPL driven through a pseudo-terminal (pexpect), and the `sessions` commands, on the real model."""

from __future__ import annotations

import subprocess
import sys

import pexpect
import pytest

pytestmark = pytest.mark.slow


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma_sessions.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_repl_conversation_fork_export_ctrl_c(tmp_path, real_model_path):
    store = tmp_path / "store"
    child = pexpect.spawn(sys.executable, ["-m", "gemma_sessions.cli", "chat", "--store", str(store),
                                           "--max-tokens", "12", "--temperature", "0"],
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect(r"session ([0-9a-f]{32})")
    first_id = child.match.group(1)
    child.expect("you> ")
    child.sendline("Hello, who are you?")
    child.expect(r"\[(\d+) tokens, (\d+)/(\d+) cached")
    child.expect("you> ")
    child.sendline("Tell me more \\")  # multi-line input
    child.expect(r"\.\.\.> ")
    child.sendline("about yourself.")
    child.expect(r"\[(\d+) tokens, (\d+)/(\d+) cached")
    assert int(child.match.group(2)) > 0  # the second turn reused the first turn's KV
    child.expect("you> ")
    child.sendline("/fork")
    child.expect(r"forked: now in ([0-9a-f]{32})")
    fork_id = child.match.group(1)
    assert fork_id != first_id
    child.expect("you> ")
    child.sendline("/history")
    child.expect("Tell me more \r?\nabout yourself.")
    child.expect("you> ")
    export = tmp_path / "s.gsession"
    child.sendline(f"/export {export}")
    child.expect(r"wrote .* \((\d+) bytes\)")
    child.expect("you> ")
    child.sendline("/stats")
    child.expect("turns: 2")
    child.expect("you> ")
    # Ctrl-C during a long reply stops the reply, not the program
    child.sendline("Write a very long story about a dragon." + " " * 0)
    child.expect("gemma> ")
    child.sendintr()
    child.expect(r"\[reply stopped\]")
    child.expect("you> ")
    child.sendline("/sessions")
    child.expect(fork_id)
    child.expect("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert export.stat().st_size > 1000

    ls = _cli("sessions", "ls", "--store", str(store))
    assert first_id in ls.stdout and fork_id in ls.stdout
    show = _cli("sessions", "show", first_id, "--store", str(store))
    assert "Hello, who are you?" in show.stdout and "dragon" not in show.stdout  # stopped turn not kept
    imported = _cli("sessions", "import", str(export), "--new-id", "--store", str(store))
    assert imported.returncode == 0, imported.stderr
    new_id = imported.stdout.strip().splitlines()[-1]
    assert new_id in _cli("sessions", "ls", "--store", str(store)).stdout
    assert _cli("sessions", "rm", new_id, "--store", str(store)).returncode == 0
    assert new_id not in _cli("sessions", "ls", "--store", str(store)).stdout
    missing = _cli("sessions", "show", "nope", "--store", str(store))
    assert missing.returncode == 1 and missing.stderr.startswith("error:")
