"""What the CLI prints where stdout is not a terminal (harness/output.py): every identifier
whole on one line, tab-separated; JSON on request."""

from __future__ import annotations

import io
import json

from rich.console import Console

from harness.output import Printer


def _printer(terminal: bool) -> tuple[Printer, io.StringIO]:
    buf = io.StringIO()
    return Printer(Console(file=buf, force_terminal=terminal, width=40, soft_wrap=True)), buf


def test_plain_table_is_one_line_per_row_never_cut():
    p, buf = _printer(terminal=False)
    long_path = "findings/sort_align__permutation-bijection/minimized/0123456789abcdef.json"
    p.table("findings", ("signature", "path"), [("sort_align:permutation-bijection", long_path),
                                                ("gating:unique-ids", "a\tb\nc")])
    lines = buf.getvalue().splitlines()
    assert lines == ["findings", "signature\tpath",
                     f"sort_align:permutation-bijection\t{long_path}",
                     "gating:unique-ids\ta b c"]


def test_terminal_table_is_rich_and_folds():
    p, buf = _printer(terminal=True)
    p.table("t", ("name",), [("x" * 60,)])
    text = buf.getvalue()
    assert "┃" in text or "│" in text  # a box-drawn table
    assert "x" * 60 not in text  # folded at 40 columns: what a terminal user reads


def test_long_lines_are_not_wrapped_in_a_log():
    p, buf = _printer(terminal=False)
    line = "finding " + "y" * 200
    p.text(line)
    p.print(line)
    assert buf.getvalue().splitlines() == [line, line]


def test_json_is_one_document_with_non_finite_floats_as_strings():
    p, buf = _printer(terminal=False)
    p.json({"b": float("nan"), "a": [1, float("inf")]})
    assert json.loads(buf.getvalue()) == {"a": [1, "inf"], "b": "nan"}
