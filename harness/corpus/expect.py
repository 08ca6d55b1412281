"""Replaying a corpus case against the expectations stored with it.

A case file's metadata says what each backend reports with which bug variants on
(`corpus.Expectation`: "clean" or a finding signature "stage:check"). Replaying checks them:
by default every variant set the metadata names for the backend, plus the fixed chain, which is
expected clean unless the metadata says otherwise (the corpus's standing promise); with an
explicit variant set (`--moe-bug`), that set only. "clean" means no finding (a clean contract
rejection is clean); a signature means that signature is among the findings.

The pytest plugin and `moe-harness corpus` are thin over this module. A check can run in this
process (`run_checks`) or in an isolated child (`run_check_isolated`, the function
`harness.isolation` calls), where a crash or a hang fails that check only; a failure is
explained by `harness.corpus.explain`. Targets come from `harness.backends.resolve_target`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError

#: details keys that index the offending entries; the keys after one are its columns
INDEX_KEYS = ("rows", "slots", "positions", "adapters")
CELL_WIDTH = 56


@dataclass(frozen=True)
class Check:
    """One expectation to verify: with the variants `bugs` on, the run is `outcome`
    ("clean" or a signature). `stored` is False for the implied "fixed chain is clean"."""

    bugs: tuple[str, ...]
    outcome: str
    stored: bool = True

    @property
    def label(self) -> str:
        return f"with bugs {'+'.join(self.bugs)}" if self.bugs else "on the fixed chain"

    def to_json(self) -> dict[str, Any]:
        return {"bugs": list(self.bugs), "outcome": self.outcome, "stored": self.stored}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Check:
        return cls(tuple(obj["bugs"]), obj["outcome"], obj.get("stored", True))


def checks_for(meta, backend: str, bugs: Iterable[str] | None = None) -> list[Check]:
    """The checks a replay of a case with metadata `meta` (`corpus.CaseMeta`) on `backend`
    makes: every variant set its expectations name for `backend` (or any backend) and the fixed
    chain; with `bugs` given, that variant set only (empty: the case has no expectation for
    it, except the fixed chain, which is clean by default)."""
    if bugs is not None:
        key = tuple(sorted(set(bugs)))
        sets = [key]
    else:
        sets = sorted({e.bugs for e in meta.expect if e.backend in (None, backend)} | {()},
                      key=lambda s: (len(s), s))
    out = []
    for s in sets:
        outcome = meta.expected(backend, s)
        if outcome is not None:
            out.append(Check(s, outcome))
        elif not s:
            out.append(Check((), "clean", stored=False))
    return out


@dataclass
class CheckResult:
    """What one check's run gave: its findings (`Finding`), a clean rejection, or an `error`
    (the isolated child crashed or timed out: `output` is the tail of what it printed)."""

    check: Check
    findings: list = field(default_factory=list)
    rejected: str | None = None
    error: str | None = None
    output: str = ""
    seconds: float = 0.0

    @property
    def signatures(self) -> list[str]:
        return [f.signature for f in self.findings]

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        if self.check.outcome == "clean":
            return not self.findings
        return self.check.outcome in self.signatures

    def got(self) -> str:
        """What the run gave, in a few words."""
        if self.error is not None:
            return self.error
        if not self.findings:
            return "clean" + (f" (rejected: {self.rejected})" if self.rejected else "")
        return ", ".join(self.signatures)

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check.to_json(), "findings": [f.to_json() for f in self.findings],
                "rejected": self.rejected, "error": self.error, "output": self.output,
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CheckResult:
        from harness.findings import Finding

        findings = [Finding.from_json(f) for f in obj["findings"]]
        return cls(Check.from_json(obj["check"]), findings, obj["rejected"], obj["error"],
                   obj["output"], obj["seconds"])


# -- running -----------------------------------------------------------------------------------


def run_check(case, target, check: Check) -> CheckResult:
    """Run one check in this process (`execute` on `target` with the check's variants)."""
    from harness.api import execute

    start = time.perf_counter()
    res = execute(case, target, check.bugs)
    return CheckResult(check, list(res.findings),
                       None if res.rejected is None else str(res.rejected),
                       seconds=time.perf_counter() - start)


def run_checks(case, target, checks: Sequence[Check]) -> list[CheckResult]:
    return [run_check(case, target, c) for c in checks]


_CHILD_TARGETS: dict[str, Any] = {}


def prepare_target(target: str) -> None:
    """The child's set-up (`harness.isolation.Isolated(setup=...)`): import torch and the
    chain, build or load the target's kernels, before any check's time-out starts."""
    import harness.api  # noqa: F401  (torch and the whole chain)
    from harness.backends import resolve_target

    if target not in _CHILD_TARGETS:
        _CHILD_TARGETS[target] = resolve_target(target)


def run_check_isolated(path: str, target: str, check: dict[str, Any]) -> dict[str, Any]:
    """The child side of an isolated check (`harness.isolation` calls it): load the case, run
    it, and ask for a fresh process if the target is unusable afterwards (a sticky CUDA
    error). Targets are kept between calls: kernels are loaded once per child."""
    from harness import corpus, isolation

    case, _ = corpus.load(path)
    prepare_target(target)
    tgt = _CHILD_TARGETS[target]
    try:
        result = run_check(case, tgt, Check.from_json(check))
    finally:
        try:
            tgt.check_usable()
        except HarnessError:
            _CHILD_TARGETS.pop(target, None)
            isolation.request_restart()
    return result.to_json()


def run_checks_in(runner, path: str, target: str, checks: Sequence[Check],
                  timeout: float | None) -> list[CheckResult]:
    """Run `checks` one call each through `runner` (`isolation.Isolated`), each within
    `timeout` seconds (a child's start-up is not counted: it has its own); a crash or a
    time-out fails that check, and the next one gets a fresh child."""
    from harness.errors import IsolationError

    out = []
    for check in checks:
        start = time.perf_counter()
        try:
            out.append(CheckResult.from_json(runner.call(
                "harness.corpus.expect:run_check_isolated",
                {"path": path, "target": target, "check": check.to_json()}, timeout=timeout)))
        except IsolationError as exc:
            out.append(CheckResult(check, error=str(exc), output=exc.output,
                                   seconds=time.perf_counter() - start))
    return out
