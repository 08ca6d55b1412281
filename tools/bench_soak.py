"""Soak: does a long `moe-harness fuzz` campaign keep its memory bounded?

    python tools/bench_soak.py [--minutes 5] [--backend cpu|cuda] [--interval 10]
        [--bound-mb 200] [--warmup 60] [--json OUT] [-- EXTRA FUZZ OPTIONS]

Runs `moe-harness fuzz` on the fixed chain (fresh corpus and findings directories; anything
after `--` is passed on, e.g. `-- --workers 2 --bug topk-nan-argmax`) for `--minutes`, and
every `--interval` seconds prints the resident memory (RSS, from /proc) of every process of the
campaign: the parent, its libFuzzer children, their case workers (cuda), sanitizer replays.
After `--warmup` seconds (imports, kernel builds, the corpus filling up) the growth of the
campaign's total RSS is fitted by least squares and extrapolated to 30 minutes; the verdict
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's list)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


def role(pid: int, root: int) -> str:
    """What a process of the campaign is, from its command line."""
    if pid == root:
        return "parent"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return "?"
    for needle, name in (("child_main", "libfuzzer"), ("harness.isolation", "worker"),
                         ("compute-sanitizer", "sanitizer"), ("ray", "ray")):
        if needle in cmd:
            return name
    return cmd.split(" ")[0].rsplit("/", 1)[-1] or "?"


def slope_per_s(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if var == 0 else sum((t - mt) * (y - my) for t, y in points) / var


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
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    start = time.monotonic()
    samples: list[dict] = []
    try:
        while proc.poll() is None:
            time.sleep(args.interval)
            t = time.monotonic() - start
            procs = {p: (role(p, proc.pid), rss_mb(p)) for p in tree(proc.pid)}
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
    late = [(s["t"], s["total_mb"]) for s in samples if s["t"] >= args.warmup]
    growth = slope_per_s(late) * 1800
    first = late[0][1] if late else float("nan")
    last = late[-1][1] if late else float("nan")
    ok = len(late) >= 2 and growth < args.bound_mb
    print(f"after {args.warmup:.0f} s: {first:.0f} MB -> {last:.0f} MB over "
          f"{(late[-1][0] - late[0][0]) if late else 0:.0f} s; fitted growth "
          f"{growth:+.0f} MB / 30 min (bound {args.bound_mb:.0f}): "
          f"{'OK' if ok else 'OVER THE BOUND'}")
    if args.json:
        args.json.write_text(json.dumps({"command": cmd[3:], "samples": samples,
                                         "growth_mb_per_30min": growth, "ok": ok,
                                         "exit_code": rc}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
