"""Explaining a failed corpus replay: what was expected, what came instead, the offending rows
beside the oracle's, and the commands that reproduce it."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from harness.backends import BACKENDS
from harness.corpus.expect import CheckResult

#: details keys that index the offending entries; the keys after one are its columns
INDEX_KEYS = ("rows", "slots", "positions", "adapters")
CELL_WIDTH = 56


def reproduce_command(path: str, target: str, bugs: Sequence[str]) -> str:
    """The shell command that replays one check by hand."""
    if target in BACKENDS:
        words = ["moe-harness", "run", path, "--backend", target]
        for b in bugs:
            words += ["--bug", b]
    else:
        words = ["pytest", path, "--moe-target", target]
        for b in bugs:
            words += ["--moe-bug", b]
    return shlex.join(words)


def describe_case(case) -> str:
    """One line: the case's configuration."""
    parts = [f"T={case.num_tokens}", f"E={case.num_experts}", f"K={case.topk}", case.scoring,
             case.dtype, f"H={case.hidden_size}", f"block={case.block_size}"]
    if case.ep_size > 1:
        parts.append(f"ep={case.ep_size} max_tokens_per_rank={case.recv_slots}")
    if case.max_loras:
        parts.append(f"max_loras={case.max_loras}")
    for name in ("patches", "faults"):
        if getattr(case, name):
            parts.append(f"{len(getattr(case, name))} {name}")
    overridden = list(case.overrides.fields())
    if overridden:
        parts.append(f"overrides {','.join(overridden)}")
    return " ".join(parts) + f" ({case.severity})"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, list):
        text = "[" + ", ".join(_cell(x) for x in v) + "]"
    else:
        text = str(v)
    return text if len(text) <= CELL_WIDTH else text[:CELL_WIDTH - 1] + "…"


def format_details(details: dict[str, Any]) -> list[str]:
    """A finding's details as tables: each index key ("rows", "slots", ...) with the
    same-length lists that follow it as columns, side by side (ids | oracle_ids), then the
    other entries as `key = value`."""
    groups: list[tuple[str, list, list[tuple[str, list]]]] = []
    scalars: list[tuple[str, Any]] = []
    for key, value in details.items():
        if key in INDEX_KEYS and isinstance(value, list):
            groups.append((key, value, []))
        elif (groups and isinstance(value, list) and len(value) == len(groups[-1][1])):
            groups[-1][2].append((key, value))
        else:
            scalars.append((key, value))
    lines: list[str] = []
    for key, index, columns in groups:
        if not index:
            lines.append(f"{key}: none" + "".join(f", {k}: none" for k, _ in columns))
            continue
        table = [[key] + [k for k, _ in columns]]
        table += [[_cell(index[i])] + [_cell(v[i]) for _, v in columns]
                  for i in range(len(index))]
        widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
        for n, row in enumerate(table):
            lines.append(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                         .rstrip())
            if n == 0:
                lines.append("-+-".join("-" * w for w in widths))
    lines += [f"{k} = {_cell(v)}" for k, v in scalars]
    return lines


def _finding_lines(f) -> list[str]:
    head = [f"{f.signature} [{f.severity}]",
            f"  stage {f.stage}, invariant {f.check}: {f.message}"]
    return head + ["    " + line for line in format_details(f.details)]


def explain(path: str, target: str, case, results: Sequence[CheckResult]) -> str:
    """The failure message of a replay: what was expected and what came instead, with every
    finding's offending entries beside the oracle's, and the commands to reproduce."""
    failed = [r for r in results if not r.ok]
    lines = [f"{path}: {len(failed)} of {len(results)} expectation(s) not met on {target}"]
    if case is not None:
        lines.append(f"case: {describe_case(case)}")
    for r in results:
        if r.ok:
            lines.append(f"  ok   {r.check.label}: {r.check.outcome}")
    for r in failed:
        expected = r.check.outcome + ("" if r.check.stored else " (the default)")
        lines += ["", f"FAIL {r.check.label}: expected {expected}, got {r.got()}"]
        for f in r.findings:
            lines += ["  " + line for line in _finding_lines(f)]
        if r.output.strip():
            lines += ["  child output (tail):"] + ["    " + x for x in r.output.splitlines()]
    lines += ["", "reproduce:"]
    lines += [f"  {reproduce_command(path, target, r.check.bugs)}" for r in failed]
    return "\n".join(lines)
