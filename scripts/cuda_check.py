"""Device check (run where CUDA exists): the same tiny models on cpu and cuda give the same greedy tokens, and
the engine, sessions, fork and KV snapshots work on cuda. Prints a line per check; exits non-zero on a failure.

    python scripts/cuda_check.py
"""

from __future__ import annotations

import sys

import torch

import gemma_sessions as gs
from gemma_sessions.generate import generate_tokens
from gemma_sessions.testing import tiny_griffin_model, tiny_model


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    greedy = gs.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    failures = 0
    for arch in ("gemma", "gemma2", "gemma3"):
        cpu, gpu = tiny_model(arch, seed=3), tiny_model(arch, seed=3, device="cuda")
        ids = [2] + list(range(10, 60))
        diff = (cpu.forward(ids) - gpu.forward(ids).cpu()).abs().max().item()
        same = list(generate_tokens(cpu, ids, greedy)) == list(generate_tokens(gpu, ids, greedy))
        prompts = [[2] + list(range(10 + i, 30 + 5 * i)) for i in range(5)]
        alone = [list(generate_tokens(gpu, p, greedy)) for p in prompts]
        with gs.Engine(gpu, kv_cache_bytes=8 << 20, block_size=4, max_batched_tokens=16) as engine:
            batched = [s.result().token_ids for s in [engine.submit(p, greedy) for p in prompts]]
            m = gs.SessionManager(engine)
            s = m.create(sampling=greedy.replace(max_tokens=6))
            s.send("hello")
            f = m.fork(s.id)
            fork_ok = f.send("again").token_ids == s.send("again").token_ids
            snap = engine.export_kv(s.kv)
        with gs.Engine(cpu, kv_cache_bytes=8 << 20, block_size=4) as engine:  # a cuda snapshot restored on cpu
            kv = engine.new_kv()
            restored = engine.import_kv(kv, snap)
        ok = diff < 1e-3 and same and batched == alone and fork_ok and restored
        failures += not ok
        print(f"{arch}: cpu-vs-cuda max logit diff {diff:.2e}, greedy equal {same}, batched==alone {batched == alone}, "
              f"fork ok {fork_ok}, cuda->cpu snapshot {restored}: {'OK' if ok else 'FAIL'}")
    failures += not griffin(greedy)
    bf = tiny_model("gemma3", seed=3, weight_format="bfloat16", device="cuda")
    print("bf16 on cuda generates:", len(list(generate_tokens(bf, [2, 10, 11], greedy))), "tokens")
    return 1 if failures else 0


def griffin(greedy: gs.SamplingParams) -> bool:
    """RecurrentGemma on cuda: parity with cpu, batched == alone over state slots, sessions with reuse and fork,
    and a cuda state snapshot continued on cpu."""
    cpu, gpu = tiny_griffin_model(seed=3), tiny_griffin_model(seed=3, device="cuda")
    ids = [2] + list(range(10, 60))
    diff = (cpu.forward(ids) - gpu.forward(ids).cpu()).abs().max().item()
    same = list(generate_tokens(cpu, ids, greedy)) == list(generate_tokens(gpu, ids, greedy))
    prompts = [[2] + list(range(10 + i, 30 + 5 * i)) for i in range(5)]
    alone = [list(generate_tokens(gpu, p, greedy)) for p in prompts]
    six = greedy.replace(max_tokens=6)
    with gs.Engine(gpu, kv_cache_bytes=8 << 20, max_batched_tokens=16) as engine:
        batched = [s.result().token_ids for s in [engine.submit(p, greedy) for p in prompts]]
        m = gs.SessionManager(engine)
        s = m.create(system="be brief", sampling=six)
        s.send("hello")
        f = m.fork(s.id)
        fork_ok = f.send("again").token_ids == s.send("again").token_ids
        snap, history = engine.export_kv(s.kv), s.token_ids
        follow = s.send("more").token_ids
    with gs.Engine(cpu, kv_cache_bytes=8 << 20) as engine:  # the cuda state continued on cpu
        kv = engine.new_kv()
        restored = engine.import_kv(kv, snap)
        prompt = [*history, *gs.sessions.conversation.render_turn(cpu.tokenizer, "user", "more"),
                  *gs.sessions.conversation.generation_prompt(cpu.tokenizer)]
        out = engine.submit(prompt, six, kv=kv).result()
        continued = out.token_ids == follow and out.stats.cached_tokens == len(snap.tokens)
    ok = diff < 1e-3 and same and batched == alone and fork_ok and restored and continued
    print(f"recurrentgemma: cpu-vs-cuda max logit diff {diff:.2e}, greedy equal {same}, batched==alone "
          f"{batched == alone}, fork ok {fork_ok}, cuda->cpu state restored {restored} and continued {continued}: "
          f"{'OK' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
