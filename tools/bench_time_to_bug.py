"""Time to bug: how long `moe-harness fuzz` takes to find each variant from an empty corpus.

    python tools/bench_time_to_bug.py [--backend cpu] [--trials 5] [--time-limit 120]
        [--variants a,b] [--no-ablation] [--fixed-time S] [--json OUT]

For each variant and mode, `--trials` runs (distinct seeds, empty corpus and findings
directories) with that variant alone: seconds and executions to the first finding whose
signature is one the variant is expected to produce (`harness.bugs.VARIANTS[name].signatures`:
the benchmark reads them, the fuzzer never does); median, min and max, a trial that finds
nothing in `--time-limit` seconds counting as infinitely slow. Modes: the full fuzzer; with the
MoE-aware mutators off; on cuda also with the device coverage off. Then the fixed chain, the
same number of trials of `--fixed-time` seconds (default: the time limit): its findings must be
zero. Seconds count from the start of the fuzzing process (imports and set-up included).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "full": {},
    "no-moe-mutators": {"moe_mutators": False},
    "no-device-coverage": {"device_coverage": False},
}


def run_trial(backend: str, bugs: tuple[str, ...], seed: int, seconds: float,
              expected: tuple[str, ...], options: dict) -> dict:
    """One fuzz run in fresh directories; stops at the first expected finding."""
    from harness.fuzz.engine import FuzzConfig, fuzz

    def matches(sig: str) -> bool:
        return any(sig.startswith(prefix) for prefix in expected)

    with tempfile.TemporaryDirectory(prefix="moe-ttb-") as tmp:
        config = FuzzConfig(backend=backend, bugs=bugs, seconds=seconds, seed=seed,
                            findings_dir=Path(tmp), minimize=False, **options)
        start = time.monotonic()
        report = fuzz(config, lambda s: bool(expected) and any(matches(f.signature)
                                                               for f in s.findings))
        wall = time.monotonic() - start
    hits = [f for f in report.findings if matches(f.signature)] if expected else []
    first = min(hits, key=lambda f: f.executions or 0) if hits else None
    s = report.status
    return {"seed": seed, "found": first is not None,
            "signature": first.signature if first else None,
            "seconds": first.seconds if first else None,
            "executions": first.executions if first else None,
            "all_signatures": sorted(f.signature for f in report.findings),
            "total_executions": s.executions, "run_seconds": s.seconds,
            "exec_per_s": s.exec_per_s, "coverage": s.coverage, "features": s.features,
            "wall_seconds": wall}


def summarize(trials: list[dict]) -> dict:
    secs = [t["seconds"] if t["found"] else math.inf for t in trials]
    execs = [t["executions"] if t["found"] else math.inf for t in trials]

    def stat(values: list[float], fn) -> float | None:
        v = fn(values)
        return None if math.isinf(v) else v

    return {"found": sum(t["found"] for t in trials), "trials": len(trials),
            "median_s": stat(secs, statistics.median), "min_s": stat(secs, min),
            "max_s": stat(secs, max), "median_execs": stat(execs, statistics.median),
            "min_execs": stat(execs, min), "max_execs": stat(execs, max),
            "median_exec_per_s": statistics.median(t["exec_per_s"] for t in trials)}


def _cell(v: float | None, limit: str, fmt: str = "{:.1f}") -> str:
    return f">{limit}" if v is None else fmt.format(v)


def main() -> int:
    from harness.bugs import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per trial")
    ap.add_argument("--variants", help="comma-separated (default: all)")
    ap.add_argument("--no-ablation", action="store_true", help="the full fuzzer only")
    ap.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)} (default: all "
                    "that apply to the backend)")
    ap.add_argument("--no-fixed", action="store_true", help="skip the fixed-chain runs")
    ap.add_argument("--fixed-time", type=float, help="seconds per fixed-chain trial")
    ap.add_argument("--seed-base", type=int, default=1000)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    modes = ["full"] if args.no_ablation else ["full", "no-moe-mutators"]
    if args.backend == "cuda" and not args.no_ablation:
        modes.append("no-device-coverage")
    if args.modes:
        modes = args.modes.split(",")
        for m in modes:
            if m not in MODES:
                ap.error(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    seeds = [args.seed_base + i for i in range(args.trials)]
    limit = args.time_limit
    results: dict = {"backend": args.backend, "trials": args.trials, "time_limit_s": limit,
                     "machine": {"python": platform.python_version(),
                                 "processor": platform.processor() or platform.machine()},
                     "variants": {}, "fixed": None}
    for v in variants:
        expected = VARIANTS[v].signatures
        results["variants"][v] = {}
        for mode in modes:
            trials = []
            for seed in seeds:
                t = run_trial(args.backend, (v,), seed, limit, expected, MODES[mode])
                trials.append(t)
                print(f"  {v} [{mode}] seed {seed}: "
                      + (f"{t['signature']} after {t['seconds']:.1f} s, {t['executions']} execs"
                         if t["found"] else f"not found in {limit:g} s "
                         f"({t['total_executions']} execs; found {t['all_signatures']})"),
                      flush=True)
            results["variants"][v][mode] = {**summarize(trials), "runs": trials}
    if not args.no_fixed:
        fixed_time = args.fixed_time or limit
        trials = [run_trial(args.backend, (), seed, fixed_time, (), {}) for seed in seeds]
        signatures = sorted({s for t in trials for s in t["all_signatures"]})
        results["fixed"] = {"seconds_per_trial": fixed_time, "trials": len(trials),
                            "findings": sum(len(t["all_signatures"]) for t in trials),
                            "signatures": signatures,
                            "executions": sum(t["total_executions"] for t in trials),
                            "runs": trials}

    lim = f"{limit:g}"
    print(f"\ntime to bug on {args.backend}, {args.trials} trials, {lim} s limit "
          "(seconds and executions to the first expected finding; median [min, max])")
    print(f"{'variant':<24} {'mode':<19} {'found':>5} {'median s':>9} {'min s':>7} "
          f"{'max s':>7} {'med execs':>9} {'min':>7} {'max':>7} {'exec/s*':>7}")
    for v, per_mode in results["variants"].items():
        for mode, r in per_mode.items():
            print(f"{v:<24} {mode:<19} {r['found']:>2}/{r['trials']:<2} "
                  f"{_cell(r['median_s'], lim):>9} {_cell(r['min_s'], lim):>7} "
                  f"{_cell(r['max_s'], lim):>7} {_cell(r['median_execs'], '', '{:.0f}'):>9} "
                  f"{_cell(r['min_execs'], '', '{:.0f}'):>7} "
                  f"{_cell(r['max_execs'], '', '{:.0f}'):>7} {r['median_exec_per_s']:>7.1f}")
    print("* executions per second of the whole trial, start-up included (median)")
    if results["fixed"] is not None:
        f = results["fixed"]
        rate = statistics.median(t["exec_per_s"] for t in f["runs"])
        print(f"fixed chain: {f['findings']} finding(s) in {f['trials']} x "
              f"{f['seconds_per_trial']:g} s ({f['executions']} executions, {rate:.0f}/s)"
              + (f": {', '.join(f['signatures'])}" if f["signatures"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
