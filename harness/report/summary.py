"""The gate as Markdown: what `$GITHUB_STEP_SUMMARY` shows and a pull-request comment quotes.

The verdict first, then what was replayed and fuzzed (the changed files' stages, each segment's
budget, seeds, executions and coverage), then each finding with its reproducer, the command
that reproduces it and the corpus file ready to commit, and each failed corpus case's report
(collapsed).
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.gate import GateResult
from harness.paths import write_text_atomic


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(result: GateResult) -> str:
    c = result.config
    failed = result.corpus_failed
    verdict = ("passed: no finding, every corpus expectation met" if result.exit_code == 0
               else f"failed: {len(result.findings)} finding(s)"
               + (f", {len(failed)} corpus case(s) failing" if failed else ""))
    lines = [f"## moe-harness gate {'✅' if result.exit_code == 0 else '❌'} {verdict}", "",
             f"target `{c.target}`" + (f" with `{'`, `'.join(c.bugs)}`" if c.bugs else "")
             + f", budget {c.seconds:.0f} s, took {result.seconds:.0f} s", ""]
    if result.changed is not None:
        stages = ", ".join(result.focus) or "none"
        lines += [f"**Changed since `{c.since}`:** {len(result.changed)} file(s); stages "
                  f"fuzzed: {stages}", ""]
    lines += [f"**Corpus:** {len(result.corpus)} case(s) replayed"
              f" from {', '.join(f'`{d}`' for d in c.corpus_dirs) or 'no directory'},"
              f" {len(failed)} failed", ""]
    if result.segments:
        lines += ["| fuzzed | budget s | seeds | executions | coverage | features | stopped |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {_cell(s.name)} | {s.budget:.0f} | {s.seeds} | {s.executions:,} | "
                  f"{s.coverage} | {s.features} | {_cell(s.reason)} |" for s in result.segments]
        lines.append("")
    for note in result.notes:
        lines.append(f"- {note}")
    if result.notes:
        lines.append("")
    if result.findings:
        lines += ["### Findings", "", "| signature | severity | stage | reproducer | "
                  "reproduce |", "|---|---|---|---|---|"]
        for f in result.findings:
            sig = f"`{f.signature}`" + (" (known)" if f.known else "")
            lines.append(f"| {sig} | {f.severity} | {f.stage} | `{_cell(f.reproducer)}` | "
                         f"`{_cell(f.command)}` |")
        lines.append("")
        ready = [f.ready for f in result.findings if f.ready is not None]
        if ready:
            lines += ["New regression cases, ready to commit with the fix (the fixed chain is "
                      "expected clean on them):", "", "```"]
            lines += [f"cp {p} corpus/regressions/" for p in ready]
            lines += ["```", ""]
    for case in failed:
        lines += [f"<details><summary>corpus case <code>{case.path}</code> failed</summary>",
                  "", "```", case.report or case.error or "", "```", "", "</details>", ""]
    return "\n".join(lines)


def write(result: GateResult, path: str | os.PathLike) -> Path:
    """Write the summary; `$GITHUB_STEP_SUMMARY` is appended to, as GitHub expects (other
    steps write there too), any other file replaced atomically."""
    text = to_markdown(result) + "\n"
    if os.environ.get("GITHUB_STEP_SUMMARY") and \
            Path(path).resolve() == Path(os.environ["GITHUB_STEP_SUMMARY"]).resolve():
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return Path(path)
    return write_text_atomic(path, text)
