"""compute-sanitizer on the bundled kernels: each tool's slowdown, and which detector catches
which bug variant. Needs a GPU and compute-sanitizer; about 90 s on an H100 by default.

    python tools/bench_sanitizer.py [CASE_OR_DIR...] [--all-tools | --tools memcheck,...]
                                    [--no-slowdown] [--no-detectors] [--json OUT.json]

Tools: memcheck and initcheck by default; `--all-tools` adds racecheck and synccheck.

Slowdown: the same cases (default: the seeds of corpus/seeds whose buffers fit
`harness.sanitizer.run.SMALL_CASE_BYTES`; the chunked-launch seed alone takes minutes under
initcheck without poison) replayed bare and under each tool, each in one process, redzones and
poison off, PYTORCH_NO_CUDA_MEMORY_CACHING=1 in both. Two factors: wall clock (start-up
included: torch import, CUDA init, the sanitizer's attach) and time inside the cases only.
Each row is printed when its tool is done.

Detectors: for each variant (and the vLLM issue 39244 pair), its trigger cases
(corpus/bugs/<variant>/, else the demo cases); the fixed chain's row replays the slowdown's
cases. All rows share one process per detector, every case with its own variants (a lost CUDA
context costs a restart): with redzones and poison on, the invariant findings, the
redzone/poison findings and the device faults (the GPU's own illegal-address); with them off,
what each tool reports on the variant that the fixed chain does not report on the same cases
(kind@stage; device-side reports only: API errors and the harness's own copies of never-written
memory to the host left out). initcheck skips cases above SMALL_CASE_BYTES. Each detector's
column is printed when it is done, the matrix at the end, then the variants that no sanitizer
reports, with the invariant that catches them (a2a-unsanitized-padding on our chain: the fixed
sort skips the out-of-range garbage ids, and in-range ones route padding rows that lie inside
the receive buffer, so no access goes out of bounds).
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
from harness.sanitizer.report import SanitizerReport  # noqa: E402
from harness.sanitizer.run import (  # noqa: E402
    TOOLS,
    SanitizerRun,
    replay_cases,
    small_cases,
)
from harness.sanitizer.triage import BASE_TOOLS  # noqa: E402

PLAIN = ("invariant", "redzone/poison", "device fault")
#: tools that get only the cases up to SMALL_CASE_BYTES (see harness.sanitizer)
SMALL_ONLY = ("initcheck",)


def say(*parts: object) -> None:
    """One progress line on stdout, flushed: a run cut short keeps what it printed."""
    print(*parts, flush=True)


def demo_case_files(tmp: Path) -> list[Path]:
    from harness.demo import demo_cases

    return [corpus.save(c, tmp / "demo") for name, c in demo_cases().items()
            if name != "huge-token-count"]  # 50,000 tokens: minutes under memcheck


def default_cases(tmp: Path) -> list[Path]:
    seeds = REPO / "corpus" / "seeds"
    return list(corpus.iter_corpus(seeds)) or demo_case_files(tmp)


def trigger_cases(bugs: tuple[str, ...], tmp: Path) -> list[Path]:
    dirs = [d for d in sorted((REPO / "corpus" / "bugs").glob("*"))
            if d.is_dir() and set(d.name.split("+")) == set(bugs)]
    found = [Path(p) for d in dirs for p in corpus.iter_corpus(d)]
    return found or demo_case_files(tmp)


# -- slowdown ----------------------------------------------------------------------------------


def slowdown(cases: list[Path], tools: list[str],
             backend: str = "cuda") -> tuple[list[dict], dict[str, SanitizerRun]]:
    """Rows of the slowdown table (printed as they come) and each tool's run."""
    base = replay_cases(cases, None, backend, redzones=False)
    rows = [{"tool": "none", "processes": base.processes, "wall_s": base.seconds,
             "case_s": base.case_seconds, "reports": 0}]
    runs: dict[str, SanitizerRun] = {}
    say(f"{'tool':<10} {'procs':>5} {'wall s':>8} {'cases s':>8} {'x wall':>7} "
        f"{'x cases':>8} {'errors':>6}")
    print_slowdown_row(rows[0], base)
    for tool in tools:
        run = runs[tool] = replay_cases(cases, tool, backend, redzones=False)
        rows.append({"tool": tool, "processes": run.processes, "wall_s": run.seconds,
                     "case_s": run.case_seconds,
                     "reports": sum(r.level == "error" for r in run.reports)})
        print_slowdown_row(rows[-1], base)
    return rows, runs


def print_slowdown_row(r: dict, base: SanitizerRun) -> None:
    r["slowdown_wall"] = r["wall_s"] / base.seconds if base.seconds else None
    r["slowdown_cases"] = r["case_s"] / base.case_seconds if base.case_seconds else None
    xw = f"{r['slowdown_wall']:.1f}" if r["slowdown_wall"] else "-"
    xc = f"{r['slowdown_cases']:.1f}" if r["slowdown_cases"] else "-"
    say(f"{r['tool']:<10} {r['processes']:>5} {r['wall_s']:>8.1f} {r['case_s']:>8.2f} "
        f"{xw:>7} {xc:>8} {r['reports']:>6}")


# -- detectors ---------------------------------------------------------------------------------


def _device_errors(reports: list[SanitizerReport]) -> set[str]:
    """kind@stage of the device-side error reports (no API errors, no host copies)."""
    return {f"{r.kind}@{r.stage or '?'}" for r in reports
            if r.level == "error" and r.kernel is not None
            and not r.kind.startswith("api-error")}


def _plain_column(finding: dict) -> str:
    kind = finding.get("details", {}).get("kind")
    if finding["check"] == "illegal-access" and kind in ("illegal-address", "device-fault"):
        return "device fault"  # the GPU faulted: no harness check was first
    if finding["check"] == "illegal-access" or "poison" in finding["check"]:
        return "redzone/poison"  # guard bands (cuda) or checked buffers (cpu model)
    return "invariant"  # invariants and launch geometry checks


def detectors(tmp: Path, fixed_cases: list[Path], tools: list[str], backend: str = "cuda",
              fixed_runs: dict[str, SanitizerRun] | None = None) -> dict[str, dict[str, list]]:
    """table[row][detector] = what it reported; each column printed when it is done.
    `fixed_runs`: the fixed chain on `fixed_cases` under a tool, redzones off, if already run."""
    from harness.demo import demo_configs

    rows = {name: tuple(sorted(b.names)) for name, b in demo_configs().items()}
    files = {name: (trigger_cases(bugs, tmp) if bugs else fixed_cases)
             for name, bugs in rows.items()}
    table: dict[str, dict[str, list]] = {name: {d: [] for d in (*PLAIN, *tools)}
                                         for name in rows}
    width = max(map(len, rows))

    items = [(name, p) for name in rows for p in files[name]]
    plain = replay_cases([(p, rows[name]) for name, p in items], None, backend,
                         redzones=True)
    for (name, _), case in zip(items, plain.cases, strict=True):
        for f in case.findings:
            cell = table[name][_plain_column(f)]
            if f["signature"] not in cell:
                cell.append(f["signature"])
        if case.status in ("crashed", "timeout", "error"):
            table[name]["invariant"].append(f"({case.status}: {Path(case.path).name})")
    say(f"\nredzones and poison on ({plain.processes} process(es), {plain.seconds:.1f} s):")
    for name in rows:
        found = "; ".join(f"{d}: {', '.join(table[name][d])}" for d in PLAIN if table[name][d])
        say(f"  {name:<{width}}  {found or '-'}")

    small = set(small_cases([*fixed_cases, *(p for n in rows if rows[n] for p in files[n])])[0])
    for tool in tools:
        def keep(p: Path, tool: str = tool) -> bool:
            return tool not in SMALL_ONLY or p in small

        reuse = fixed_runs is not None and tool in fixed_runs
        pairs: list[tuple[str, Path, tuple[str, ...]]] = []
        for name, bugs in rows.items():
            if bugs or not reuse:
                for p in filter(keep, files[name]):
                    pairs += [(name, p, ())] + ([(name, p, bugs)] if bugs else [])
        run = replay_cases([(p, b) for _, p, b in pairs], tool, backend, redzones=False)
        fixed_of: dict[Path, set[str]] = {}
        got: dict[str, set[str]] = {name: set() for name in rows}
        for (name, p, bugs), case in zip(pairs, run.cases, strict=True):
            errs = _device_errors(case.reports)
            if bugs:
                got[name] |= errs - fixed_of.get(p, set())
            else:
                fixed_of[p] = errs
                if not rows[name]:
                    got[name] |= errs
        if reuse:
            for name in (n for n in rows if not rows[n]):
                got[name] = _device_errors(fixed_runs[tool].reports)
        for name in rows:
            table[name][tool] = sorted(got[name])
            skipped = [p for p in files[name] if not keep(p)]
            if skipped:
                table[name][tool].append(f"(left out: {len(skipped)} large case(s))")
        unmapped = sorted(_device_errors(run.unmapped))
        say(f"\n{tool}, redzones and poison off ({run.processes} process(es), "
            f"{run.seconds:.1f} s):" + (f" unmapped: {', '.join(unmapped)}" if unmapped else ""))
        for name in rows:
            say(f"  {name:<{width}}  {', '.join(table[name][tool]) or '-'}")
    return table


def print_detectors(table: dict[str, dict[str, list]], tools: list[str]) -> None:
    """A yes/no matrix (variant x detector), then the variants no sanitizer reports."""
    cols = (*PLAIN, *tools)
    width = max(map(len, table)) + 2
    say(f"\n{'variant':<{width}}" + "".join(f"{d:>16}" for d in cols))

    def caught(cell: list[str]) -> bool:
        return any(not c.startswith("(") for c in cell)

    for name, row in table.items():
        say(f"{name:<{width}}" + "".join(f"{'yes' if caught(row[d]) else '-':>16}"
                                         for d in cols))
    for name, row in table.items():
        if name != "fixed" and not any(caught(row[t]) for t in tools):
            by = "; ".join(f"{d} ({', '.join(row[d])})" for d in PLAIN if caught(row[d]))
            say(f"{name}: no {'/'.join(tools)} error without redzones and poison; "
                f"caught by {by or 'nothing'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help="case files or directories (slowdown)")
    ap.add_argument("--tools", default=",".join(BASE_TOOLS),
                    help=f"comma-separated, of {', '.join(TOOLS)}")
    ap.add_argument("--all-tools", action="store_true", help="all four tools")
    ap.add_argument("--no-slowdown", action="store_true")
    ap.add_argument("--no-detectors", action="store_true")
    ap.add_argument("--json", help="write the numbers here too")
    ap.add_argument("--backend", default="cuda", help="cuda (cpu: a dry run of this script)")
    args = ap.parse_args(argv)
    tools = list(TOOLS) if args.all_tools else [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tool(s) {', '.join(unknown)} (known: {', '.join(TOOLS)})")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-sanitizer-") as tmp:
        tmpdir = Path(tmp)
        given = [Path(c) for c in args.cases] or default_cases(tmpdir)
        cases, large = small_cases(given)
        if args.cases:
            cases, large = cases + large, []  # the user's cases, as given
        if large:
            say(f"left out (buffers over the size bound): {', '.join(p.name for p in large)}")
        fixed_runs = None
        if not args.no_slowdown:
            say(f"slowdown over {len(cases)} case(s):")
            out["slowdown"], fixed_runs = slowdown(cases, tools, args.backend)
        if not args.no_detectors:
            out["detectors"] = detectors(tmpdir, cases, tools, args.backend, fixed_runs)
            print_detectors(out["detectors"], tools)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
