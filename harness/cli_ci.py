"""`moe-harness gate` and `moe-harness report`: the CLI for CI, thin over `harness.gate` and
`harness.report` (registered at the top level by `harness.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harness.cli_common import BugOpt, JsonOpt, clean_errors, out

app = typer.Typer()


@app.command()
@clean_errors
def gate(target: Annotated[str, typer.Option(
             "--target", help="cpu | cuda | module:attr (your own Target)")] = "cpu",
         seconds: Annotated[float, typer.Option(
             "--time", help="seconds for the whole gate, corpus replay included")] = 600.0,
         since: Annotated[str | None, typer.Option(
             "--since", metavar="GIT_REF", help="fuzz only the stages whose files changed "
             "since the merge base with this ref (default: every stage)")] = None,
         corpus_dirs: Annotated[list[Path] | None, typer.Option(
             "--corpus", metavar="DIR", help="corpus directory to replay and seed from "
             "(repeatable; default: ./corpus when it exists)")] = None,
         findings: Annotated[Path, typer.Option(
             "--findings", help="findings directory (new findings and their corpus files "
             "ready to commit under corpus-ready/)")] = Path("findings"),
         junit: Annotated[Path | None, typer.Option("--junit", metavar="FILE",
                                                    help="write JUnit XML")] = None,
         sarif: Annotated[Path | None, typer.Option("--sarif", metavar="FILE",
                                                    help="write SARIF 2.1.0")] = None,
         summary: Annotated[Path | None, typer.Option(
             "--summary", metavar="FILE", help="write a Markdown summary (appended when it "
             "is $GITHUB_STEP_SUMMARY)")] = None,
         bug: BugOpt = None,
         seed: Annotated[int | None, typer.Option("--seed", help="the fuzzer's seed")] = None,
         as_json: JsonOpt = False) -> None:
    """Gate a change: replay the corpus against its expectations, then fuzz the changed
    stages for the rest of the budget; exit 0 clean, 1 a finding or a failed expectation."""
    from harness.gate import GateConfig, run_gate
    from harness.paths import output_file
    from harness.report import junit as junit_report
    from harness.report import sarif as sarif_report
    from harness.report import summary as summary_report

    for option, path in (("--junit", junit), ("--sarif", sarif), ("--summary", summary)):
        if path is not None:
            output_file(path, option)
    if corpus_dirs is None:
        corpus_dirs = [Path("corpus")] if Path("corpus").is_dir() else []
    config = GateConfig(target=target, seconds=seconds, since=since,
                        corpus_dirs=tuple(corpus_dirs), findings_dir=findings,
                        bugs=tuple(bug or ()), seed=seed)
    say = (lambda line: None) if as_json else out.text
    result = run_gate(config, say)
    if junit is not None:
        junit_report.write(result, junit)
    if sarif is not None:
        sarif_report.write(result, sarif)
    if summary is not None:
        summary_report.write(result, summary)
    if as_json:
        out.json(result.to_json())
        raise typer.Exit(result.exit_code)
    for case in result.corpus_failed:
        out.text(case.report or f"{case.path}: {case.error}")
    for note in result.notes:
        out.text(f"note: {note}")
    if result.findings:
        out.table(f"gate findings ({result.config.target})",
                  ("signature", "severity", "kind", "reproducer", "reproduce"),
                  [(f.signature + (" (known)" if f.known else ""), f.severity, f.kind,
                    str(f.reproducer), f.command) for f in result.findings])
        for f in result.findings:
            if f.ready is not None:
                out.text(f"ready to commit with the fix: {f.ready}")
    fuzzed = sum(s.executions for s in result.segments)
    where = ", ".join(s.name for s in result.segments if s.executions) or "nothing"
    out.text(f"gate {'passed' if result.exit_code == 0 else 'FAILED'}: "
             f"{len(result.corpus)} corpus case(s), {len(result.corpus_failed)} failed; "
             f"{fuzzed:,} fuzz executions over {where}; {len(result.findings)} finding(s); "
             f"{result.seconds:.1f} s")
    raise typer.Exit(result.exit_code)


@app.command()
@clean_errors
def report(run_dir: Annotated[Path, typer.Argument(
               metavar="RUN_DIR", help="a fuzz run directory, or a findings directory (its "
               "latest run)")],
           output: Annotated[Path, typer.Option("-o", "--output", help="the HTML file")
                             ] = Path("report.html"),
           max_inputs: Annotated[int, typer.Option(
               "--max-inputs", help="corpus inputs replayed for the per-stage coverage")
           ] = 300) -> None:
    """One self-contained HTML page for a fuzz campaign: coverage, features and executions/s
    over time, the findings on a timeline with links to their reproducers, per-stage
    coverage, the configuration."""
    from harness.paths import output_file
    from harness.report.html import write_report

    output_file(output, "-o")
    path, camp = write_report(run_dir, output, max_inputs)
    out.text(f"wrote {path}: {len(camp.samples)} sample(s), {len(camp.findings)} finding(s), "
             f"run {camp.path}")
