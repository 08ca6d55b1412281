"""Benchmark of the CPU model: per-stage and whole-chain time, runs per second, peak memory.

    python tools/bench_cpu_chain.py [--json OUT.json] [--repeat N]

Each configuration runs in a fresh subprocess so its peak resident memory is its own.
Targets (issue 2): the small cases at >= 500 chain runs per second; T = 400,000 (E = 512,
K = 22) in <= 30 s and <= 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = [(16, 8, 2), (64, 64, 8), (512, 128, 8), (4096, 256, 8), (400_000, 512, 22)]
STAGES = ("gating", "dispatch", "sort_align", "experts", "finalize", "combine")


def measure(T: int, E: int, K: int, repeat: int) -> dict:
    from harness.api import execute
    from harness.backends.cpu import CpuTarget
    from harness.case import MoECase
    from harness.chain.runner import run_case

    block = 128 if T >= 100_000 else 16
    case = MoECase(T, E, K, hidden_size=8, block_size=block, renormalize=True, seed=1)
    target = CpuTarget()
    run_case(case, target)  # warm-up
    n = repeat if T <= 4096 else 1
    stage_s = dict.fromkeys(STAGES, 0.0)
    start = time.perf_counter()
    for _ in range(n):
        res = run_case(case, target)
        for s in STAGES:
            stage_s[s] += res.seconds.get(s, 0.0)
    chain_s = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        checked = execute(case, target)
    checked_s = (time.perf_counter() - start) / n
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"T": T, "E": E, "K": K, "block_size": block,
            "stages_ms": {s: 1e3 * v / n for s, v in stage_s.items()},
            "chain_ms": 1e3 * chain_s, "chain_runs_per_s": 1.0 / chain_s,
            "checked_ms": 1e3 * checked_s, "checked_runs_per_s": 1.0 / checked_s,
            "findings": [f.signature for f in checked.findings], "peak_gib": peak_gib}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--repeat", type=int, default=200, help="runs per small configuration")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: T,E,K in this process
    args = ap.parse_args()
    if args.one:
        T, E, K = map(int, args.one.split(","))
        print(json.dumps(measure(T, E, K, args.repeat)))
        return 0
    rows = []
    for T, E, K in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--one", f"{T},{E},{K}",
                               "--repeat", str(args.repeat)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout))
    head = (f"{'T':>8} {'E':>4} {'K':>3} " + " ".join(f"{s[:8]:>9}" for s in STAGES)
            + f" {'chain ms':>9} {'runs/s':>8} {'+checks':>8} {'peak GiB':>8}")
    print("per-stage ms (CPU model), whole chain, runs/s without and with invariant checks")
    print(head)
    for r in rows:
        print(f"{r['T']:>8} {r['E']:>4} {r['K']:>3} "
              + " ".join(f"{r['stages_ms'][s]:>9.2f}" for s in STAGES)
              + f" {r['chain_ms']:>9.2f} {r['chain_runs_per_s']:>8.0f}"
              f" {r['checked_runs_per_s']:>8.0f} {r['peak_gib']:>8.2f}"
              + ("  findings: " + ",".join(r["findings"]) if r["findings"] else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
