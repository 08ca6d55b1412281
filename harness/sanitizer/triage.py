"""Triage: replay every stored finding under compute-sanitizer, attach what each tool reports
to the finding's metadata, and group the findings by root cause.

A finding file is a corpus case whose metadata names the variant set it was found with (an
expectation whose outcome is its signature, as `harness.fuzz.store` writes it; or
`extra["bugs"]`). Findings are replayed per variant set, one sanitizer process per set and tool
(`harness.sanitizer.run`), with the cuda backend's redzones and poison off so the sanitizer sees
every out-of-bounds access. The reports go into `meta.extra["sanitizer"][tool]`, rewritten
atomically through `harness.corpus`. The root-cause signature of a finding is the set of
distinct `tool:kind:kernel@stage` its error reports have (API errors that only follow a device
fault are left out when there is more).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import corpus
from harness.errors import HarnessError
from harness.sanitizer.report import SanitizerReport
from harness.sanitizer.run import TOOLS, SanitizerConfig, SanitizerRun, replay_under_sanitizer

#: the tools a triage runs by default (the others of `TOOLS` with --all-tools)
BASE_TOOLS = TOOLS[:2]
#: reports kept per tool in a finding's metadata
MAX_STORED_REPORTS = 20


def root_cause(reports: list[SanitizerReport]) -> str | None:
    """`tool:kind:kernel@stage` of the error reports, distinct and sorted, joined by " + "
    (API errors dropped when a device-side report is there); None if there is none."""
    errors = [r for r in reports if r.level == "error"]
    device = [r for r in errors if not r.kind.startswith("api-error")]
    sigs = sorted({r.signature for r in (device or errors)})
    return " + ".join(sigs) if sigs else None


@dataclass
class TriagedFinding:
    path: str
    signature: str | None  # the finding's own "stage:check"
    bugs: tuple[str, ...]
    reports: list[SanitizerReport] = field(default_factory=list)
    status: dict[str, str] = field(default_factory=dict)  # tool -> case status
    attached: bool = False

    @property
    def root_cause(self) -> str:
        rc = root_cause(self.reports)
        if rc is not None:
            return rc
        bad = sorted({s for s in self.status.values() if s in ("timeout", "crashed")})
        if bad:
            return f"sanitizer run {'/'.join(bad)} ({self.signature or 'finding'})"
        return f"no sanitizer error ({self.signature or 'finding'})"


@dataclass
class TriageGroup:
    """Findings that share a root-cause signature."""

    root_cause: str
    findings: list[TriagedFinding]

    def to_json(self) -> dict[str, Any]:
        return {"root_cause": self.root_cause, "count": len(self.findings),
                "findings": [{"path": f.path, "signature": f.signature, "bugs": list(f.bugs),
                              "status": f.status, "attached": f.attached,
                              "reports": [r.to_json() for r in f.reports]}
                             for f in self.findings]}

    def line(self) -> str:
        sigs = sorted({f.signature or "?" for f in self.findings})
        return (f"{len(self.findings):4d}  {self.root_cause}  [{', '.join(sigs)}]  e.g. "
                f"{self.findings[0].path}")


def tool_run(tool: str, status: str, reports: list[SanitizerReport]) -> dict[str, Any]:
    """What one tool's replay of a case puts in `meta.extra["sanitizer"][tool]`: the case's
    status, its error count and its first reports (also used by the fuzzer's --sanitizer-every)."""
    mine = [r for r in reports if r.tool == tool]
    return {"status": status, "errors": sum(1 for r in mine if r.level == "error"),
            "reports": [r.to_json() for r in mine][:MAX_STORED_REPORTS]}


def attach_reports(path: Path, tool_runs: dict[str, dict[str, Any]]) -> bool:
    """Merge `tool_runs` into the file's meta.extra["sanitizer"]; atomic, via corpus.save.
    A file not named by its content hash is left alone (save would write a second file)."""
    case, meta = corpus.load(path)
    if path.stem != corpus.content_hash(case):
        return False
    old = meta.extra.get("sanitizer", {})
    merged = {**(old if isinstance(old, dict) else {}), **tool_runs}
    corpus.save(case, path.parent, dataclasses.replace(meta, extra={**meta.extra,
                                                                    "sanitizer": merged}))
    return True


def triage(findings_dir: str | Path, tools: tuple[str, ...] = BASE_TOOLS,
           backend: str = "cuda", config: SanitizerConfig | None = None,
           attach: bool = True) -> list[TriageGroup]:
    """Replay every finding under `tools`, attach the reports, group by root cause (largest
    group first)."""
    paths = list(corpus.iter_corpus(findings_dir))
    if not paths:
        raise HarnessError(f"{findings_dir}: no finding files (.json cases) to triage")
    found: list[TriagedFinding] = []
    by_bugs: dict[tuple[str, ...], list[TriagedFinding]] = defaultdict(list)
    for p in paths:
        _, meta = corpus.load(p)
        f = TriagedFinding(str(p), meta.signature, meta.found_with())
        found.append(f)
        by_bugs[f.bugs].append(f)
    for bugs, group in by_bugs.items():
        for tool in tools:
            run: SanitizerRun = replay_under_sanitizer([f.path for f in group], tool, backend,
                                                       bugs, redzones=False, config=config)
            for f, case in zip(group, run.cases, strict=True):
                f.reports.extend(case.reports)
                f.status[tool] = case.status
    for f in found:
        if attach:
            runs = {tool: tool_run(tool, f.status.get(tool, "not-run"), f.reports)
                    for tool in tools}
            f.attached = attach_reports(Path(f.path), runs)
    groups: dict[str, list[TriagedFinding]] = defaultdict(list)
    for f in found:
        groups[f.root_cause].append(f)
    return sorted((TriageGroup(k, v) for k, v in groups.items()),
                  key=lambda g: (-len(g.findings), g.root_cause))
