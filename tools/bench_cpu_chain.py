"""Benchmark of the CPU model: per-stage and whole-chain time, runs per second, peak memory.

    python tools/bench_cpu_chain.py [--json OUT.json] [--repeat N] [--only T,E,K]

For each (T, E, K) it times the chain alone (`run_case`) and the whole check the fuzzer runs
(`harness.api.execute`: validation, materialisation, the chain and every invariant). Small
cases run `--repeat` times in 5 batches after a warm-up; the table shows the fastest batch's
mean (the least disturbed by other processes on the machine; the load average is printed).
Large cases run once. Each configuration runs in a fresh subprocess so its peak resident
memory is its own (the ~0.2 GiB of an imported torch included).

Targets (issue 2): the small cases at >= 500 runs per second; T = 400,000 (E = 512, K = 22)
in <= 30 s and <= 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = [(16, 8, 2), (64, 64, 8), (512, 128, 8), (4096, 256, 8), (400_000, 512, 22)]
STAGES = ("gating", "dispatch", "sort_align", "experts", "finalize", "combine")
BATCHES = 5


def _batches(runs: int) -> tuple[int, int]:
    """(batches, runs per batch) for `runs` runs: BATCHES batches, or one run."""
    return (BATCHES, max(1, runs // BATCHES)) if runs > 1 else (1, 1)


def _timed(fn, runs: int) -> tuple[float, object]:
    """(seconds per run of the fastest batch, the last result)."""
    batches, per_batch = _batches(runs)
    best, result = float("inf"), None
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            result = fn()
        best = min(best, (time.perf_counter() - start) / per_batch)
    return best, result


def measure(T: int, E: int, K: int, repeat: int) -> dict:
    """Time one configuration in this process."""
    from harness.api import execute
    from harness.backends.cpu import CpuTarget
    from harness.case import MoECase
    from harness.chain.runner import run_case

    block = 128 if T >= 100_000 else 16
    case = MoECase(T, E, K, hidden_size=8, block_size=block, renormalize=True, seed=1)
    target = CpuTarget()
    runs = repeat if T <= 4096 else 1
    if runs > 1:
        for _ in range(max(5, runs // 20)):  # warm-up: allocator, caches, lazy imports
            execute(case, target)

    stage_s: dict[str, float] = {}

    def chain():
        res = run_case(case, target)
        for s in STAGES:
            stage_s[s] = stage_s.get(s, 0.0) + res.seconds.get(s, 0.0)
        return res

    chain_s, _ = _timed(chain, runs)
    batches, per_batch = _batches(runs)
    calls = batches * per_batch
    execute_s, checked = _timed(lambda: execute(case, target), runs)
    return {"T": T, "E": E, "K": K, "block_size": block, "runs": calls,
            "stages_ms": {s: 1e3 * v / calls for s, v in stage_s.items()},
            "chain_ms": 1e3 * chain_s, "chain_runs_per_s": 1.0 / chain_s,
            "execute_ms": 1e3 * execute_s, "execute_runs_per_s": 1.0 / execute_s,
            "findings": [f.signature for f in checked.findings],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def table(rows: list[dict]) -> list[str]:
    """The results as a fixed-width table (ms per run; runs/s of the chain and of execute)."""
    stage_head = " ".join(f"{s[:8]:>8}" for s in STAGES)
    lines = [f"{'T':>7} {'E':>4} {'K':>2} | {stage_head} | {'chain':>9} {'runs/s':>7} | "
             f"{'execute':>9} {'runs/s':>7} | {'peak RSS':>8}",
             f"{'':>15} | {'per-stage ms (mean over the chain runs)':<{len(stage_head)}} | "
             f"{'ms':>9} {'':>7} | {'ms':>9} {'':>7} | {'GiB':>8}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        stages = " ".join(f"{r['stages_ms'][s]:>8.3f}" for s in STAGES)
        lines.append(f"{r['T']:>7} {r['E']:>4} {r['K']:>2} | {stages} | {r['chain_ms']:>9.3f} "
                     f"{r['chain_runs_per_s']:>7.0f} | {r['execute_ms']:>9.3f} "
                     f"{r['execute_runs_per_s']:>7.0f} | {r['peak_rss_gib']:>8.2f}"
                     + ("  findings: " + ",".join(r["findings"]) if r["findings"] else ""))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--repeat", type=int, default=500, help="runs per small configuration")
    ap.add_argument("--only", help="one configuration T,E,K (default: all five)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: T,E,K in this process
    args = ap.parse_args()
    if args.one:
        T, E, K = map(int, args.one.split(","))
        print(json.dumps(measure(T, E, K, args.repeat)))
        return 0
    configs = [tuple(map(int, args.only.split(",")))] if args.only else CONFIGS
    load = os.getloadavg()[0]
    import torch  # the thread count the runner's chain_mode starts from

    head = (f"CPU model of the routing chain: {os.cpu_count()} CPUs, load average {load:.2f}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads; the runner uses 1)")
    rows = []
    for T, E, K in configs:
        proc = subprocess.run([sys.executable, __file__, "--one", f"{T},{E},{K}",
                               "--repeat", str(args.repeat)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.splitlines()[-1]))
        print(f"  measured T={T} E={E} K={K}", file=sys.stderr, flush=True)
    print("\n".join([head, *table(rows)]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
