"""A real `gemma-sessions serve` process on 127.0.0.1 for end-to-end tests (the real model, a real store)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import openai

KEY_A, KEY_B = "key-a-" + "x" * 20, "key-b-" + "y" * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url``/health until it answers 200 (True) or the process exits (False); RuntimeError on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            return False
    raise RuntimeError(f"server did not start in {timeout:.0f} s")


class Server:
    def __init__(self, store, port: int, extra: list[str] | None = None):
        self.port, self.store, self.extra = port, store, extra or []
        self.proc = None

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "gemma_sessions.cli", "serve", "--store", str(self.store), "--port",
               str(self.port), "--api-key", KEY_A, "--api-key", KEY_B, "--kv-cache-bytes", str(96 << 20),
               *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if not wait_healthy(self.url, self.proc, 120):
            raise RuntimeError(self.proc.stdout.read())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY_A) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def headers(self, key: str = KEY_A) -> dict:
        return {"Authorization": f"Bearer {key}"}

    def rss(self) -> int:
        """The server process's resident memory in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(line for line in f if line.startswith("VmRSS:")).split()[1]
        return int(kb) * 1024

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int | None:
        """Stop gracefully (snapshots are written on shutdown); returns the exit status."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None
