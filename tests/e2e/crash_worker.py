"""A worker process for the kill -9 test: runs turns on a few sessions of a store until it is killed.

Prints ``READY`` once started and ``DONE <session id> <messages>`` after each turn that was reported complete.
"""

from __future__ import annotations

import sys

import gemma_sessions as gs
from gemma_sessions.testing import tiny_model


def main(store_dir: str) -> None:
    model = tiny_model("gemma3", seed=21)
    params = gs.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with gs.Engine(model, kv_cache_bytes=2 << 20, block_size=4) as engine:
        manager = gs.SessionManager(engine, store=store_dir)
        sessions = manager.list()[:3]
        while len(sessions) < 3:
            sessions.append(manager.create(sampling=params))
        print("READY", flush=True)
        turn = 0
        while True:
            for s in sessions:
                s.send(f"turn {turn} of {s.id[:4]}")
                print(f"DONE {s.id} {len(s.messages)}", flush=True)
            turn += 1


if __name__ == "__main__":
    main(sys.argv[1])
