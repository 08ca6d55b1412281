"""`moe-harness`: the command line, thin over the library (`harness.api`, `harness.demo`, ...).

Exit codes: 0 clean, 1 a finding, 2 bad usage or bad input (one line naming the problem).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from harness import cli_ci
from harness.cli_common import BackendOpt, BugOpt, JsonOpt, clean_errors, out

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fuzzing and fault injection for MoE routing pipelines.")
app.add_typer(cli_ci.app)  # gate, report: their commands at the top level


@app.command()
@clean_errors
def run(case_file: Annotated[Path, typer.Argument(metavar="CASE.json")],
        backend: BackendOpt = "cpu", bug: BugOpt = None,
        graph: Annotated[bool, typer.Option(
            "--graph", help="replay the chain as a CUDA graph per capture size (1, 2, 4, ... "
                            "512; cuda backend), padding rows as the case's graph_padding")
        ] = False, as_json: JsonOpt = False) -> None:
    """Run one corpus case: a per-stage summary and the findings."""
    from harness import corpus
    from harness.api import execute, stage_summary
    from harness.backends import resolve_target

    case, _meta = corpus.load(case_file)
    target = resolve_target(backend, graph=graph)
    result = execute(case, target, bug or [])
    stages = stage_summary(result)
    graph_line = None
    if graph:
        size = getattr(result, "capture_size", 0)
        graph_line = (f"graph replay: {case.num_tokens} rows padded to capture size {size} "
                      f"({result.padding} padding), "
                      f"{result.seconds.get('graph', 0) * 1e3:.2f} ms"
                      if size else f"ran eagerly: {target.last_eager_reason}")
    if as_json:
        out.json({"case": str(case_file), "target": str(result.target),
                  "bugs": sorted(result.bugs.names), "severity": case.severity,
                  "stages": [{"stage": st, "result": what, "ms": round(sec * 1e3, 3)}
                             for st, what, sec in stages],
                  "graph": graph_line,
                  "rejected": None if result.rejected is None else str(result.rejected),
                  "findings": [f.to_json() for f in result.findings]})
        raise typer.Exit(1 if result.findings else 0)
    out.table(f"{case_file} on {result.target} ({result.bugs})", ("stage", "result", "ms"),
              [(st, what, f"{sec * 1e3:.2f}") for st, what, sec in stages])
    if graph_line:
        out.text(graph_line)
    if result.rejected is not None:
        out.text(f"rejected (contract): {result.rejected}")
    for f in result.findings:
        out.print("[red]finding[/red] ", end="")
        out.text(str(f))
    if not result.findings:
        out.print("[green]clean[/green]")
    raise typer.Exit(1 if result.findings else 0)


@app.command()
@clean_errors
def bugs(as_json: JsonOpt = False) -> None:
    """List the bug variants with their origin and stage."""
    from harness.bugs import VARIANTS

    if as_json:
        out.json([{"name": v.name, "stage": v.stage, "origin": v.origin,
                   "description": v.description} for v in VARIANTS.values()])
        return
    out.table("bug variants (fixed behaviour is the default; --bug NAME)",
              ("name", "stage", "origin", "what it breaks"),
              [(v.name, v.stage, v.origin, v.description) for v in VARIANTS.values()])


@app.command()
@clean_errors
def demo(backend: BackendOpt = "cpu") -> None:
    """Run the built-in cases on the fixed chain and with each variant; exit 0 when every
    variant is caught and the fixed chain is clean."""
    from harness.demo import run_demo

    with out.status("running the demo matrix") as status:
        report = run_demo(backend, lambda cfg, case: status.update(f"{cfg} on {case}"))
    out.print(f"which check catches which variant ({backend}, {report.seconds:.1f} s)")
    for line in report.lines():
        out.print(line, markup=False, overflow="ignore", crop=False)
    missed = [c for c in report.configs if c != "fixed" and not report.caught(c)]
    if report.caught("fixed"):
        out.print("[red]the fixed chain has findings[/red]")
    for c in missed:
        out.print(f"[red]not caught: {c}[/red]")
    if report.ok:
        out.print("[green]every variant caught; the fixed chain is clean[/green]")
    raise typer.Exit(0 if report.ok else 1)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: usage errors exit 2 (typer's standalone mode), every
    `HarnessError` becomes one line on stderr and exit 2."""
    try:
        app(args=argv, prog_name="moe-harness")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return 0



# -- replay and triage (harness.sanitizer) ----------------------------------------------------

SanitizerOpt = Annotated[str | None, typer.Option(
    "--sanitizer", help="replay under compute-sanitizer: memcheck | initcheck | racecheck | "
    "synccheck")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds one case may take before "
                                           "it counts as a hang")]
#: sanitizer reports printed per case (the rest are counted)
REPORTS_SHOWN = 5


@app.command()
@clean_errors
def replay(cases: Annotated[list[Path], typer.Argument(metavar="CASE_OR_DIR...")],
           backend: Annotated[str | None, typer.Option(
               "--backend", help="cpu | cuda (default: cuda with --sanitizer, else cpu)")] = None,
           bug: BugOpt = None, sanitizer: SanitizerOpt = None,
           redzones: Annotated[bool, typer.Option(
               "--redzones/--no-redzones", help="the cuda backend's guard bands and poison "
               "(off: the sanitizer alone checks)")] = True,
           timeout: TimeoutOpt = 300.0) -> None:
    """Replay cases in a separate process (a crash or hang costs one case), optionally under
    compute-sanitizer: findings and sanitizer reports per case; exit 1 if there is any."""
    from harness.sanitizer.run import SanitizerConfig, replay_cases

    backend = backend or ("cuda" if sanitizer else "cpu")
    with out.status(f"replaying on {backend}" + (f" under {sanitizer}" if sanitizer else "")):
        run = replay_cases(cases, sanitizer, backend, bug or [], redzones,
                           SanitizerConfig(case_timeout_s=timeout))
    for c in run.cases:
        sigs = ", ".join(f["signature"] for f in c.findings)
        line = {"findings": f"findings {sigs}", "rejected": f"rejected ({c.message})",
                "clean": "clean"}.get(c.status, f"{c.status}: {c.message}")
        errors = f", {len(c.errors)} sanitizer error(s)" if c.errors else ""
        out.print(f"case {c.index} {c.path}: {line}{errors} ({c.seconds:.2f} s)",
                  markup=False, soft_wrap=True)
        for r in c.reports[:REPORTS_SHOWN]:
            out.print(f"    {r}", markup=False, soft_wrap=True)
        if len(c.reports) > REPORTS_SHOWN:
            out.print(f"    ... and {len(c.reports) - REPORTS_SHOWN} more reports")
    for r in run.unmapped:
        out.print(f"(case unknown) {r}", markup=False, soft_wrap=True)
    for p in run.problems:
        out.print(f"note: {p}", markup=False, soft_wrap=True)
    bad = sum(c.bad for c in run.cases)
    out.print(f"{len(run.cases)} case(s), {bad} with a finding, error, hang or crash; "
              f"{len(run.reports)} sanitizer report(s); {run.processes} process(es), "
              f"{run.seconds:.1f} s", soft_wrap=True)
    raise typer.Exit(1 if run.bad else 0)


@app.command()
@clean_errors
def triage(findings_dir: Annotated[Path, typer.Argument(metavar="FINDINGS_DIR")],
           all_tools: Annotated[bool, typer.Option(
               "--all-tools", help="racecheck and synccheck too")] = False,
           backend: Annotated[str, typer.Option("--backend", help="cuda")] = "cuda",
           timeout: TimeoutOpt = 300.0, as_json: JsonOpt = False) -> None:
    """Replay every finding under memcheck and initcheck, attach the reports to its metadata
    and print one line per root-cause group (count, signature, the findings' own checks)."""
    from harness.sanitizer.run import TOOLS, SanitizerConfig
    from harness.sanitizer.triage import BASE_TOOLS
    from harness.sanitizer.triage import triage as run_triage

    tools = TOOLS if all_tools else BASE_TOOLS
    with out.status(f"replaying findings under {', '.join(tools)}", quiet=as_json):
        groups = run_triage(findings_dir, tools, backend, SanitizerConfig(case_timeout_s=timeout))
    if as_json:
        out.json({"tools": list(tools), "groups": [g.to_json() for g in groups]})
        return
    for g in groups:
        out.print(g.line(), markup=False, soft_wrap=True)
    skipped = [f.path for g in groups for f in g.findings if not f.attached]
    if skipped:
        out.print(f"note: {len(skipped)} file(s) not named by content hash: reports not "
                  "attached", markup=False)


# -- the corpus (harness.corpus) -------------------------------------------------------------

corpus_app = typer.Typer(no_args_is_help=True,
                         help="The case corpus: promote findings into it, check its files.")
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("add")
@clean_errors
def corpus_add(
        finding: Annotated[Path, typer.Argument(metavar="FINDING.json")],
        as_: Annotated[str, typer.Option("--as", help="regression | seed")] = "regression",
        corpus_root: Annotated[Path, typer.Option(
            "--corpus-root", help="the corpus directory (regressions/ and seeds/ under it)")
        ] = Path("corpus"),
        backend: Annotated[str, typer.Option(
            "--backend", help="replay it here first: cpu | cuda | module:attr")] = "cpu",
        verify: Annotated[bool, typer.Option(
            "--verify/--no-verify", help="replay against the new expectations first")] = True,
) -> None:
    """Promote a finding into the corpus, expected clean on the fixed chain from now on (its
    variant expectations kept); exit 1, writing nothing, if it is not clean yet."""
    from harness.corpus.promote import promote
    from harness.errors import PromotionRefused

    try:
        done = promote(finding, as_, corpus_root, backend if verify else None)
    except PromotionRefused as exc:
        out.print(exc.report, markup=False, soft_wrap=True)
        print(f"moe-harness: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    if done.already:
        out.print(f"{finding}: already in the corpus as {done.path}; nothing written",
                  markup=False, soft_wrap=True)
        return
    expects = "; ".join(f"{'+'.join(e.bugs) or 'fixed'} -> {e.outcome}" for e in done.meta.expect)
    out.print(f"{done.path} ({as_}): {expects}", markup=False, soft_wrap=True)


@corpus_app.command("check")
@clean_errors
def corpus_check(directories: Annotated[list[Path], typer.Argument(metavar="DIR...")]) -> None:
    """Validate every case file under DIR: schema and fields, file name = content hash, no two
    files holding the same case. Exit 1 on any problem."""
    from harness.corpus.format import check_corpus, iter_corpus
    from harness.errors import HarnessError

    problems, files = [], 0
    for d in directories:
        if not d.exists():
            raise HarnessError(f"{d}: no such directory")
        files += sum(1 for _ in iter_corpus(d))
        problems += check_corpus(d)
    for p in problems:
        out.print(f"problem: {p}", markup=False, soft_wrap=True)
    out.print(f"{files} case file(s), {len(problems)} problem(s)", markup=False)
    raise typer.Exit(1 if problems else 0)


def _merge_report(res, verb: str) -> None:
    for problem in res.problems:
        out.text(f"note: {problem}")
    out.text(f"{res.inputs} input file(s): {len(res.kept)} kept, {len(res.dropped)} "
             f"{verb}; {res.features} features")


@corpus_app.command("merge")
@clean_errors
def corpus_merge(sources: Annotated[list[Path], typer.Argument(metavar="SRC...")],
                 output: Annotated[Path, typer.Option(
                     "-o", "--output", help="the corpus directory to merge into (what it "
                     "holds is kept)")]) -> None:
    """Add to DIR the fewest cases of SRC... that reach coverage features DIR does not
    (libFuzzer's -merge=1, on the cpu backend, under each case's variant sets)."""
    from harness.fuzz.merge import merge

    with out.status("profiling cases on the cpu backend") as status:
        res = merge(sources, output, lambda p: status.update(f"running {p}"))
    for p in res.kept:
        out.text(f"kept {p}")
    _merge_report(res, "not needed")


@corpus_app.command("prune")
@clean_errors
def corpus_prune(directory: Annotated[Path, typer.Argument(metavar="DIR")],
                 dry_run: Annotated[bool, typer.Option(
                     "--dry-run", help="say what would be removed, remove nothing")] = False
                 ) -> None:
    """Remove from DIR every case outside the smallest set with the same coverage features
    (unreadable files are reported and kept)."""
    from harness.fuzz.merge import prune

    with out.status("profiling cases on the cpu backend") as status:
        res = prune(directory, dry_run, lambda p: status.update(f"running {p}"))
    for p in res.dropped:
        out.text(f"{'would remove' if dry_run else 'removed'} {p}")
    _merge_report(res, "would be removed" if dry_run else "removed")


# -- fuzzing and minimisation (harness.fuzz) ---------------------------------------------------


@app.command()
@clean_errors
def fuzz(backend: BackendOpt = "cpu", bug: BugOpt = None,
         seconds: Annotated[float | None, typer.Option(
             "--time", help="seconds to fuzz, from the start (default 60)")] = None,
         runs: Annotated[int | None, typer.Option(
             "--runs", help="executions to run (shared by the workers), instead of a time "
             "budget")] = None,
         corpus_dir: Annotated[Path | None, typer.Option(
             "--corpus", help="libFuzzer's corpus directory (default FINDINGS/corpus); a new "
             "run resumes from it")] = None,
         findings: Annotated[Path, typer.Option(
             "--findings", help="findings directory: one directory per signature, the first "
             "reproducer and its minimised form; each campaign's own directory under "
             "FINDINGS/.fuzz-run/")] = Path("findings"),
         seed: Annotated[int | None, typer.Option(
             "--seed", help="1..2**31-1; default: a fresh one, printed (with --runs and one "
             "worker, the same seed and corpus repeat a run)")] = None,
         stop_on_first: Annotated[bool, typer.Option(
             "--stop-on-first", help="stop at the first finding")] = False,
         moe_mutators: Annotated[bool, typer.Option(
             "--moe-mutators/--no-moe-mutators", help="the MoE-aware structured mutators "
             "(off: libFuzzer's byte mutations only)")] = True,
         graph: Annotated[bool, typer.Option(
             "--graph", help="replay the chain as CUDA graphs (cuda backend)")] = False,
         device_coverage: Annotated[bool, typer.Option(
             "--device-coverage/--no-device-coverage", help="feed the cuda kernels' coverage "
             "counters to libFuzzer")] = True,
         minimize: Annotated[bool, typer.Option(
             "--minimize/--no-minimize", help="minimise each new finding")] = True,
         sanitizer_every: Annotated[int, typer.Option(
             "--sanitizer-every", metavar="N", help="replay every Nth new corpus entry and "
             "every finding under compute-sanitizer memcheck, in a separate process while the "
             "fuzzer runs; a memcheck error on a corpus entry is a finding (0: off)")] = 0,
         workers: Annotated[int | None, typer.Option(
             "--workers", metavar="N", help="fuzzing processes, each with its own libFuzzer, "
             "sharing the corpus (default 1, or one per GPU of --gpus)")] = None,
         gpus: Annotated[str | None, typer.Option(
             "--gpus", metavar="all|0,2", help="cuda: the GPUs of this host to fuzz on, one "
             "worker each (pinned with CUDA_VISIBLE_DEVICES)")] = None,
         stats_every: Annotated[float, typer.Option(
             "--stats-every", metavar="S", help="a progress line and a sample in the run's "
             "stats.jsonl every S seconds (also when the output is not a terminal)")] = 10.0,
         ray: Annotated[str | None, typer.Option(
             "--ray", metavar="ADDRESS|auto|local", help="run the workers as Ray actors on "
             "the cluster at ADDRESS (auto: the one this host belongs to; local: a new "
             "one-host cluster); needs moe-harness[ray]")] = None,
         sync_dir: Annotated[Path | None, typer.Option(
             "--sync-dir", help="with --ray: a directory every node sees (shared file "
             "system) through which the workers share the corpus (default: through Ray)")
         ] = None,
         rss_limit_mb: Annotated[int, typer.Option(
             "--rss-limit-mb", help="a fuzzing process over this is restarted from the "
             "corpus")] = 8192,
         batch: Annotated[int, typer.Option(
             "--batch", metavar="B", help="cpu: check each input with B - 1 siblings as one "
             "stacked run (1: one case per input)")] = 1,
         as_json: JsonOpt = False) -> None:
    """Coverage-guided fuzzing of the chain (atheris): findings deduplicated by signature,
    each saved with its minimised form; exit 1 if there is a finding. SIGTERM or Ctrl-C stop
    the campaign with its summary."""
    from harness.errors import ConfigError
    from harness.fuzz.engine import FuzzConfig
    from harness.fuzz.engine import fuzz as run_fuzz
    from harness.fuzz.stats import progress_line

    if seconds is not None and runs is not None:
        raise ConfigError("--time/--runs", "give a time budget or a run budget, not both")
    if runs is None and seconds is None:
        seconds = 60.0
    config = FuzzConfig(backend=backend, bugs=tuple(bug or ()), seconds=seconds, runs=runs,
                        corpus_dir=corpus_dir, findings_dir=findings, seed=seed,
                        stop_on_first=stop_on_first, moe_mutators=moe_mutators, graph=graph,
                        device_coverage=device_coverage, minimize=minimize,
                        sanitizer_every=sanitizer_every, workers=workers, gpus=gpus,
                        stats_every=stats_every, ray=ray, sync_dir=sync_dir,
                        rss_limit_mb=rss_limit_mb, batch=batch).resolved()
    say = (lambda line: None) if as_json else out.text
    say(f"fuzzing {backend} ({', '.join(config.bugs) or 'fixed chain'}), seed "
        f"{config.seed}, corpus {config.corpus_dir}, findings {config.findings_dir}")
    shown: set[str] = set()
    seen = {"samples": 0, "events": 0, "started": False}
    with out.status("starting the fuzzer", quiet=as_json) as status:
        def progress(s) -> None:
            if not seen["started"]:
                seen["started"] = True
                say(f"run {s.run_id}: {s.workers} worker(s)"
                    + (f"; resumed: {s.resumed_inputs} corpus inputs, {s.earlier_findings} "
                       "earlier findings" if s.resumed_inputs or s.earlier_findings else ""))
                if s.concurrent_runs:
                    say(f"note: {len(s.concurrent_runs)} other campaign(s) running on "
                        f"{config.findings_dir} ({', '.join(s.concurrent_runs)}): each "
                        "reports its own findings, each signature is stored once")
            for f in s.findings:
                if f.signature not in shown:
                    shown.add(f.signature)
                    say(f"finding {f.signature} after {f.seconds:.1f} s, "
                        f"{f.executions:,} executions: {f.path}")
            for event in s.events[seen["events"]:]:
                say(f"note: {event}")
            seen["events"] = len(s.events)
            line = progress_line(s)
            if config.sanitizer_every:
                line += f"  sanitized {s.sanitized} ({s.sanitizer_pending} waiting)"
            status.update(line)
            if s.samples > seen["samples"] and not s.done:  # every --stats-every seconds,
                seen["samples"] = s.samples  # on a terminal and in a CI or nohup log alike
                say(line)

        report = run_fuzz(config, progress)
    s = report.status
    if as_json:
        out.json({**report.to_json(), "config": config.to_json(),
                  "new_findings": [f.signature for f in report.new_findings],
                  "minimize_errors": report.minimize_errors,
                  "sanitizer_problems": report.sanitizer_problems})
        raise typer.Exit(1 if report.findings else 0)
    for sig in s.known:
        known = next((f for f in report.findings if f.signature == sig), None)
        out.text(f"{sig} is already known" + (f" ({known.path})" if known else "") +
                 ": stopping (--stop-on-first)")
    if report.findings:
        out.table(f"findings ({len(report.new_findings)} new)",
                  ("signature", "severity", "s", "execs", "reproducer", "minimised"),
                  [(f.signature, f.severity, "earlier" if f.earlier else f"{f.seconds:.1f}",
                    "" if f.earlier else f"{f.executions:,}", str(f.path),
                    str(f.minimized or "")) for f in report.findings])
    for problem in [*report.minimize_errors, *report.sanitizer_problems]:
        out.text(f"note: {problem}")
    workers_note = f", {s.workers} workers" if s.workers > 1 else ""
    if s.synced_inputs:
        workers_note += f", {s.synced_inputs} inputs shared through Ray"
    restarts = f"; restarts: {s.restarts} case worker, {s.fuzzer_restarts} fuzzing process" \
        if s.restarts or s.fuzzer_restarts else ""
    out.text(f"{s.executions:,} executions in {s.seconds:.1f} s ({s.exec_per_s:,.0f}/s, "
             f"{s.reason}{workers_note}); coverage {s.coverage} edges, {s.features} features, "
             f"{s.semantic} semantic; corpus {s.corpus_size}; seed {config.seed}{restarts}")
    out.text(f"run directory {report.run_dir} (stats.jsonl, libFuzzer logs)")
    if config.sanitizer_every:
        out.text(f"memcheck: {s.sanitized} case(s) sanitized (1 in {config.sanitizer_every}"
                 f" new corpus entries, every finding), {s.sanitizer_errors} sanitizer error(s)")
    if not report.findings:
        out.print("[green]no findings[/green]")
    raise typer.Exit(1 if report.findings else 0)


@app.command("minimize")
@clean_errors
def minimize_cmd(case_file: Annotated[Path, typer.Argument(metavar="CASE.json")],
                 backend: BackendOpt = "cpu", bug: BugOpt = None,
                 signature: Annotated[str | None, typer.Option(
                     "--signature", help="the finding to keep (default: the file's signature, "
                     "else the case's first finding)")] = None,
                 output: Annotated[Path | None, typer.Option(
                     "-o", "--output", help="directory for the minimised case (default: "
                     "beside CASE)")] = None,
                 max_runs: Annotated[int, typer.Option(
                     "--max-runs", help="executions at most")] = 400,
                 seconds: Annotated[float, typer.Option(
                     "--time", help="seconds at most")] = 60.0) -> None:
    """Shrink a case to the smallest one with the same finding (T, E, K, H, ep_size,
    max_loras; patches, faults and overrides dropped; values simplified)."""
    from harness import corpus
    from harness.corpus.format import CaseMeta, Expectation
    from harness.fuzz.minimize import MinimizeConfig, minimize_case
    from harness.paths import output_dir

    case, meta = corpus.load(case_file)
    if output is not None:
        output_dir(output, "-o")
    bugs = tuple(bug) if bug else meta.found_with()
    signature, res = minimize_case(case, backend, bugs, signature or meta.signature,
                                   MinimizeConfig(max_runs, seconds))
    c0, c1 = res.original, res.case
    out.print(f"{signature} ({backend}, variants {', '.join(bugs) or 'none'}): T {c0.num_tokens}"
              f" -> {c1.num_tokens}, E {c0.num_experts} -> {c1.num_experts}, K {c0.topk} -> "
              f"{c1.topk}, {len(c0.patches)} -> {len(c1.patches)} patches, {len(c0.faults)} -> "
              f"{len(c1.faults)} faults; {res.runs} runs, {res.seconds:.1f} s"
              + (" (budget spent)" if res.exhausted else ""), markup=False, soft_wrap=True)
    if corpus.content_hash(c1) == corpus.content_hash(c0):
        out.print("already minimal: nothing written")
        return
    new_meta = CaseMeta(origin="minimize", signature=signature,
                        expect=(Expectation(backend, bugs, signature),),
                        note=f"minimised from {case_file.name}",
                        extra={"minimized_from": corpus.content_hash(c0), "runs": res.runs,
                               "steps": res.steps[:50]})
    path = corpus.save(c1, output if output is not None else case_file.parent, new_meta)
    out.print(f"wrote {path}", markup=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
