"""What the CLI's modules share (`harness.cli`, `harness.cli_ci`): the output channel, the
wrapper that turns a `HarnessError` into one line and exit 2, and the common options."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from harness.errors import HarnessError
from harness.output import Printer

#: tables on a terminal, plain tab-separated lines in a log, JSON with --json
out = Printer()


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
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout "
                                       "instead of tables and lines")]
BugOpt = Annotated[list[str] | None, typer.Option("--bug", help="switch a bug variant on "
                                                  "(repeatable; `moe-harness bugs` lists them)")]
