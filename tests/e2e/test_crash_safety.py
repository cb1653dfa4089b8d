"""kill -9 a process in the middle of turns and snapshot writes, at random points, 20 times: the store always
reopens, every turn reported complete is there, and no partial file is visible."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import gemma_sessions as gs
from gemma_sessions.sessions.sessionfile import read_session_file
from gemma_sessions.sessions.store import Store
from gemma_sessions.testing import tiny_model

WORKER = Path(__file__).with_name("crash_worker.py")


def _run_and_kill(store: Path, rng: random.Random) -> dict[str, int]:
    proc = subprocess.Popen([sys.executable, str(WORKER), str(store)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    os.set_blocking(proc.stdout.fileno(), False)
    time.sleep(rng.uniform(0.05, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done: dict[str, int] = {}
    rest = proc.stdout.read() or ""
    for line in rest.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "DONE":
            done[parts[1]] = max(done.get(parts[1], 0), int(parts[2]))
    return done


def test_kill_9_twenty_times(tmp_path):
    rng = random.Random(1234)
    store_dir = tmp_path / "store"
    model = tiny_model("gemma3", seed=21)
    reported: dict[str, int] = {}
    for _ in range(20):
        for sid, n in _run_and_kill(store_dir, rng).items():
            reported[sid] = max(reported.get(sid, 0), n)
        store = Store(store_dir)  # must reopen (and clean up) after every crash
        try:
            kv_files = list((store_dir / "kv").iterdir())
            assert not [f for f in kv_files if f.name.startswith(".")], "a partial file is visible"
            for f in kv_files:  # every visible snapshot is whole and verifies
                read_session_file(f, model_fingerprint=model.fingerprint,
                                  tokenizer_fingerprint=model.tokenizer.fingerprint)
            with gs.Engine(model, kv_cache_bytes=1 << 20, block_size=4) as engine:
                manager = gs.SessionManager(engine, store=None)
                for sid, n in reported.items():
                    s = store.load_session(manager, sid)
                    assert s is not None, f"session {sid} lost"
                    assert len(s.messages) >= n, f"{sid}: {len(s.messages)} messages, {n} were reported"
        finally:
            store.close(snapshot_all=False)
    assert sum(reported.values()) > 20, "the workers hardly ran: the test proved little"
