"""Worker scaling: executions of a campaign with N workers against one, over the same time.

    python tools/bench_workers.py [--workers 2] [--seconds 90] [--trials 1] [--backend cpu]
        [--corpus DIR] [--gpus 0] [--json OUT]

Each trial runs the fixed chain twice for `--seconds` (wall clock from the campaign's start,
start-up included), once with one worker and once with `--workers`, alternating which goes
first, each from a fresh copy of `--corpus` (default: empty) with fresh findings directories
and the same seed, and prints executions, executions per second and the ratio. Both
configurations see the same inputs' costs only on average: the corpora evolve differently.
On cuda, `--gpus 0` puts every worker on GPU 0 (the "2 workers sharing one GPU" case).
The numbers depend on what else the machine runs: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(workers: int, seconds: float, backend: str, corpus: Path | None, seed: int,
        gpus: str | None) -> dict:
    from harness.fuzz.engine import FuzzConfig, fuzz

    work = Path(tempfile.mkdtemp(prefix="moe-bench-workers-"))
    try:
        corpus_dir = work / "corpus"
        if corpus is not None:
            shutil.copytree(corpus, corpus_dir)
        load = os.getloadavg()[0]
        report = fuzz(FuzzConfig(backend=backend, seconds=seconds, seed=seed,
                                 findings_dir=work / "findings", corpus_dir=corpus_dir,
                                 minimize=False, workers=workers, gpus=gpus,
                                 stats_every=max(5.0, seconds / 10)))
        s = report.status
        return {"workers": workers, "executions": s.executions, "seconds": s.seconds,
                "exec_per_s": s.exec_per_s, "fuzzer_restarts": s.fuzzer_restarts,
                "corpus": s.corpus_size, "coverage": s.coverage, "load_before": load,
                "load_after": os.getloadavg()[0]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--corpus", type=Path, help="start every run from a copy of this corpus")
    ap.add_argument("--gpus", help="cuda: the GPUs for the workers (e.g. 0: all on GPU 0)")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
          f"python {platform.python_version()}, backend {args.backend}, {args.seconds:g} s "
          f"per run")
    rows = []
    for trial in range(args.trials):
        order = (1, args.workers) if trial % 2 == 0 else (args.workers, 1)
        pair = {}
        for n in order:
            r = run(n, args.seconds, args.backend, args.corpus, args.seed + trial, args.gpus)
            pair[n] = r
            print(f"trial {trial}: {n} worker(s): {r['executions']:>8,} executions in "
                  f"{r['seconds']:.1f} s ({r['exec_per_s']:.1f}/s), corpus {r['corpus']}, "
                  f"cov {r['coverage']}, restarts {r['fuzzer_restarts']}, load "
                  f"{r['load_before']:.1f} -> {r['load_after']:.1f}", flush=True)
        ratio = pair[args.workers]["executions"] / max(1, pair[1]["executions"])
        rows.append({"trial": trial, "runs": pair, "ratio": ratio})
        print(f"trial {trial}: {args.workers} workers / 1 = {ratio:.2f}x", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"executions, {args.workers} workers over 1: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} trial(s))")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
