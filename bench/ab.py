"""A/B: one benchmark script at two commits, in one run, alternating, so a change is judged against its parent on
the same machine in the same minutes (the machines here move ~2x within a day).

    python bench/ab.py --base da1c4c1 --rounds 2 -- generate.py --engines ours-int8,llama
    python bench/ab.py --base da1c4c1 -- concurrency.py --n 1,16

Each side runs its own copy of the script (``git worktree`` of the base commit under bench/out/ab/, the current
checkout for the head, or a worktree of ``--head``), with its own ``src`` first on PYTHONPATH, so the peers' code (llama.cpp) and each side's own
benchmark logic are what that commit had. Rounds alternate base, head, base, head... Each script already takes its
medians over several runs and measures its peer beside ours: compare the ratios to the peer, not absolute speeds.
Prints each round's table and writes every run's JSON (the script's own) to bench/out/ab-<script>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def worktree(commit: str) -> Path:
    """A detached worktree of ``commit`` under bench/out/ab/ (reused when it is there)."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    path = BENCH / "out" / "ab" / sha[:12]
    if not (path / "src").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", str(path), sha)
    return path


def run_side(tree: Path, script: str, args: list[str]) -> dict:
    """Run ``tree``'s copy of the script with that tree's package first on the path; return its JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")]))
    name = Path(script).stem
    out_json = tree / "bench" / "out" / f"{name}.json"
    out_json.unlink(missing_ok=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(tree / "bench" / script), *args], cwd=tree, env=env, text=True,
                          capture_output=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{script} failed at {tree} (exit {proc.returncode})")
    data = json.loads(out_json.read_text()) if out_json.exists() else {}
    return {"seconds": round(time.time() - t0, 1), "result": data}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against (e.g. the parent of a change)")
    p.add_argument("--head", default=None,
                   help="the commit to measure (default: this checkout, with its uncommitted changes)")
    p.add_argument("--rounds", type=int, default=1, help="alternating base/head rounds (default 1)")
    p.add_argument("script", help="a script under bench/, e.g. generate.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments (after --)")
    a = p.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    head = git("rev-parse", "--short=12", a.head or "HEAD")
    dirty = a.head is None and bool(git("status", "--porcelain", "--untracked-files=no"))
    sides = {"base": worktree(a.base), "head": worktree(a.head) if a.head else ROOT}
    print(f"A/B {a.script} {' '.join(args)}: base {a.base} vs head {head}{' (+ uncommitted changes)' if dirty else ''}"
          f", {a.rounds} round(s)\n")
    runs: dict[str, list] = {"base": [], "head": []}
    for r in range(a.rounds):
        for side in ("base", "head"):
            print(f"\n===== round {r + 1}: {side} ({sides[side]}) =====\n", flush=True)
            runs[side].append(run_side(sides[side], a.script, args))
    out = BENCH / "out" / f"ab-{Path(a.script).stem}.json"
    out.write_text(json.dumps({"script": a.script, "args": args, "base": a.base, "head": head, "dirty": dirty,
                               "runs": runs}, indent=1, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
