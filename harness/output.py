"""What the CLI prints: rich tables on a terminal, plain lines in a CI log, JSON on request.

A CI log is not a terminal: rich then lays tables out at 80 columns and folds every cell that
does not fit, so a path, a signature or a variant name is cut across rows and `moe-harness
bugs | grep NAME` misses it. Here a table is a rich table only when stdout is a terminal;
elsewhere it is its title and one line per row, cells separated by tabs, never cut
(`cut -f`, `grep`, `awk -F'\\t'` work on it). `--json` commands print one JSON document on
stdout and nothing else there.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

#: seconds between plain progress lines when stdout is not a terminal (a long fuzz run in CI)
PLAIN_PROGRESS_S = 30.0


def _plain_cell(value: object) -> str:
    return " ".join(str(value).split())  # no tab or newline inside a cell


class Printer:
    """The CLI's output channel over one rich `Console` (soft-wrapped: a long line is the
    terminal's to wrap, never cut into two lines of a log)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)

    @property
    def terminal(self) -> bool:
        return self.console.is_terminal

    def print(self, *objects: Any, **kwargs: Any) -> None:
        kwargs.setdefault("soft_wrap", True)
        self.console.print(*objects, **kwargs)

    def text(self, line: str) -> None:
        """One line as it is: no markup, no wrapping; in a log with its tabs kept (rich would
        expand them), on a terminal through rich (a live spinner stays intact)."""
        if self.terminal:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        self.console.file.write(line + "\n")
        self.console.file.flush()

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """A table: rich on a terminal (cells folded, never cropped), else the title, a
        tab-separated header and one tab-separated line per row."""
        if self.terminal:
            table = Table(title=title)
            for col in columns:
                table.add_column(col, overflow="fold")
            for row in rows:
                table.add_row(*(str(c) for c in row))
            self.console.print(table)
            return
        self.text(title)
        self.text("\t".join(columns))
        for row in rows:
            self.text("\t".join(_plain_cell(c) for c in row))

    def json(self, obj: Any) -> None:
        """One JSON document on stdout (sorted keys; NaN and Inf are not JSON: as strings)."""
        self.console.file.write(json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")
        self.console.file.flush()

    @contextlib.contextmanager
    def status(self, message: str, quiet: bool = False) -> Iterator[Any]:
        """A spinner on a terminal; elsewhere (or `quiet`, e.g. with --json) nothing: the
        object yielded takes `update(text)` either way."""
        if self.terminal and not quiet:
            with self.console.status(message) as s:
                yield s
        else:
            yield _Silent()


class _Silent:
    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _jsonable(obj: Any) -> Any:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return obj
