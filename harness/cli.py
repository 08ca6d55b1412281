"""`moe-harness`: the command line, thin over the library (`harness.api`, `harness.demo`, ...).

Exit codes: 0 clean, 1 a finding, 2 bad usage or bad input (one line naming the problem).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fuzzing and fault injection for MoE routing pipelines.")
out = Console(highlight=False)

def clean_errors(fn: Callable) -> Callable:
    """Turn a `HarnessError` raised by a command into one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HarnessError as exc:
            print(f"moe-harness: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


BackendOpt = Annotated[str, typer.Option("--backend", help="cpu | cuda")]
BugOpt = Annotated[list[str] | None, typer.Option("--bug", help="switch a bug variant on "
                                                  "(repeatable; `moe-harness bugs` lists them)")]


@app.command()
@clean_errors
def run(case_file: Annotated[Path, typer.Argument(metavar="CASE.json")],
        backend: BackendOpt = "cpu", bug: BugOpt = None) -> None:
    """Run one corpus case: a per-stage summary and the findings."""
    from harness import corpus
    from harness.api import execute, stage_summary

    case, _meta = corpus.load(case_file)
    result = execute(case, backend, bug or [])
    table = Table(title=f"{case_file} on {backend} ({result.bugs})")
    for col in ("stage", "result", "ms"):
        table.add_column(col)
    for stage, what, seconds in stage_summary(result):
        table.add_row(stage, what, f"{seconds * 1e3:.2f}")
    out.print(table)
    if result.rejected is not None:
        out.print(f"rejected (contract): {result.rejected}")
    for f in result.findings:
        out.print(f"[red]finding[/red] {f}")
    if not result.findings:
        out.print("[green]clean[/green]")
    raise typer.Exit(1 if result.findings else 0)


@app.command()
@clean_errors
def bugs() -> None:
    """List the bug variants with their origin and stage."""
    from harness.bugs import VARIANTS

    table = Table(title="bug variants (fixed behaviour is the default; --bug NAME)")
    for col in ("name", "stage", "origin", "what it breaks"):
        table.add_column(col, overflow="fold")
    for v in VARIANTS.values():
        table.add_row(v.name, v.stage, v.origin, v.description)
    out.print(table)


@app.command()
@clean_errors
def demo(backend: BackendOpt = "cpu") -> None:
    """Run the built-in cases on the fixed chain and with each variant; exit 0 when every
    variant is caught and the fixed chain is clean."""
    from harness.demo import run_demo

    with out.status("running the demo matrix") as status:
        report = run_demo(backend, lambda cfg, case: status.update(f"{cfg} on {case}"))
    table = Table(title=f"which check catches which variant ({backend}, "
                        f"{report.seconds:.1f} s)")
    table.add_column("configuration")
    for case in report.cases:
        table.add_column(case, overflow="fold")
    for cfg in report.configs:
        cells = []
        for case in report.cases:
            sigs = report.cells[cfg][case]
            cells.append("[red]" + "\n".join(sigs) + "[/red]" if sigs else "[green]clean[/green]")
        table.add_row(cfg, *cells)
    out.print(table)
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


if __name__ == "__main__":
    sys.exit(main())
