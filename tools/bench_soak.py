"""Soak: does a long `moe-harness fuzz` campaign keep its memory bounded?

    python tools/bench_soak.py [--minutes 5] [--backend cpu|cuda] [--interval 10]
        [--bound-mb 200] [--warmup 60] [--json OUT] [-- EXTRA FUZZ OPTIONS]

Runs `moe-harness fuzz` on the fixed chain (fresh corpus and findings directories; anything
after `--` is passed on, e.g. `-- --workers 2 --bug topk-nan-argmax`) for `--minutes`, and
every `--interval` seconds prints the resident memory (RSS, from /proc) of every process of the
campaign: the parent, its libFuzzer children, their case workers (cuda), sanitizer replays.
After `--warmup` seconds (imports, kernel builds, the corpus filling up) the trend of the
campaign's total RSS (Theil-Sen: the median of pairwise slopes, so one large input's transient
allocation does not count as growth) is extrapolated to 30 minutes; the verdict
says whether it stays under `--bound-mb` (the issue's bound: 200 MB per 30 minutes). Memory
is read from outside, so the numbers include what libFuzzer and torch allocate natively.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.fuzz.stats import command_line, process_tree, role, rss_mb  # noqa: E402


def theil_sen_per_s(points: list[tuple[float, float]]) -> float:
    """The median of the pairwise slopes of (t, y): a trend that one large input's transient
    allocation (a single high sample) does not bend, as a least-squares fit would."""
    slopes = [(y2 - y1) / (t2 - t1) for i, (t1, y1) in enumerate(points)
              for t2, y2 in points[i + 1:] if t2 > t1]
    return statistics.median(slopes) if slopes else 0.0


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--backend", default="cpu", help="cpu | cuda")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds excluded from the growth fit")
    ap.add_argument("--bound-mb", type=float, default=200.0,
                    help="allowed growth over 30 minutes")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json", type=Path, help="write the samples and the verdict here")
    args = ap.parse_args(argv)
    seconds = args.minutes * 60
    if seconds <= args.warmup + 2 * args.interval:
        ap.error("--minutes must leave at least two samples after --warmup")

    work = Path(tempfile.mkdtemp(prefix="moe-soak-"))
    cmd = [sys.executable, "-c", "from harness.cli import main; main()", "fuzz",
           "--backend", args.backend, "--time", str(seconds), "--seed", str(args.seed),
           "--findings", str(work / "findings"), *extra]
    print(f"# soak: {' '.join(cmd[3:])}")
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"python {platform.python_version()}; directory {work}")
    log = open(work / "fuzz.out", "wb")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    start = time.monotonic()
    samples: list[dict] = []
    try:
        while proc.poll() is None:
            time.sleep(args.interval)
            t = time.monotonic() - start
            procs = {p: ("parent" if p == proc.pid else role(command_line(p)), rss_mb(p))
                     for p in process_tree(proc.pid)}
            # a process that is exiting (a zombie) has no memory left: not a sample
            procs = {p: v for p, v in procs.items() if v[1]}
            if proc.poll() is not None or not procs:
                break
            total = sum(mb for _, mb in procs.values())
            samples.append({"t": round(t, 1), "total_mb": round(total, 1),
                            "processes": {str(p): {"role": r, "rss_mb": round(mb, 1)}
                                          for p, (r, mb) in procs.items()}})
            each = "  ".join(f"{r}[{p}] {mb:.0f}" for p, (r, mb) in sorted(procs.items()))
            print(f"{t:7.0f} s  total {total:7.0f} MB   {each}", flush=True)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
    finally:
        rc = proc.wait()
        log.close()
    tail = (work / "fuzz.out").read_text(errors="replace").strip().splitlines()[-3:]
    print(f"# fuzz exit code {rc}; its last lines:")
    for line in tail:
        print(f"#   {line}")
    # the campaign's last moments (past its budget: stopping, a final merge) are not a trend
    late = [(s["t"], s["total_mb"]) for s in samples if args.warmup <= s["t"] <= seconds]
    growth = theil_sen_per_s(late) * 1800
    first = late[0][1] if late else float("nan")
    last = late[-1][1] if late else float("nan")
    ok = len(late) >= 2 and growth < args.bound_mb
    print(f"after {args.warmup:.0f} s: {first:.0f} MB -> {last:.0f} MB over "
          f"{(late[-1][0] - late[0][0]) if late else 0:.0f} s; trend "
          f"{growth:+.0f} MB / 30 min (bound {args.bound_mb:.0f}): "
          f"{'OK' if ok else 'OVER THE BOUND'}")
    if args.json:
        args.json.write_text(json.dumps({"command": cmd[3:], "samples": samples,
                                         "growth_mb_per_30min": growth, "ok": ok,
                                         "exit_code": rc}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
