"""compute-sanitizer on the bundled kernels: each tool's slowdown, and which detector catches
which bug variant. Needs a GPU and compute-sanitizer.

    python tools/bench_sanitizer.py [CASE_OR_DIR...] [--tools memcheck,initcheck,...]
                                    [--no-slowdown] [--no-detectors] [--json OUT.json]

Slowdown: the same cases (default: corpus/seeds) replayed bare and under each tool, each in one
process (`harness.sanitizer`), redzones and poison off, PYTORCH_NO_CUDA_MEMORY_CACHING=1 in
both. Two factors: wall clock (start-up included: torch import, CUDA init, the sanitizer's
attach) and time inside the cases only.

Detectors: for each variant (and the vLLM issue 39244 pair), its trigger cases
(corpus/bugs/<variant>/, else the demo cases) on the cuda backend: with redzones and poison on,
which invariant findings, which redzone/poison findings, which device faults (the GPU's own
illegal-address); with them off, what memcheck and initcheck report (kind@stage, API errors
left out). The fixed chain is the first row: every cell should be "-".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import corpus  # noqa: E402
from harness.sanitizer import TOOLS, SanitizerRun, replay_cases  # noqa: E402

DETECTORS = ("invariant", "redzone/poison", "device fault", "memcheck", "initcheck")


def default_cases(tmp: Path) -> list[Path]:
    seeds = REPO / "corpus" / "seeds"
    if any(corpus.iter_corpus(seeds)):
        return [seeds]
    return demo_case_files(tmp)


def demo_case_files(tmp: Path) -> list[Path]:
    from harness.demo import demo_cases

    return [corpus.save(c, tmp / "demo") for name, c in demo_cases().items()
            if name != "huge-token-count"]  # 50,000 tokens: minutes under memcheck


def trigger_cases(bugs: tuple[str, ...], tmp: Path) -> list[Path]:
    dirs = [d for d in sorted((REPO / "corpus" / "bugs").glob("*"))
            if d.is_dir() and set(d.name.split("+")) == set(bugs)]
    found = [p for d in dirs for p in corpus.iter_corpus(d)]
    return found or demo_case_files(tmp)


def slowdown(cases: list, tools: list[str], backend: str = "cuda") -> list[dict]:
    rows = []
    base = replay_cases(cases, None, backend, redzones=False)
    rows.append({"tool": "none", "processes": base.processes, "wall_s": base.seconds,
                 "case_s": base.case_seconds, "reports": 0})
    for tool in tools:
        run = replay_cases(cases, tool, backend, redzones=False)
        rows.append({"tool": tool, "processes": run.processes, "wall_s": run.seconds,
                     "case_s": run.case_seconds,
                     "reports": sum(r.level == "error" for r in run.reports)})
        print(f"  {tool}: {run.seconds:.1f} s", file=sys.stderr)
    for r in rows:
        r["slowdown_wall"] = r["wall_s"] / base.seconds if base.seconds else None
        r["slowdown_cases"] = r["case_s"] / base.case_seconds if base.case_seconds else None
    return rows


def _sanitizer_cell(run: SanitizerRun) -> list[str]:
    return sorted({f"{r.kind}@{r.stage or '?'}" for r in run.reports
                   if r.level == "error" and not r.kind.startswith("api-error")})


def detectors(tmp: Path, tools: list[str],
              backend: str = "cuda") -> dict[str, dict[str, list[str]]]:
    from harness.demo import demo_configs

    table: dict[str, dict[str, list[str]]] = {}
    for name, bugset in demo_configs().items():
        bugs = tuple(sorted(bugset.names))
        cases = trigger_cases(bugs, tmp) if bugs else default_cases(tmp)
        print(f"  {name}: {len(cases)} case path(s)", file=sys.stderr)
        plain = replay_cases(cases, None, backend, bugs, redzones=True)
        findings = [f for c in plain.cases for f in c.findings]
        row: dict[str, list[str]] = {d: [] for d in DETECTORS}
        for f in findings:
            kind = f.get("details", {}).get("kind")
            if f["check"] == "illegal-access" and kind in ("illegal-address", "device-fault"):
                col = "device fault"  # the GPU faulted: no harness check was first
            elif f["check"] == "illegal-access" or "poison" in f["check"]:
                col = "redzone/poison"  # guard bands (cuda) or checked buffers (cpu model)
            else:
                col = "invariant"  # invariants and launch geometry checks
            if f["signature"] not in row[col]:
                row[col].append(f["signature"])
        for tool in ("memcheck", "initcheck"):
            row[tool] = _sanitizer_cell(replay_cases(cases, tool, backend, bugs,
                                                     redzones=False)) if tool in tools else []
        crashed = [c.path for c in plain.cases if c.status in ("crashed", "timeout")]
        if crashed:
            row["invariant"].append(f"(crash/hang: {len(crashed)})")
        table[name] = row
    return table


def print_slowdown(rows: list[dict]) -> None:
    print(f"{'tool':<10} {'procs':>5} {'wall s':>8} {'cases s':>8} {'x wall':>7} "
          f"{'x cases':>8} {'errors':>6}")
    for r in rows:
        xw = f"{r['slowdown_wall']:.1f}" if r["slowdown_wall"] else "-"
        xc = f"{r['slowdown_cases']:.1f}" if r["slowdown_cases"] else "-"
        print(f"{r['tool']:<10} {r['processes']:>5} {r['wall_s']:>8.1f} {r['case_s']:>8.2f} "
              f"{xw:>7} {xc:>8} {r['reports']:>6}")


def print_detectors(table: dict[str, dict[str, list[str]]]) -> None:
    """A yes/no matrix (variant x detector), then what each detector reported."""
    print(f"{'variant':<38}" + "".join(f"{d:>16}" for d in DETECTORS))
    for name, row in table.items():
        print(f"{name:<38}" + "".join(f"{'yes' if row[d] else '-':>16}" for d in DETECTORS))
    print()
    for name, row in table.items():
        for d in DETECTORS:
            if row[d]:
                print(f"{name} / {d}: {', '.join(row[d])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help="case files or directories (slowdown)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--no-slowdown", action="store_true")
    ap.add_argument("--no-detectors", action="store_true")
    ap.add_argument("--json", help="write the numbers here too")
    ap.add_argument("--backend", default="cuda", help="cuda (cpu: a dry run of this script)")
    args = ap.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-sanitizer-") as tmp:
        tmpdir = Path(tmp)
        if not args.no_slowdown:
            cases = args.cases or default_cases(tmpdir)
            print(f"slowdown over {cases}", file=sys.stderr)
            out["slowdown"] = slowdown(cases, tools, args.backend)
            print_slowdown(out["slowdown"])
        if not args.no_detectors:
            out["detectors"] = detectors(tmpdir, tools, args.backend)
            print()
            print_detectors(out["detectors"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
